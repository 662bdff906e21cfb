"""lookwhen_kernels: fused Triton ops for token-selection video transformers.

CUDA tensors run the Triton kernels; CPU tensors run the PyTorch reference,
or the Triton kernels through Triton's interpreter when ``TRITON_INTERPRET=1``.
Every op is also registered as ``torch.ops.lookwhen.<name>``.
"""
from lookwhen_kernels.flash_attn_interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from lookwhen_kernels.ops._common import deterministic, set_cpu_backend, set_deterministic
from lookwhen_kernels.ops.budgets_from_scores import budgets_from_scores
from lookwhen_kernels.ops.frame_normalize import frame_normalize
from lookwhen_kernels.ops.gather_patch_embed import gather_patch_embed
from lookwhen_kernels.ops.gather_tokens import gather_tokens, scatter_tokens
from lookwhen_kernels.ops.nn_uniqueness import nn_uniqueness
from lookwhen_kernels.ops.perturbed_topk import perturbed_topk
from lookwhen_kernels.ops.score_tokens import score_tokens
from lookwhen_kernels.ops.static_tokens import static_tokens
from lookwhen_kernels.ops.select_frames import select_frames
from lookwhen_kernels.ops.select_windows import select_windows
from lookwhen_kernels.ops.selection import keep_ratio_to_k, sub_grid_map, upsample_scores
from lookwhen_kernels.ops.topk_tokens import topk_tokens, topk_tokens_budgets
from lookwhen_kernels.ops.attention import block_diagonal_attention, dense_attention, varlen_attention

__all__ = [
    "block_diagonal_attention",
    "budgets_from_scores",
    "dense_attention",
    "deterministic",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "frame_normalize",
    "gather_patch_embed",
    "gather_tokens",
    "keep_ratio_to_k",
    "nn_uniqueness",
    "perturbed_topk",
    "scatter_tokens",
    "score_tokens",
    "select_frames",
    "select_windows",
    "set_cpu_backend",
    "set_deterministic",
    "static_tokens",
    "sub_grid_map",
    "topk_tokens",
    "topk_tokens_budgets",
    "upsample_scores",
    "varlen_attention",
]
__version__ = "0.1.0"
