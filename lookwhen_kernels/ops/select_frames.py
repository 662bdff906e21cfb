"""``select_frames``: the frames of a clip with the highest total score
(Uni-AdaFocus's temporal policy as a hard selection).

One program owns one clip: it adds each frame's scores (fp32, chunk-wise),
keeps the ``n_frames`` largest totals with the selection core's exact top-K (ties
to the lower frame) and writes all token ids of the chosen frames, frame
after frame, so they come out ascending.

Composable: the chosen frames' scores are ``scores.gather(1, ids)`` on the
grid ``(n_frames, h, w)``; windows or a top-K within them give ids local to
that sub-clip, and ``frame_ids.gather(1, local)`` maps them back (on the fine
grid, gather from ``select_frames(..., out_grid=...)``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from lookwhen_kernels import reference
from lookwhen_kernels.ops._common import (
    CompileSpec,
    FLOAT_DTYPES,
    TRITON_DTYPE,
    check_int,
    check_int32,
    checks_values,
    cpu_dispatch,
    next_power_of_2,
    use_triton,
    wrap_triton,
)
from lookwhen_kernels.ops.selection import check_scores_on_grid, order_key, take_top_k

CHUNK = 1024
# Frames are lanes of one block of totals.
MAX_FRAMES = 1024


@triton.jit
def _select_frames_kernel(
    scores_ptr, out_ptr, frames, plane_in, plane_out, n_keep,
    FRAME_BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    clip = tl.program_id(0)
    lanes = tl.arange(0, FRAME_BLOCK)
    offs = tl.arange(0, CHUNK)
    clip_scores = scores_ptr + clip.to(tl.int64) * frames * plane_in
    totals = tl.zeros([FRAME_BLOCK], dtype=tl.float32)
    for f in range(frames):
        acc = tl.zeros([CHUNK], dtype=tl.float32)
        for start in range(0, plane_in, CHUNK):
            ids = start + offs
            acc += tl.load(clip_scores + f * plane_in + ids, mask=ids < plane_in, other=0.0).to(tl.float32)
        totals = tl.where(lanes == f, tl.sum(acc, axis=0), totals)
    take, slot = take_top_k(order_key(totals), lanes < frames, n_keep)
    out = out_ptr + clip.to(tl.int64) * n_keep * plane_out
    for f in range(frames):
        here = lanes == f
        if tl.sum((here & take).to(tl.int32), axis=0) > 0:
            dest = out + tl.sum(tl.where(here, slot, 0), axis=0) * plane_out
            for start in range(0, plane_out, CHUNK):
                ids = start + offs
                tl.store(dest + ids, f * plane_out + ids, mask=ids < plane_out)


def _reference(scores, n_frames, grid, out_grid):
    return reference.select_frames(scores, n_frames, grid=grid, out_grid=out_grid)


@triton_op("lookwhen::select_frames", mutates_args=())
def _select_frames(scores: torch.Tensor, n_frames: int, grid: List[int], out_grid: List[int]) -> torch.Tensor:
    if not use_triton(scores):
        return cpu_dispatch(None, (scores, n_frames, grid, out_grid), _reference)
    frames, h, w = grid
    plane_out = out_grid[1] * out_grid[2]
    out = torch.empty((scores.shape[0], n_frames * plane_out), device=scores.device, dtype=torch.int32)
    if out.numel():
        wrap_triton(_select_frames_kernel)[(scores.shape[0],)](
            scores, out, frames, h * w, plane_out, n_frames,
            FRAME_BLOCK=next_power_of_2(frames), CHUNK=CHUNK, num_warps=4,
        )
    return out


def select_frames(
    scores: torch.Tensor,
    n_frames: int,
    *,
    grid: Sequence[int],
    out_grid: Optional[Sequence[int]] = None,
    validate: bool = True,
) -> torch.Tensor:
    """The ``n_frames`` frames with the highest total score (fp32 sums of
    ``scores [B, T*h*w]`` on ``grid = (T, h, w)``; ties to the lower frame),
    as the ids of all their tokens: int32 ``[B, n_frames*h*w]`` ascending, or
    on ``out_grid = (T, H, W)`` when given (the same frames, ids of the fine
    grid). ``validate=True`` refuses non-finite scores (a host read: a frame
    holding +inf and -inf has no total). Not differentiable.
    """
    grid, out_grid = check_scores_on_grid("select_frames", scores, grid, out_grid)
    if grid[0] > MAX_FRAMES:
        raise ValueError(f"grid: {grid[0]} frames exceed the {MAX_FRAMES} one program ranks")
    n_frames = check_int("n_frames", n_frames, 0, grid[0])
    check_int32("n_frames", scores.shape[0] * n_frames * out_grid[1] * out_grid[2], "the number of output ids")
    if checks_values(validate, scores) and not bool(torch.isfinite(scores).all()):
        raise ValueError("scores: contain non-finite values (frame totals need finite scores)")
    return _select_frames(scores, n_frames, list(grid), list(out_grid))


def compile_specs():
    # 16 frames of the 7 x 7 selector grid, ids on the 14 x 14 fine grid.
    signature = {"frames": "i32", "plane_in": "i32", "plane_out": "i32", "n_keep": "i32",
                 "FRAME_BLOCK": "constexpr", "CHUNK": "constexpr"}
    flags = {"FRAME_BLOCK": 16, "CHUNK": CHUNK}
    return [
        CompileSpec(f"select_frames[{TRITON_DTYPE[dtype]}]", _select_frames_kernel,
                    {"scores_ptr": f"*{TRITON_DTYPE[dtype]}", "out_ptr": "*i32"} | signature, flags)
        for dtype in FLOAT_DTYPES
    ]
