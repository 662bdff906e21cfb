"""Plain-PyTorch implementation of every op, one module per family.

Two jobs: the test oracle (called on float64 inputs) and the CPU path (called
on the caller's dtype when Triton is not in play and no native kernel is
built). Written for clarity, not speed: each function is the contract of its
op, stated in code. Production code calls the ops, not these.

- ``selection``: top-K (fixed and per-clip budgets), perturbed top-K,
  windows, frames, budgets from scores, static tokens.
- ``patch_embed``: normalised patches and the patch embedding.
- ``features``: score head, frame normalisation, uniqueness, row
  gather/scatter.
- ``attention``: attention over packed sequences.

The score upsampling and the packed-row map are the ops' own
(:mod:`lookwhen_kernels.ops.selection`, :mod:`lookwhen_kernels.layout`),
re-exported here for the tests that build expectations from them.
"""
from lookwhen_kernels.layout import patch_rows
from lookwhen_kernels.ops.selection import sub_grid_map, upsample_scores
from lookwhen_kernels.reference.attention import (
    attention_mask,
    uses_score_mods,
    varlen_attention,
    varlen_attention_backward,
)
from lookwhen_kernels.reference.features import (
    frame_normalize,
    frame_normalize_backward,
    gather_tokens,
    nn_uniqueness,
    scatter_tokens,
    score_tokens,
    score_tokens_backward,
)
from lookwhen_kernels.reference.patch_embed import gather_patch_embed, gather_patch_embed_backward, gather_patches
from lookwhen_kernels.reference.selection import (
    budgets_from_scores,
    frame_tokens,
    pack_static_tokens,
    perturbed_topk,
    perturbed_topk_backward,
    select_frames,
    select_windows,
    static_token_mask,
    static_tokens,
    topk_tokens,
    topk_tokens_budgets,
)

__all__ = [
    "attention_mask",
    "budgets_from_scores",
    "frame_normalize",
    "frame_normalize_backward",
    "frame_tokens",
    "gather_patch_embed",
    "gather_patch_embed_backward",
    "gather_patches",
    "gather_tokens",
    "nn_uniqueness",
    "pack_static_tokens",
    "patch_rows",
    "perturbed_topk",
    "perturbed_topk_backward",
    "scatter_tokens",
    "score_tokens",
    "score_tokens_backward",
    "select_frames",
    "select_windows",
    "static_token_mask",
    "static_tokens",
    "sub_grid_map",
    "topk_tokens",
    "topk_tokens_budgets",
    "upsample_scores",
    "uses_score_mods",
    "varlen_attention",
    "varlen_attention_backward",
]
