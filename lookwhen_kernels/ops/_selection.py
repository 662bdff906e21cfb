"""Triton helpers shared by the selection strategies built on topk_tokens'
exact, sort-free top-K (perturbed_topk, select_frames)."""
from __future__ import annotations

import triton
import triton.language as tl

from lookwhen_kernels.ops.topk_tokens import _kth_largest_key


@triton.jit
def take_top_k(key, valid, k):
    """Which entries are among the ``k`` largest order keys (ties to the
    lower index) and each taken entry's output slot: its rank among the
    taken ones in ascending index order."""
    kth = _kth_largest_key(key, valid, k)
    above = valid & (key > kth)
    tied = valid & (key == kth)
    free_slots = k - tl.sum(above.to(tl.int32), axis=0)
    take = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= free_slots))
    return take, tl.cumsum(take.to(tl.int32), axis=0) - 1
