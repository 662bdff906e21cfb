"""The forward kernel: online softmax over a sequence's key blocks."""
import triton
import triton.language as tl

from lookwhen_kernels.ops.attention.scores import query_block, LN2, key_range, load_rows, mod_scores


@triton.jit
def attn_fwd(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cu_q_ptr, cu_k_ptr,
    q_units, k_units, v_units, out_units, total_q, group, qk_scale, n_seqs, max_seqlen_q,
    window_left, window_right, softcap, alibi_ptr, alibi_seq_stride,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
):
    # Row strides come in units of HEAD_DIM so the compiler sees them as
    # multiples of it (vectorised loads without relying on launch-time
    # specialisation).
    block_m, seq, head, kv_head, q_start, q_len, k_start, k_len = query_block(
        cu_q_ptr, cu_k_ptr, n_seqs, group, max_seqlen_q, BLOCK_M)
    if block_m * BLOCK_M >= q_len:
        return
    q_stride = q_units * HEAD_DIM
    k_stride = k_units * HEAD_DIM
    v_stride = v_units * HEAD_DIM
    out_stride = out_units * HEAD_DIM

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_rows(q_ptr + q_start.to(tl.int64) * q_stride + head * HEAD_DIM, offs_m, q_len, q_stride, offs_d,
                  HEAD_DIM)
    k_base = k_ptr + k_start.to(tl.int64) * k_stride + kv_head * HEAD_DIM
    v_base = v_ptr + k_start.to(tl.int64) * v_stride + kv_head * HEAD_DIM

    slope = tl.load(alibi_ptr + seq * alibi_seq_stride + head) if ALIBI else 0.0

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi = key_range(block_m * BLOCK_M, BLOCK_M, q_len, k_len, window_left, window_right, BLOCK_N, WINDOW)
    # One loop with the column mask in every block: peeling the partial last
    # block keeps a second, register-resident copy of q live across the loop.
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = load_rows(k_base, cols, k_len, k_stride, offs_d, HEAD_DIM)
        s, _ = mod_scores(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), offs_m[:, None], cols[None, :],
                          q_len, k_len, qk_scale, softcap, slope, window_left, window_right, WINDOW, SOFTCAP, ALIBI,
                          True)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if WINDOW:
            # A row can see no key of this block (nor of the earlier ones):
            # subtract 0 instead of -inf, whose difference would be NaN.
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        # Without a window every block holds a real key, so m_new is finite.
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_rows(v_base, cols, k_len, v_stride, offs_d, HEAD_DIM)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    # A query that sees no key: l = 0, output 0 (not 0 * a NaN of v), lse =
    # -inf. A NaN score (from q or k) makes l NaN: output and lse NaN, as
    # FlashAttention's.
    has_keys = l_i != 0.0
    out = tl.where(has_keys[:, None], acc / tl.where(has_keys, l_i, 1.0)[:, None], 0.0)
    out_ptrs = out_ptr + q_start.to(tl.int64) * out_stride + head * HEAD_DIM \
        + offs_m[:, None] * out_stride + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM))
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * LN2, float("-inf"))
    tl.store(lse_ptr + head.to(tl.int64) * total_q + q_start + offs_m, lse, mask=offs_m < q_len)
