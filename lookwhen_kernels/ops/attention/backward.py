"""The backward kernels (FlashAttention-2's split): delta, dk/dv, dq."""
import triton
import triton.language as tl

from lookwhen_kernels.ops._common import split_program_id
from lookwhen_kernels.ops.attention.scores import query_block, LOG2E, key_range, load_rows, mod_scores


@triton.jit
def attn_bwd_preprocess(
    out_ptr, dout_ptr, glse_ptr, delta_ptr, out_units, dout_units, glse_head_stride, glse_row_stride, total_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_GLSE: tl.constexpr,
):
    # The incoming gradient of lse keeps its own strides: autograd hands an
    # expanded (stride 0) tensor for ``lse.sum()``, and copying it would cost a
    # full [H, total_q] write.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    rows64 = rows.to(tl.int64)
    o = load_rows(out_ptr + head * HEAD_DIM, rows64, total_q, out_units * HEAD_DIM, offs_d, HEAD_DIM)
    do = load_rows(dout_ptr + head * HEAD_DIM, rows64, total_q, dout_units * HEAD_DIM, offs_d, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    stats = head.to(tl.int64) * total_q + rows
    if HAS_GLSE:
        glse = glse_ptr + head.to(tl.int64) * glse_head_stride + rows64 * glse_row_stride
        delta -= tl.load(glse, mask=rows < total_q, other=0.0)
    tl.store(delta_ptr + stats, delta, mask=rows < total_q)


@triton.jit
def attn_bwd_dkdv(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_q_ptr, cu_k_ptr,
    q_units, k_units, v_units, dout_units, dk_units, dv_units, total_q, group, qk_scale, softmax_scale, n_seqs,
    max_seqlen_k, window_left, window_right, softcap, alibi_ptr, alibi_seq_stride,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
):
    block_n, rest = split_program_id(tl.cdiv(max_seqlen_k, BLOCK_N))
    seq = rest % n_seqs
    kv_head = rest // n_seqs
    k_start = tl.load(cu_k_ptr + seq)
    k_len = tl.load(cu_k_ptr + seq + 1) - k_start
    if block_n * BLOCK_N >= k_len:
        return
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    q_stride = q_units * HEAD_DIM
    k_stride = k_units * HEAD_DIM
    v_stride = v_units * HEAD_DIM
    do_stride = dout_units * HEAD_DIM

    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = load_rows(k_ptr + k_start.to(tl.int64) * k_stride + kv_head * HEAD_DIM, offs_n, k_len, k_stride, offs_d,
                  HEAD_DIM)
    v = load_rows(v_ptr + k_start.to(tl.int64) * v_stride + kv_head * HEAD_DIM, offs_n, k_len, v_stride, offs_d,
                  HEAD_DIM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # The query blocks that can see this key block (the window's transpose).
    if WINDOW:
        shift = k_len - q_len
        lo = tl.maximum(block_n * BLOCK_N - shift - window_right, 0) // BLOCK_M * BLOCK_M
        hi = tl.minimum(block_n * BLOCK_N + BLOCK_N - 1 - shift + window_left + 1, q_len)
    else:
        lo = 0
        hi = q_len
    # The query heads sharing this kv head, summed in a fixed order.
    for g in range(0, group):
        head = kv_head * group + g
        slope = tl.load(alibi_ptr + seq * alibi_seq_stride + head) if ALIBI else 0.0
        q_base = q_ptr + q_start.to(tl.int64) * q_stride + head * HEAD_DIM
        do_base = dout_ptr + q_start.to(tl.int64) * do_stride + head * HEAD_DIM
        stats = head.to(tl.int64) * total_q + q_start
        for start_m in range(lo, hi, BLOCK_M):
            # Transposed orientation (keys x queries): the resident key tile is
            # the M side of every MMA. Rows of padded keys pick up garbage but
            # are never stored; padded queries, and (with a window) queries
            # that see no key (lse = -inf), get lse = +inf, so their column
            # of P^T is 0.
            rows = start_m + offs_m
            q = load_rows(q_base, rows, q_len, q_stride, offs_d, HEAD_DIM)
            do = load_rows(do_base, rows, q_len, do_stride, offs_d, HEAD_DIM)
            lse = tl.load(lse_ptr + stats + rows, mask=rows < q_len, other=float("inf"))
            if WINDOW:
                lse = tl.where(lse == float("-inf"), float("inf"), lse)
            delta = tl.load(delta_ptr + stats + rows, mask=rows < q_len, other=0.0)
            s_t, t_t = mod_scores(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION), rows[None, :],
                                  offs_n[:, None], q_len, k_len, qk_scale, softcap, slope, window_left, window_right,
                                  WINDOW, SOFTCAP, ALIBI, False)
            p_t = tl.exp2(s_t - lse[None, :] * LOG2E)
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            if SOFTCAP:
                ds_t *= 1.0 - t_t * t_t
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    mask = (offs_n[:, None] < k_len) & (offs_d[None, :] < HEAD_DIM)
    dk_stride = dk_units * HEAD_DIM
    dv_stride = dv_units * HEAD_DIM
    dk_ptrs = dk_ptr + k_start.to(tl.int64) * dk_stride + kv_head * HEAD_DIM + offs_n[:, None] * dk_stride \
        + offs_d[None, :]
    dv_ptrs = dv_ptr + k_start.to(tl.int64) * dv_stride + kv_head * HEAD_DIM + offs_n[:, None] * dv_stride \
        + offs_d[None, :]
    tl.store(dk_ptrs, (dk * softmax_scale).to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def attn_bwd_dq(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, cu_q_ptr, cu_k_ptr,
    q_units, k_units, v_units, dout_units, dq_units, total_q, group, qk_scale, softmax_scale, n_seqs,
    max_seqlen_q, window_left, window_right, softcap, alibi_ptr, alibi_seq_stride,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
):
    block_m, seq, head, kv_head, q_start, q_len, k_start, k_len = query_block(
        cu_q_ptr, cu_k_ptr, n_seqs, group, max_seqlen_q, BLOCK_M)
    if block_m * BLOCK_M >= q_len:
        return
    q_stride = q_units * HEAD_DIM
    k_stride = k_units * HEAD_DIM
    v_stride = v_units * HEAD_DIM
    do_stride = dout_units * HEAD_DIM

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < q_len
    q = load_rows(q_ptr + q_start.to(tl.int64) * q_stride + head * HEAD_DIM, offs_m, q_len, q_stride, offs_d,
                  HEAD_DIM)
    do = load_rows(dout_ptr + q_start.to(tl.int64) * do_stride + head * HEAD_DIM, offs_m, q_len, do_stride, offs_d,
                   HEAD_DIM)
    stats = head.to(tl.int64) * total_q + q_start + offs_m
    lse2 = tl.load(lse_ptr + stats, mask=row_ok, other=0.0) * LOG2E
    if WINDOW:
        # A query that sees no key (lse = -inf) gets P = 0 instead of exp2(-inf + inf).
        lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
    delta = tl.load(delta_ptr + stats, mask=row_ok, other=0.0)
    k_base = k_ptr + k_start.to(tl.int64) * k_stride + kv_head * HEAD_DIM
    v_base = v_ptr + k_start.to(tl.int64) * v_stride + kv_head * HEAD_DIM
    slope = tl.load(alibi_ptr + seq * alibi_seq_stride + head) if ALIBI else 0.0

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi = key_range(block_m * BLOCK_M, BLOCK_M, q_len, k_len, window_left, window_right, BLOCK_N, WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = load_rows(k_base, cols, k_len, k_stride, offs_d, HEAD_DIM)
        v = load_rows(v_base, cols, k_len, v_stride, offs_d, HEAD_DIM)
        # Padded keys are zero rows of k, so their column would be exp2(-lse):
        # not zero, and it would reach dq through ds @ k (0 * huge = NaN);
        # mod_scores masks them to -inf.
        s, t = mod_scores(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), offs_m[:, None], cols[None, :],
                          q_len, k_len, qk_scale, softcap, slope, window_left, window_right, WINDOW, SOFTCAP, ALIBI,
                          True)
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds *= 1.0 - t * t
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    dq_stride = dq_units * HEAD_DIM
    dq_ptrs = dq_ptr + q_start.to(tl.int64) * dq_stride + head * HEAD_DIM + offs_m[:, None] * dq_stride \
        + offs_d[None, :]
    tl.store(dq_ptrs, (dq * softmax_scale).to(dq_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
