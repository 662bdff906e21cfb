"""``varlen_attention``: FlashAttention-2 over packed variable-length sequences.

Layout and arguments are FlashAttention's ``flash_attn_varlen_func``: ``q
[total_q, H, Dh]``, ``k, v [total_k, H_kv, Dh]``, ``cu_seqlens int32 [B+1]``.

Forward: one program per (query block, sequence, head), on a flat 1-d grid
of ``cdiv(max_seqlen_q, BLOCK_M) * B * H`` programs (grid axes 1 and 2 stop
at 65,535 sequences); programs past their sequence's end return at once, so
the grid costs nothing for short sequences. The program streams the sequence's
key blocks with the online softmax (running max and sum in fp32, ``exp2``
with the scale folded into ``log2(e)``), so the ``Lq x Lk`` matrix never
exists. Every key block applies the column mask (one select per score):
peeling the partial last block off the loop made the compiler keep a second
register copy of q live across the loop. It writes the output and the
natural-log sum-exp ``lse`` (``[H, total_q]``), which is all the backward
needs.

Backward (FlashAttention-2's split, no atomics, so results are bitwise
reproducible): a preprocess kernel computes ``delta = rowsum(dO * O)`` (minus
the incoming gradient of ``lse`` when there is one, since ``d lse / d s =
P``); a dk/dv kernel with one program per (key block, sequence, kv head)
recomputes ``P^T`` block by block from ``lse`` over all query blocks of every
query head of its group (so grouped-query heads are summed in a fixed order,
inside one program); a dq kernel with one program per query block loops over
the key blocks.

Head dims that are not a power of two run in the next power-of-two tile with
masked columns (80 and 96 in a 128-wide tile).

Dispatch: CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``) take the
kernels. Other CPU tensors take the reference through a separate opaque op
(``lookwhen::varlen_attention_cpu``): its per-sequence loop depends on the
values of ``cu_seqlens``, which ``torch.compile`` must not trace.
"""
from __future__ import annotations

import math
from numbers import Integral
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton
from torch.utils.flop_counter import register_flop_formula

from lookwhen_kernels import reference
from lookwhen_kernels.layout import lengths_from_cu_seqlens
from lookwhen_kernels.ops._common import (
    FLOAT_DTYPES,
    TRITON_DTYPE,
    CompileSpec,
    check_cu_seqlens,
    check_offsets,
    check_tensor,
    checks_values,
    deterministic,
    interpret_mode,
    next_power_of_2,
    split_program_id,
    use_triton,
)

MAX_HEAD_DIM = 256
# Globals a kernel reads must be constexpr.
LOG2E = tl.constexpr(math.log2(math.e))
LN2 = tl.constexpr(math.log(2.0))

# ---------------------------------------------------------------------------
# Tile configurations: (BLOCK_M queries, BLOCK_N keys, warps, stages), by tile
# width (BLOCK_D <= 64, 128, 256). On a GPU the autotuner picks between the
# entries once per head dim and dtype; the interpreter (tests) runs the first.
# Every fp16/bf16 entry for 64 and 128 compiles without spills for sm_90 and
# sm_80 (``python -m lookwhen_kernels.inspect --only varlen_attention``).
#
# FlashAttention-2 runs 128 x 128 (hdim <= 64) and 128 x 64 (hdim 128, H100)
# forward tiles with 4 warps, and backward tiles of 128 keys x 128 queries
# (hdim 64) or 128 keys x 64 queries (hdim 128) with 8 warps. Triton keeps
# more in registers than its hand-written kernels (the backward holds k, v,
# dk and dv of the key tile), so the same shapes spill here. The lists keep
# FA2's 128-query forward tile (and its 128-key tile in the head-dim-64
# backward) and pair it with the widest other tile and warp count that do
# not spill.
# ---------------------------------------------------------------------------


