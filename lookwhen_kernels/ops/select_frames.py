"""``select_frames``: Uni-AdaFocus's temporal policy as a hard selection.

The policy is a softmax over frames of each frame's mean score; the chosen
frames sit at evenly spaced quantiles of its cumulative distribution, as
AdaFocus samples frames at evaluation (see
:func:`lookwhen_kernels.reference.select_frames`). The work is one
reduction over the scores and a few operations on ``[B, T]``: one PyTorch
implementation serves every device and backend, so every backend gives the
same frames (a float64 floor decides them, which separate implementations
could round apart).

Composable: the chosen frames' scores are ``scores.gather(1, ids)`` on the
grid ``(n_frames, h, w)``; windows or a top-K within them give ids local to
that sub-clip, and ``frame_ids.gather(1, local)`` maps them back (on the fine
grid, gather from ``select_frames(..., out_grid=...)``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from lookwhen_kernels import reference
from lookwhen_kernels.ops._common import check_int, check_int32, check_real, checks_values
from lookwhen_kernels.ops.selection import check_scores_on_grid


@torch.library.custom_op("lookwhen::select_frames", mutates_args=())
def _select_frames(scores: torch.Tensor, n_frames: int, grid: List[int], out_grid: List[int],
                   temperature: float = 1.0) -> torch.Tensor:
    return reference.select_frames(scores, n_frames, grid=grid, out_grid=out_grid, temperature=temperature)


@_select_frames.register_fake
def _select_frames_fake(scores, n_frames, grid, out_grid, temperature=1.0):
    return scores.new_empty((scores.shape[0], n_frames * out_grid[1] * out_grid[2]), dtype=torch.int32)


def select_frames(
    scores: torch.Tensor,
    n_frames: int,
    *,
    grid: Sequence[int],
    out_grid: Optional[Sequence[int]] = None,
    temperature: float = 1.0,
    validate: bool = True,
) -> torch.Tensor:
    """The ``n_frames`` frames Uni-AdaFocus's temporal policy picks at
    evaluation, as the ids of all their tokens: int32 ``[B,
    n_frames*h*w]`` ascending, or on ``out_grid = (T, H, W)`` when given (the
    same frames, ids of the fine grid).

    ``scores [B, T*h*w]`` on ``grid = (T, h, w)``. The policy is the softmax
    over frames of each frame's mean score over ``temperature``; frame ``i``
    sits at the quantile ``(i + 1/2) / n_frames`` of its cumulative
    distribution, read linearly within a frame and floored, then pushed past
    the frame before it and kept within the clip (AdaFocus's
    ``policy_sample_indices`` without its random offsets). Flat scores spread
    the frames evenly over the clip (8 of 16: 1, 3, ..., 15), a peaked policy
    gathers them around its peak. ``validate=True`` refuses non-finite scores
    (a host read: a frame holding +inf and -inf has no mean). Not
    differentiable.
    """
    grid, out_grid = check_scores_on_grid("select_frames", scores, grid, out_grid)
    n_frames = check_int("n_frames", n_frames, 0, grid[0])
    temperature = check_real("temperature", temperature, "(0, inf)")
    check_int32("n_frames", scores.shape[0] * n_frames * out_grid[1] * out_grid[2], "the number of output ids")
    if checks_values(validate, scores) and not bool(torch.isfinite(scores).all()):
        raise ValueError("scores: contain non-finite values (frame means need finite scores)")
    return _select_frames(scores, n_frames, list(grid), list(out_grid), temperature)
