"""What every selection op shares (topk_tokens, budgets_from_scores,
perturbed_topk, select_frames, select_windows, static_tokens): the exact,
sort-free selection on order keys, the bilinear upsampling of scores from a
coarse grid, grid resolution, the per-clip limits and launch sizes.

- ``keys``: Triton helpers, order keys and the bitwise K-th largest.
- ``upsample``: Triton helpers reading upsampled scores straight from the
  coarse grid, and the same upsampling in PyTorch, differentiable (for
  callers that need the fine scores themselves, such as the model's
  perturbed top-K; the reference shares it).
- ``grids``: host-side checks and sizes (grids, budgets, keep ratios,
  limits, warps per clip).
"""
from lookwhen_kernels.ops.selection.grids import (
    MAX_SUB_GRID_TOKENS,
    MAX_TOKENS,
    check_budgets,
    check_finite_scores,
    check_grid,
    check_scores_on_grid,
    clip_num_warps,
    keep_ratio_to_k,
    resolve_grids,
    sub_grid,
)
from lookwhen_kernels.ops.selection.keys import kth_largest_key, order_key, take_top_k
from lookwhen_kernels.ops.selection.upsample import sub_grid_map, sub_grid_score, upsample_scores, upsampled_scores

__all__ = [
    "MAX_SUB_GRID_TOKENS",
    "MAX_TOKENS",
    "check_budgets",
    "check_finite_scores",
    "check_grid",
    "check_scores_on_grid",
    "clip_num_warps",
    "keep_ratio_to_k",
    "kth_largest_key",
    "order_key",
    "resolve_grids",
    "sub_grid",
    "sub_grid_map",
    "sub_grid_score",
    "take_top_k",
    "upsample_scores",
    "upsampled_scores",
]
