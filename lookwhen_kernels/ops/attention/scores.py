"""Triton helpers shared by the attention kernels: the query tile of a
program, row loads and FlashAttention's score modifiers (window masks, soft
cap, ALiBi)."""
import math

import triton
import triton.language as tl

from lookwhen_kernels.ops._common import split_program_id

# Globals a kernel reads must be constexpr.
LOG2E = tl.constexpr(math.log2(math.e))
LN2 = tl.constexpr(math.log(2.0))


@triton.jit
def query_block(cu_q_ptr, cu_k_ptr, n_seqs, group, max_seqlen_q, BLOCK_M: tl.constexpr):
    """The query tile a program of the forward or dq kernel owns: its block
    index, query head and kv head, and its sequence's query and key ranges."""
    block_m, rest = split_program_id(tl.cdiv(max_seqlen_q, BLOCK_M))
    seq = rest % n_seqs
    head = rest // n_seqs
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    k_start = tl.load(cu_k_ptr + seq)
    k_len = tl.load(cu_k_ptr + seq + 1) - k_start
    return block_m, seq, head, head // group, q_start, q_len, k_start, k_len


@triton.jit
def load_rows(base, rows, n_rows, row_stride, offs_d, HEAD_DIM: tl.constexpr):
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
def mod_scores(qk, rows, cols, q_len, k_len, qk_scale, softcap, slope, window_left, window_right,
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
def key_range(first_row, n_rows, q_len, k_len, window_left, window_right, BLOCK_N: tl.constexpr,
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
