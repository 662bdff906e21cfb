"""From tensors to topk_tokens' kernel launches."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from lookwhen_kernels.ops._common import next_power_of_2, wrap_triton
from lookwhen_kernels.ops.selection import MAX_SUB_GRID_TOKENS, MAX_TOKENS, clip_num_warps, sub_grid
from lookwhen_kernels.ops.topk_tokens.kernels import CHUNK, LOOPED_WARPS, topk_kernel, topk_looped_kernel


def register_limit(sub: int) -> int:
    """The most fine tokens per clip the register kernel holds (3-d scores
    with ``sub = r > 1`` hold more address arithmetic per score)."""
    return MAX_TOKENS if sub == 1 else MAX_SUB_GRID_TOKENS


def launch_config(n_out: int) -> Tuple[int, int]:
    """BLOCK and num_warps of the register kernel."""
    return next_power_of_2(n_out), clip_num_warps(n_out)


def select_into(
    scores: torch.Tensor,
    out: torch.Tensor,
    grid: Sequence[int],
    out_grid: Sequence[int],
    k: int = 0,
    budgets: Optional[torch.Tensor] = None,
    offsets: Optional[torch.Tensor] = None,
) -> None:
    """Write the selection of every clip into ``out`` (``[B, k]``, or packed
    with ``budgets`` and their ``offsets``)."""
    batch = scores.shape[0]
    n_in = scores[0].numel() if batch else 0
    sub = sub_grid(scores)
    frames, h, w = grid
    _, out_h, out_w = out_grid
    n_out = frames * out_h * out_w
    if batch == 0 or out.numel() == 0:
        return
    per_clip = budgets is not None
    # With a fixed k the budget and offset pointers are never read; any int32
    # tensor fills the slots.
    args = (scores, budgets if per_clip else out, offsets if per_clip else out, out)
    sizes = (n_in, n_out, k, out.numel(), h, w, out_h, out_w, sub * h / out_h, sub * w / out_w)
    # Sub-grid scores always take the upsampling path: at the same size it is
    # the identity (weights 1 and 0) and it holds the rearrangement.
    flags = {"UPSAMPLE": sub > 1 or tuple(grid) != tuple(out_grid), "PER_CLIP": per_clip, "SUB": sub}
    if n_out > register_limit(sub):
        keys = torch.empty((batch, n_out), device=scores.device, dtype=torch.int32)
        wrap_triton(topk_looped_kernel)[(batch,)](*args, keys, *sizes, **flags, CHUNK=CHUNK, num_warps=LOOPED_WARPS)
        return
    block, num_warps = launch_config(n_out)
    wrap_triton(topk_kernel)[(batch,)](*args, *sizes, **flags, BLOCK=block, num_warps=num_warps)