def _config(block_m, block_n, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


_HALF_CONFIGS = {
    "fwd": {
        64: (_config(128, 64, 4, 3), _config(128, 128, 8, 3)),
        128: (_config(128, 64, 8, 3), _config(128, 32, 8, 3)),
        256: (_config(64, 64, 8, 2),),
    },
    # The key tile is the M side of all the dk/dv kernel's MMAs (keys x queries).
    "dkdv": {
        64: (_config(32, 128, 8, 2), _config(32, 64, 4, 2)),
        128: (_config(32, 64, 8, 2), _config(16, 128, 8, 2)),
        256: (_config(16, 64, 8, 2),),
    },
    "dq": {
        64: (_config(128, 64, 8, 2), _config(64, 64, 4, 2)),
        128: (_config(128, 32, 8, 2), _config(64, 64, 4, 2)),
        # A 32-row alternative misses Hopper's 64-row warpgroup MMA (no HGMMA).
        256: (_config(64, 32, 8, 2),),
    },
}
# fp32 products run as three TF32 MMAs each (see _dot_precision), which
# triples the operand registers: small tiles, one config each. Spill-free up
# to head dim 128 (the 128-wide dq tile at 16 x 16: 32 x 16 spills for the
# masked head dims 80 and 96); the 256-wide backward spills (fp32 is not the
# GPU fast path, so the static report leaves it out).
_FP32_CONFIGS = {
    "fwd": {64: (_config(128, 32, 8, 2),), 128: (_config(32, 32, 8, 2),), 256: (_config(16, 32, 4, 2),)},
    "dkdv": {64: (_config(16, 32, 4, 2),), 128: (_config(16, 16, 4, 2),), 256: (_config(16, 16, 8, 2),)},
    "dq": {64: (_config(32, 32, 4, 2),), 128: (_config(16, 16, 8, 2),), 256: (_config(16, 16, 8, 2),)},
}
# Score modifiers (window, soft cap, ALiBi) hold more in registers: at head
# dims 64 and 128 the configs that spill with all of them on (sm_80 or sm_90)
# are left out.
_HALF_MOD_CONFIGS = {
    "fwd": {64: _HALF_CONFIGS["fwd"][64][1:], 128: _HALF_CONFIGS["fwd"][128][1:]},
    "dkdv": {128: _HALF_CONFIGS["dkdv"][128][:1]},
    "dq": {64: _HALF_CONFIGS["dq"][64][:1], 128: _HALF_CONFIGS["dq"][128][:1]},
}
PREPROCESS_BLOCK_M = 64


def block_d_for(head_dim: int) -> int:
    """The tile width a head dim runs in: a power of two, at least 16 (the K of an MMA)."""
    return max(16, next_power_of_2(head_dim))


def configs_for(kernel: str, head_dim: int, dtype: torch.dtype, mods: bool = False) -> Tuple[triton.Config, ...]:
    """The configs a kernel runs with; ``mods``: with score modifiers."""
    width = max(64, block_d_for(head_dim))
    if dtype == torch.float32:
        return _FP32_CONFIGS[kernel][width]
    return _HALF_MOD_CONFIGS.get(kernel, {}).get(width, _HALF_CONFIGS[kernel][width]) if mods \
        else _HALF_CONFIGS[kernel][width]


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs promise fp32-level products: "tf32x3" (hi/lo TF32 split,
    # ~1e-6 relative) keeps them on the tensor cores. Exact "ieee" dots run as
    # FMAs whose operands sit in registers and spill at any useful tile.
    return "tf32x3" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------


@triton.jit
def _load_rows(base, rows, n_rows, row_stride, offs_d, HEAD_DIM: tl.constexpr):
    ptrs = base + rows[:, None] * row_stride + offs_d[None, :]
    return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _tanh(x):
    # tanh through one exp of a non-positive argument (no overflow); the
    # interpreter has no libdevice.
    e = tl.exp(tl.abs(x) * -2.0)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _scores(qk, rows, cols, q_len, k_len, qk_scale, softcap, slope, window_left, window_right,
            WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK_PADDING: tl.constexpr):
    """Raw products ``q.k`` -> scores in log2 units, ``-inf`` where a key is
    outside the window or (``MASK_PADDING``) padding; and ``tanh`` of the
    soft cap (for its derivative in the backward; unused without one).
    ``rows`` and ``cols`` broadcast to ``qk``'s shape in either orientation.
    The order is FlashAttention's: scale, soft cap, ALiBi bias, mask."""
    if SOFTCAP:
        t = _tanh(qk * (qk_scale / LOG2E / softcap))
        s = t * (softcap * LOG2E)
    else:
        t = qk
        s = qk * qk_scale
    # Key position minus the query's position, queries aligned bottom-right.
    rel = cols - rows - (k_len - q_len)
    if ALIBI:
        s -= (slope * LOG2E) * tl.abs(rel).to(tl.float32)
    if WINDOW:
        keep = (rel >= -window_left) & (rel <= window_right)
        if MASK_PADDING:
            keep = keep & (cols < k_len)
        s = tl.where(keep, s, float("-inf"))
    elif MASK_PADDING:
        s = tl.where(cols < k_len, s, float("-inf"))
    return s, t


@triton.jit
def _key_range(first_row, n_rows, q_len, k_len, window_left, window_right, BLOCK_N: tl.constexpr,
               WINDOW: tl.constexpr):
    """The key blocks ``[lo, hi)`` that query rows ``first_row .. + n_rows``
    can see: tiles outside the window are skipped, not computed."""
    if WINDOW:
        shift = k_len - q_len
        lo = tl.maximum(first_row + shift - window_left, 0) // BLOCK_N * BLOCK_N
        hi = tl.minimum(first_row + n_rows - 1 + shift + window_right + 1, k_len)
    else:
        lo = 0
        hi = k_len
    return lo, hi


@triton.jit
def _attn_fwd(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cu_q_ptr, cu_k_ptr,
    q_units, k_units, v_units, out_units, total_q, group, qk_scale, n_seqs, max_seqlen_q,
    window_left, window_right, softcap, alibi_ptr, alibi_seq_stride,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
):
    # Row strides come in units of HEAD_DIM so the compiler sees them as
    # multiples of it (vectorised loads without relying on launch-time
    # specialisation).
    block_m, rest = split_program_id(tl.cdiv(max_seqlen_q, BLOCK_M))
    seq = rest % n_seqs
    head = rest // n_seqs
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    if block_m * BLOCK_M >= q_len:
        return
    k_start = tl.load(cu_k_ptr + seq)
    k_len = tl.load(cu_k_ptr + seq + 1) - k_start
    kv_head = head // group
    q_stride = q_units * HEAD_DIM
    k_stride = k_units * HEAD_DIM
    v_stride = v_units * HEAD_DIM
    out_stride = out_units * HEAD_DIM

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_ptr + q_start.to(tl.int64) * q_stride + head * HEAD_DIM, offs_m, q_len, q_stride, offs_d,
                   HEAD_DIM)
    k_base = k_ptr + k_start.to(tl.int64) * k_stride + kv_head * HEAD_DIM
    v_base = v_ptr + k_start.to(tl.int64) * v_stride + kv_head * HEAD_DIM

    slope = tl.load(alibi_ptr + seq * alibi_seq_stride + head) if ALIBI else 0.0

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi = _key_range(block_m * BLOCK_M, BLOCK_M, q_len, k_len, window_left, window_right, BLOCK_N, WINDOW)
    # One loop with the column mask in every block: peeling the partial last
    # block keeps a second, register-resident copy of q live across the loop.
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(k_base, cols, k_len, k_stride, offs_d, HEAD_DIM)
        s, _ = _scores(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), offs_m[:, None], cols[None, :],
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
        v = _load_rows(v_base, cols, k_len, v_stride, offs_d, HEAD_DIM)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    # A query whose key sequence is empty: l = 0, output 0, lse = -inf.
    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    out_ptrs = out_ptr + q_start.to(tl.int64) * out_stride + head * HEAD_DIM \
        + offs_m[:, None] * out_stride + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM))
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * LN2, float("-inf"))
    tl.store(lse_ptr + head.to(tl.int64) * total_q + q_start + offs_m, lse, mask=offs_m < q_len)


