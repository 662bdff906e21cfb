"""Triton helpers shared by the selection strategies built on topk_tokens'
exact, sort-free top-K (perturbed_topk, select_frames), and their input checks."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lookwhen_kernels.ops._common import FLOAT_DTYPES, check_tensor
from lookwhen_kernels.ops.topk_tokens import _kth_largest_key, _resolve_grids


def check_scores_on_grid(op: str, scores: torch.Tensor, grid, out_grid):
    """The checks of a strategy that reads 2-d scores on a token grid
    (select_frames, select_windows): ``(grid, out_grid)`` resolved."""
    check_tensor("scores", scores, ndim=2, dtypes=FLOAT_DTYPES, contiguous=True)
    if scores.shape[1] == 0:
        raise ValueError("scores: expected at least one token per clip (dimension 1 is 0)")
    if grid is None:
        raise ValueError(f"grid: {op} needs the (T, h, w) token grid of the scores")
    return _resolve_grids(scores.shape[1], grid, out_grid)


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