@triton.jit
def _attn_bwd_preprocess(
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
    o = _load_rows(out_ptr + head * HEAD_DIM, rows64, total_q, out_units * HEAD_DIM, offs_d, HEAD_DIM)
    do = _load_rows(dout_ptr + head * HEAD_DIM, rows64, total_q, dout_units * HEAD_DIM, offs_d, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    stats = head.to(tl.int64) * total_q + rows
    if HAS_GLSE:
        glse = glse_ptr + head.to(tl.int64) * glse_head_stride + rows64 * glse_row_stride
        delta -= tl.load(glse, mask=rows < total_q, other=0.0)
    tl.store(delta_ptr + stats, delta, mask=rows < total_q)


@triton.jit
def _attn_bwd_dkdv(
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
    k = _load_rows(k_ptr + k_start.to(tl.int64) * k_stride + kv_head * HEAD_DIM, offs_n, k_len, k_stride, offs_d,
                   HEAD_DIM)
    v = _load_rows(v_ptr + k_start.to(tl.int64) * v_stride + kv_head * HEAD_DIM, offs_n, k_len, v_stride, offs_d,
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
            q = _load_rows(q_base, rows, q_len, q_stride, offs_d, HEAD_DIM)
            do = _load_rows(do_base, rows, q_len, do_stride, offs_d, HEAD_DIM)
            lse = tl.load(lse_ptr + stats + rows, mask=rows < q_len, other=float("inf"))
            if WINDOW:
                lse = tl.where(lse == float("-inf"), float("inf"), lse)
            delta = tl.load(delta_ptr + stats + rows, mask=rows < q_len, other=0.0)
            s_t, t_t = _scores(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION), rows[None, :],
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
def _attn_bwd_dq(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, cu_q_ptr, cu_k_ptr,
    q_units, k_units, v_units, dout_units, dq_units, total_q, group, qk_scale, softmax_scale, n_seqs,
    max_seqlen_q, window_left, window_right, softcap, alibi_ptr, alibi_seq_stride,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
):
    block_m, rest = split_program_id(tl.cdiv(max_seqlen_q, BLOCK_M))
    seq = rest % n_seqs
    head = rest // n_seqs
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    if block_m * BLOCK_M >= q_len:
        return
    k_start = tl.load(cu_k_ptr + seq)
    k_len = tl.load(cu_k_ptr + seq + 1) - k_start
    kv_head = head // group
    q_stride = q_units * HEAD_DIM
    k_stride = k_units * HEAD_DIM
    v_stride = v_units * HEAD_DIM
    do_stride = dout_units * HEAD_DIM

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < q_len
    q = _load_rows(q_ptr + q_start.to(tl.int64) * q_stride + head * HEAD_DIM, offs_m, q_len, q_stride, offs_d,
                   HEAD_DIM)
    do = _load_rows(dout_ptr + q_start.to(tl.int64) * do_stride + head * HEAD_DIM, offs_m, q_len, do_stride, offs_d,
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
    lo, hi = _key_range(block_m * BLOCK_M, BLOCK_M, q_len, k_len, window_left, window_right, BLOCK_N, WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(k_base, cols, k_len, k_stride, offs_d, HEAD_DIM)
        v = _load_rows(v_base, cols, k_len, v_stride, offs_d, HEAD_DIM)
        # Padded keys are zero rows of k, so their column would be exp2(-lse):
        # not zero, and it would reach dq through ds @ k (0 * huge = NaN);
        # _scores masks them to -inf.
        s, t = _scores(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), offs_m[:, None], cols[None, :],
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


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------

_AUTOTUNED = {}


def _launch(kernel, configs: Sequence[triton.Config], grid, *args, pin_config: bool = False, **constexprs) -> None:
    """Autotune over ``configs`` on a GPU (once per head dim and dtype); the
    interpreter, deterministic mode and ``pin_config`` run the first,
    preferred config (the autotuner's pick, and with it the rounding, can
    differ between runs)."""
    if pin_config or interpret_mode() or deterministic():
        config = configs[0]
        wrap_triton(kernel)[grid](*args, **constexprs, **config.kwargs,
                                  num_warps=config.num_warps, num_stages=config.num_stages)
        return
    key = (kernel, id(configs))
    if key not in _AUTOTUNED:
        _AUTOTUNED[key] = triton.autotune(configs=list(configs), key=["HEAD_DIM", *_MOD_FLAGS])(kernel)
    wrap_triton(_AUTOTUNED[key])[grid](*args, **constexprs)


_MOD_FLAGS = ("WINDOW", "SOFTCAP", "ALIBI")


class _ScoreMods(NamedTuple):
    """What changes the scores besides the scale (FlashAttention's
    arguments): window bounds (-1 unbounded; causal is ``(-1, 0)``),
    ``softcap`` (0: none) and ALiBi slopes (float32 ``[H]`` or ``[B, H]``)."""

    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    alibi_slopes: Optional[torch.Tensor] = None

    def kernel_args(self, max_q: int, max_k: int, dummy: torch.Tensor):
        """The kernels' trailing runtime arguments and their constexpr flags.
        An unbounded side becomes ``max_q + max_k``, wider than any offset
        between a query and a key, so the bound is always a plain compare."""
        unbounded = max_q + max_k
        alibi = self.alibi_slopes
        args = (
            self.window_left if self.window_left >= 0 else unbounded,
            self.window_right if self.window_right >= 0 else unbounded,
            self.softcap if self.softcap > 0 else 1.0,
            dummy if alibi is None else alibi,
            0 if alibi is None or alibi.dim() == 1 else alibi.stride(0),
        )
        flags = dict(zip(_MOD_FLAGS, ((self.window_left, self.window_right) != (-1, -1), self.softcap > 0,
                                      alibi is not None)))
        return args, flags



def _row_units(t: torch.Tensor) -> int:
    """The row stride in units of the head dim (see :func:`_kernel_layout`)."""
    total, heads, head_dim = t.shape
    return t.stride(0) // head_dim if total > 1 else heads


def _kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """The kernels take ``[rows, heads, Dh]`` with unit stride along Dh, heads
    adjacent and a row stride that is a multiple of Dh: any contiguous tensor,
    and q/k/v unbound from a packed ``[total, 3, H, Dh]`` projection without a
    copy. Other layouts are copied."""
    total, heads, head_dim = t.shape
    ok = (head_dim == 1 or t.stride(2) == 1) and (heads == 1 or t.stride(1) == head_dim) \
        and (total <= 1 or t.stride(0) % head_dim == 0)
    return t if ok else t.contiguous()


def _tile_width_and_group(q, k):
    return block_d_for(q.shape[2]), q.shape[1] // k.shape[1]


def _forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, softmax_scale: float, mods: _ScoreMods):
    q, k, v = (_kernel_layout(t) for t in (q, k, v))
    total_q, heads, head_dim = q.shape
    batch = cu_q.numel() - 1
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((heads, total_q), device=q.device, dtype=torch.float32)
    if total_q == 0 or batch == 0:
        return out, lse
    block_d, group = _tile_width_and_group(q, k)
    mod_args, mod_flags = mods.kernel_args(max_q, max_k, lse)
    _launch(
        _attn_fwd, configs_for("fwd", head_dim, q.dtype, any(mod_flags.values())),
        lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]) * batch * heads,),
        q, k, v, out, lse, cu_q, cu_k,
        _row_units(q), _row_units(k), _row_units(v), _row_units(out), total_q, group, softmax_scale * LOG2E.value,
        batch, max_q, *mod_args,
        HEAD_DIM=head_dim, BLOCK_D=block_d, DOT_PRECISION=_dot_precision(q.dtype), **mod_flags,
    )
    return out, lse


def _backward(grad_out, grad_lse, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, softmax_scale: float,
              mods: _ScoreMods, pin_config: bool):
    q, k, v, out, grad_out = (_kernel_layout(t) for t in (q, k, v, out, grad_out))
    total_q, heads, head_dim = q.shape
    batch = cu_q.numel() - 1
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if batch == 0 or total_q == 0:
        # No query attends to anything: every key gets a zero gradient.
        return dq, dk.zero_(), dv.zero_()
    block_d, group = _tile_width_and_group(q, k)
    delta = torch.empty((heads, total_q), device=q.device, dtype=torch.float32)
    glse = grad_lse if grad_lse is not None else lse
    wrap_triton(_attn_bwd_preprocess)[(triton.cdiv(total_q, PREPROCESS_BLOCK_M), heads)](
        out, grad_out, glse, delta, _row_units(out), _row_units(grad_out), glse.stride(0), glse.stride(1),
        total_q, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=PREPROCESS_BLOCK_M, HAS_GLSE=grad_lse is not None,
    )
    qk_scale = softmax_scale * LOG2E.value
    mod_args, mod_flags = mods.kernel_args(max_q, max_k, delta)
    if k.shape[0]:
        _launch(
            _attn_bwd_dkdv, configs_for("dkdv", head_dim, q.dtype, any(mod_flags.values())),
            lambda meta: (triton.cdiv(max_k, meta["BLOCK_N"]) * batch * k.shape[1],),
            q, k, v, grad_out, lse, delta, dk, dv, cu_q, cu_k,
            _row_units(q), _row_units(k), _row_units(v), _row_units(grad_out), _row_units(dk), _row_units(dv),
            total_q, group, qk_scale, softmax_scale, batch, max_k, *mod_args, pin_config=pin_config,
            HEAD_DIM=head_dim, BLOCK_D=block_d, DOT_PRECISION=_dot_precision(q.dtype), **mod_flags,
        )
    _launch(
        _attn_bwd_dq, configs_for("dq", head_dim, q.dtype, any(mod_flags.values())),
        lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]) * batch * heads,),
        q, k, v, grad_out, lse, delta, dq, cu_q, cu_k,
        _row_units(q), _row_units(k), _row_units(v), _row_units(grad_out), _row_units(dq),
        total_q, group, qk_scale, softmax_scale, batch, max_q, *mod_args, pin_config=pin_config,
        HEAD_DIM=head_dim, BLOCK_D=block_d, DOT_PRECISION=_dot_precision(q.dtype), **mod_flags,
    )
    return dq, dk, dv


# ---------------------------------------------------------------------------
# CPU reference ops (opaque to torch.compile: their loops read cu_seqlens)
# ---------------------------------------------------------------------------


def _reference_mods(mods: _ScoreMods) -> dict:
    return {"window_size": (mods.window_left, mods.window_right), "softcap": mods.softcap,
            "alibi_slopes": mods.alibi_slopes}


@torch.library.custom_op("lookwhen::varlen_attention_cpu", mutates_args=())
def _cpu_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    softmax_scale: float, window_left: int = -1, window_right: int = -1, softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    mods = _ScoreMods(window_left, window_right, softcap, alibi_slopes)
    out, lse = reference.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=softmax_scale,
                                          **_reference_mods(mods))
    # The reference builds lse transposed; the fake (and the kernel) promise contiguous.
    return out.contiguous(), lse.contiguous()


@_cpu_forward.register_fake
def _cpu_forward_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, *mods):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=lse_dtype)


@torch.library.custom_op("lookwhen::varlen_attention_cpu_backward", mutates_args=())
def _cpu_backward(
    grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    softmax_scale: float, window_left: int = -1, window_right: int = -1, softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mods = _ScoreMods(window_left, window_right, softcap, alibi_slopes)
    return reference.varlen_attention_backward(
        grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale=softmax_scale, grad_lse=grad_lse,
        **_reference_mods(mods)
    )


@_cpu_backward.register_fake
def _cpu_backward_fake(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, *mods):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# ---------------------------------------------------------------------------
# Registered ops, autograd, FLOP formulas
# ---------------------------------------------------------------------------


@triton_op("lookwhen::varlen_attention", mutates_args=())
def _varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, need_lse: bool, window_left: int = -1,
    window_right: int = -1, softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
    pin_config: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out, lse)``. ``need_lse``: the caller sees ``lse``, so the
    backward takes its gradient into account (otherwise it is known to be 0).
    ``pin_config``: the backward runs pinned configs (FlashAttention's
    ``deterministic=True``)."""
    mods = (window_left, window_right, softcap, alibi_slopes)
    if not use_triton(q):
        return torch.ops.lookwhen.varlen_attention_cpu(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, *mods)
    return _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                    _ScoreMods(*mods))


@triton_op("lookwhen::varlen_attention_backward", mutates_args=())
def _varlen_attention_backward(
    grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, window_left: int = -1, window_right: int = -1,
    softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None, pin_config: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mods = (window_left, window_right, softcap, alibi_slopes)
    if not use_triton(q):
        return torch.ops.lookwhen.varlen_attention_cpu_backward(
            grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, *mods
        )
    return _backward(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     softmax_scale, _ScoreMods(*mods), pin_config)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, need_lse, *mods, pin_config = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.max_seqlens = (max_q, max_k)
    ctx.softmax_scale = softmax_scale
    ctx.need_lse = need_lse
    ctx.mods = mods
    ctx.pin_config = pin_config


def _autograd_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    # Only a caller that asked for lse can have used it.
    grad_lse = grad_lse if ctx.need_lse else None
    dq, dk, dv = _varlen_attention_backward(
        grad_out, grad_lse, q, k, v, out, lse, cu_q, cu_k, *ctx.max_seqlens, ctx.softmax_scale, *ctx.mods,
        ctx.pin_config,
    )
    # The alibi slopes are constants (FlashAttention gives them no gradient either).
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None


_varlen_attention.register_autograd(_autograd_backward, setup_context=_setup_context)


def attention_flops(q_shape, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, window_left: int = -1,
                    window_right: int = -1) -> int:
    """``4 * H * Dh`` times the (query, key) pairs that see each other: the two
    GEMMs (QK^T and PV). Without a window every pair of a sequence; with one,
    each query's visible keys (bottom-right aligned, -1 unbounded), counted
    per query row in closed form."""
    lengths_q = lengths_from_cu_seqlens(cu_seqlens_q.cpu()).long()
    lengths_k = lengths_from_cu_seqlens(cu_seqlens_k.cpu()).long()
    if (window_left, window_right) == (-1, -1):
        pairs = int((lengths_q * lengths_k).sum())
    else:
        seq = torch.repeat_interleave(torch.arange(len(lengths_q)), lengths_q)
        row = torch.arange(int(lengths_q.sum())) - (torch.cumsum(lengths_q, 0) - lengths_q)[seq]
        position = row + lengths_k[seq] - lengths_q[seq]
        first = position - window_left if window_left >= 0 else torch.zeros_like(position)
        last = position + window_right if window_right >= 0 else lengths_k[seq] - 1
        pairs = int((torch.minimum(last, lengths_k[seq] - 1) - first.clamp(min=0) + 1).clamp(min=0).sum())
    return 4 * pairs * q_shape[1] * q_shape[2]


@register_flop_formula(torch.ops.lookwhen.varlen_attention, get_raw=True)
def _forward_flops(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, need_lse,
                   window_left=-1, window_right=-1, *args, out_val=None, **kwargs) -> int:
    return attention_flops(q.shape, cu_seqlens_q, cu_seqlens_k, window_left, window_right)


@register_flop_formula(torch.ops.lookwhen.varlen_attention_backward, get_raw=True)
def _backward_flops(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                    softmax_scale, window_left=-1, window_right=-1, *args, out_val=None, **kwargs) -> int:
    # Five GEMMs (S recomputed, dV, dP, dS, dK/dQ counted as in FlashAttention): 2.5x the forward.
    return attention_flops(q.shape, cu_seqlens_q, cu_seqlens_k, window_left, window_right) * 5 // 2


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def _check_max_seqlen(name: str, value, lengths: Optional[torch.Tensor]) -> int:
    longest = int(lengths.max()) if lengths is not None and lengths.numel() else 0
    if value is None:
        return longest
    if isinstance(value, bool) or not isinstance(value, (Integral, torch.SymInt)) or value < 0:
        raise ValueError(f"{name}: expected a non-negative int, got {value!r}")
    if lengths is not None and value < longest:
        raise ValueError(f"{name}: {value} is shorter than the longest sequence ({longest})")
    return value


def _check_score_mods(causal, window_size, softcap, alibi_slopes, batch: int, heads: int, device) -> _ScoreMods:
    if not isinstance(causal, bool):
        raise ValueError(f"causal: expected a bool, got {causal!r}")
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise ValueError(f"window_size: expected (left, right), got {window_size!r}") from None
    for side, value in (("left", left), ("right", right)):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < -1:
            raise ValueError(f"window_size: {side} must be an int >= -1 (-1: unbounded), got {window_size!r}")
    if causal:
        # FlashAttention: causal is the window (left, 0).
        right = 0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0.0 <= softcap < math.inf:
        raise ValueError(f"softcap: expected a finite float >= 0 (0: no cap), got {softcap!r}")
    if alibi_slopes is not None:
        check_tensor("alibi_slopes", alibi_slopes, dtypes=(torch.float32,), device=device)
        if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
            raise ValueError(f"alibi_slopes: expected shape [{heads}] or [{batch}, {heads}], "
                             f"got {list(alibi_slopes.shape)}")
        alibi_slopes = alibi_slopes.contiguous()
    return _ScoreMods(int(left), int(right), float(softcap), alibi_slopes)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    *,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_lse: bool = False,
    validate: Optional[bool] = None,
):
    """Softmax attention within each of B packed sequences.

    Arguments follow FlashAttention's ``flash_attn_varlen_func``:

    - ``q [total_q, H, Dh]``, ``k, v [total_k, H_kv, Dh]`` (fp16, bf16 or fp32,
      one dtype), ``H`` a multiple of ``H_kv`` (grouped-query attention: query
      head ``h`` reads kv head ``h // (H / H_kv)``). ``Dh`` from 1 to 256.
    - ``cu_seqlens_q``, ``cu_seqlens_k``: int32 ``[B+1]`` offsets; sequence
      ``b`` is rows ``cu[b]:cu[b+1]``. ``cu_seqlens_k=None`` means the same
      offsets as the queries (self-attention). Empty sequences are allowed; a
      query sequence whose key sequence is empty gets zeros (and lse ``-inf``).
    - ``max_seqlen_q``, ``max_seqlen_k``: the longest sequence of each side
      (a larger value is fine, a smaller one is an error). When omitted they
      are computed from ``cu_seqlens``, which reads them back to the host: a
      device sync.
    - ``validate``: run the value checks of ``cu_seqlens`` (monotonic, last
      offset = rows, max lengths), which read it back to the host. The
      default, ``None``, is FlashAttention's contract: a caller that passes
      both max lengths vouches for the offsets, and no data is read (validate
      once at the model boundary with
      ``lookwhen_kernels.ops._common.check_cu_seqlens``). Never run while
      torch.compile traces. Structural checks (dtype, device, shape,
      contiguity of ``cu_seqlens``) always run.
    - ``softmax_scale``: defaults to ``Dh ** -0.5``.
    - ``causal``, ``window_size=(left, right)``: FlashAttention's masks. Query
      ``i`` of a sequence sits at key position ``i + Lk - Lq`` (aligned to the
      bottom-right when the lengths differ) and sees the keys from ``left``
      before to ``right`` after it; ``-1`` is unbounded, ``causal`` sets
      ``right = 0``. Key tiles outside the window are skipped. Queries that
      see no key get zeros and lse ``-inf``.
    - ``softcap > 0``: scores become ``softcap * tanh(scores / softcap)``.
    - ``alibi_slopes``: float32 ``[H]`` or ``[B, H]``; adds ``-slope * |key
      position - query position|`` to the scores (after the soft cap).
    - ``deterministic``: the backward runs the pinned configs even where it
      would autotune, so that gradients are bitwise reproducible across
      processes too (it never uses atomics, so within a process they always
      are); see also :func:`lookwhen_kernels.set_deterministic`.
    - ``dropout_p`` exists so that calls written for FlashAttention keep
      working; only 0 is supported.

    Returns ``out [total_q, H, Dh]`` in the input dtype (accumulated in fp32),
    and with ``return_lse=True`` also ``lse``: float32 ``[H, total_q]``, the
    natural-log sum of ``exp(scale * q.k)`` over each query's keys.
    Differentiable in ``q``, ``k``, ``v`` (and through ``lse``); the backward is
    deterministic.
    """
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    device = q.device
    check_tensor("k", k, ndim=3, dtypes=(q.dtype,), device=device)
    check_tensor("v", v, ndim=3, dtypes=(q.dtype,), device=device)
    total_q, heads, head_dim = q.shape
    total_k, kv_heads, _ = k.shape
    if k.shape[2] != head_dim or v.shape[2] != head_dim:
        raise ValueError(
            f"k, v: expected head dim {head_dim} like q, got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q: unsupported head dim {head_dim} (supported: 1 to {MAX_HEAD_DIM})")
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"v: expected shape [{total_k}, {kv_heads}, {head_dim}] like k, got {list(v.shape)}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(
            f"k: the number of query heads ({heads}) must be a multiple of the number of kv heads ({kv_heads})"
        )
    self_attention = cu_seqlens_k is None
    if self_attention:
        cu_seqlens_k = cu_seqlens_q
    check_offsets("cu_seqlens_q", cu_seqlens_q, device=device)
    check_offsets("cu_seqlens_k", cu_seqlens_k, device=device)
    if cu_seqlens_k.numel() != cu_seqlens_q.numel():
        raise ValueError(
            f"cu_seqlens_k: expected B+1 = {cu_seqlens_q.numel()} offsets like cu_seqlens_q, "
            f"got {cu_seqlens_k.numel()}"
        )
    if self_attention and total_k != total_q:
        raise ValueError(
            f"k: cu_seqlens_k=None means k has q's sequences, but k has {total_k} rows and q {total_q}"
        )
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p: attention dropout is not supported, got {dropout_p}")
    mods = _check_score_mods(causal, window_size, softcap, alibi_slopes, cu_seqlens_q.numel() - 1, heads, device)
    if softmax_scale is None:
        softmax_scale = head_dim ** -0.5
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale: expected a finite float, got {softmax_scale}")

    lengths_missing = max_seqlen_q is None or max_seqlen_k is None
    if validate is None:
        validate = lengths_missing
    lengths_q = lengths_k = None
    if lengths_missing or checks_values(validate, q):
        lengths_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, total=total_q)
        lengths_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, total=total_k)
    max_seqlen_q = _check_max_seqlen("max_seqlen_q", max_seqlen_q, lengths_q)
    max_seqlen_k = _check_max_seqlen("max_seqlen_k", max_seqlen_k, lengths_k)
    for name, t, longest in (("q", q, max_seqlen_q), ("k", k, max_seqlen_k), ("v", v, max_seqlen_k)):
        # Offsets inside one sequence are int32 in the kernels.
        if longest * max(t.stride(0), t.shape[1] * t.shape[2]) >= 2 ** 31:
            raise ValueError(f"{name}: a sequence of {longest} rows is too long for int32 offsets")

    out, lse = _varlen_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, float(softmax_scale), bool(return_lse),
        *mods, bool(deterministic),
    )
    return (out, lse) if return_lse else out


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: Optional[float] = None,
    return_lse: bool = False, **options,
):
    """Equal-length batches, FlashAttention's ``flash_attn_func`` layout:
    ``q [B, N, H, Dh]``, ``k, v [B, Nk, H_kv, Dh]``. Returns ``out [B, N, H,
    Dh]`` and, with ``return_lse=True``, ``lse`` float32 ``[B, H, N]``. No
    host sync (the offsets are built on the device). ``options``:
    :func:`varlen_attention`'s ``causal``, ``window_size``, ``softcap``,
    ``alibi_slopes`` (``[H]`` or ``[B, H]``), ``deterministic``."""
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,), device=q.device)
    check_tensor("v", v, ndim=4, dtypes=(q.dtype,), device=q.device)
    batch, n_q, heads, head_dim = q.shape
    n_k = k.shape[1]
    if k.shape[0] != batch or v.shape[:2] != k.shape[:2]:
        raise ValueError(f"k, v: expected [{batch}, Nk, H_kv, Dh] with the batch of q, got k {list(k.shape)}, "
                         f"v {list(v.shape)}")
    offsets = torch.arange(batch + 1, device=q.device, dtype=torch.int32)
    cu_q, cu_k = offsets * n_q, offsets * n_k
    result = varlen_attention(
        q.reshape(batch * n_q, heads, head_dim), k.reshape(batch * n_k, *k.shape[2:]),
        v.reshape(batch * n_k, *v.shape[2:]), cu_q, cu_k, n_q, n_k,
        softmax_scale=softmax_scale, return_lse=return_lse, **options,
    )
    if not return_lse:
        return result.view(batch, n_q, heads, head_dim)
    out, lse = result
    return out.view(batch, n_q, heads, head_dim), lse.view(heads, batch, n_q).transpose(0, 1)


def block_diagonal_attention(query, key, value, attn_bias, p: float = 0.0, scale: Optional[float] = None):
    """Drop-in for ``xformers.ops.memory_efficient_attention`` with an xformers
    ``BlockDiagonalMask``: ``query [1, total_q, H, Dh]``, ``key, value [1,
    total_k, H_kv, Dh]``; returns ``[1, total_q, H, Dh]``. Needs xformers only
    for the mask class; causal and padded mask variants are rejected."""
    try:
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask
    except ImportError as exc:
        raise ModuleNotFoundError("block_diagonal_attention needs xformers (pip install xformers)") from exc
    if type(attn_bias) is not BlockDiagonalMask:
        raise ValueError(f"attn_bias: expected an xformers BlockDiagonalMask, got {type(attn_bias).__name__}")
    if p != 0.0:
        raise ValueError(f"p: dropout is not supported, got p={p}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, t, ndim=4)
        if t.shape[0] != 1:
            raise ValueError(f"{name}: a block-diagonal batch is one packed sequence, expected [1, total, H, Dh], "
                             f"got {list(t.shape)}")
    q_info, k_info = attn_bias.q_seqinfo, attn_bias.k_seqinfo
    out = varlen_attention(
        query[0], key[0], value[0],
        q_info.seqstart.to(device=query.device, dtype=torch.int32),
        k_info.seqstart.to(device=query.device, dtype=torch.int32),
        q_info.max_seqlen, k_info.max_seqlen, softmax_scale=scale,
    )
    return out[None]


# ---------------------------------------------------------------------------
# Static GPU report
# ---------------------------------------------------------------------------

# 80 and 96 run masked in the 128-wide tile, 256 in its own.
REPORT_HEAD_DIMS = (64, 80, 96, 128, 256)
# The score-modifier variants (causal/local windows, soft cap, ALiBi) add
# registers to every tile: reported at the 16-bit fast path's head dims.
REPORT_MOD_HEAD_DIMS = (64, 128)
_NO_MODS = dict.fromkeys(_MOD_FLAGS, False)
_ALL_MODS = dict.fromkeys(_MOD_FLAGS, True)
# Pointer arguments that are float32 whatever the input dtype, and float scalars.
_FP32_POINTERS = ("lse_ptr", "delta_ptr", "glse_ptr", "alibi_ptr")
_FLOAT_SCALARS = ("qk_scale", "softmax_scale", "softcap")


def _signature(fn, ty: str, constexprs: dict) -> dict:
    """Triton types of a kernel's arguments, read off its own parameter list
    (so the report cannot drift from the kernel): offsets are int32, the
    statistics float32, other pointers the input dtype, the rest i32."""
    def kind(name):
        if name in constexprs:
            return "constexpr"
        if name.startswith("cu_"):
            return "*i32"
        if name in _FP32_POINTERS:
            return "*fp32"
        if name.endswith("_ptr"):
            return f"*{ty}"
        return "fp32" if name in _FLOAT_SCALARS else "i32"
    return {name: kind(name) for name in fn.arg_names}


def _tile_specs(dtype, head_dim, mods: dict, suffix: str):
    ty = TRITON_DTYPE[dtype]
    base = {"HEAD_DIM": head_dim, "BLOCK_D": block_d_for(head_dim), "DOT_PRECISION": _dot_precision(dtype)} | mods
    for kernel, fn in (("fwd", _attn_fwd), ("dkdv", _attn_bwd_dkdv), ("dq", _attn_bwd_dq)):
        for config in configs_for(kernel, head_dim, dtype, any(mods.values())):
            constexprs = base | config.kwargs
            tile = f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']}w{config.num_warps}"
            yield CompileSpec(
                f"varlen_attention_{kernel}{suffix}[{ty},d{head_dim},{tile}]", fn,
                _signature(fn, ty, constexprs), constexprs,
                num_warps=config.num_warps, num_stages=config.num_stages,
                # fp32's small tiles miss Hopper's 64-row MMA (mma.sync instead).
                tensor_cores=dtype != torch.float32,
            )


def compile_specs():
    specs = []
    for dtype in FLOAT_DTYPES:
        ty = TRITON_DTYPE[dtype]
        for head_dim in REPORT_HEAD_DIMS:
            if dtype == torch.float32 and head_dim > 128:
                continue  # spills, as _FP32_CONFIGS says: not a GPU fast path
            specs.extend(_tile_specs(dtype, head_dim, _NO_MODS, ""))
            if dtype != torch.float32 and head_dim in REPORT_MOD_HEAD_DIMS:
                specs.extend(_tile_specs(dtype, head_dim, _ALL_MODS, "_mods"))
            constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": block_d_for(head_dim), "BLOCK_M": PREPROCESS_BLOCK_M,
                          "HAS_GLSE": False}
            specs.append(CompileSpec(
                f"varlen_attention_bwd_preprocess[{ty},d{head_dim}]", _attn_bwd_preprocess,
                _signature(_attn_bwd_preprocess, ty, constexprs), constexprs,
            ))
    return specs
