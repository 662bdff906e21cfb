"""``select_windows``: per frame, the ``h x w`` window of tokens with the
largest summed score (Uni-AdaFocus's one informative patch per frame, on the
token grid).

One program owns one frame of one clip. Every candidate top-left corner is a
lane; the box filter adds the window's scores lane-wise (``dy`` outer, ``dx``
inner, in fp32, the order the reference uses, so equal inputs give equal sums),
reading the scores straight from the coarse grid through the selection core's
bilinear upsampling when an ``out_grid`` is given. ``tl.argmax`` with its
left tie-break picks the lowest top-left index, and the window's ids are
written row by row, so they come out ascending.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

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
    checks_values,
    cpu_dispatch,
    next_power_of_2,
    use_triton,
    wrap_triton,
)
from lookwhen_kernels.ops.selection import MAX_TOKENS, check_scores_on_grid, upsampled_scores


@triton.jit
def _select_windows_kernel(
    scores_ptr, out_ptr,
    n_in, h, w, out_h, out_w, scale_h, scale_w, win_h, win_w,
    UPSAMPLE: tl.constexpr, BLOCK: tl.constexpr, WIN_BLOCK: tl.constexpr,
):
    clip = tl.program_id(0)
    frame = tl.program_id(1)
    frames = tl.num_programs(1)
    plane = out_h * out_w
    pos = tl.arange(0, BLOCK)
    row = pos // out_w
    col = pos - row * out_w
    corner = (row <= out_h - win_h) & (col <= out_w - win_w)
    clip_scores = scores_ptr + clip.to(tl.int64) * n_in
    first = frame * plane + pos
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for dy in range(win_h):
        for dx in range(win_w):
            ids = first + dy * out_w + dx
            if UPSAMPLE:
                total += upsampled_scores(clip_scores, ids, corner, h, w, out_h, out_w, scale_h, scale_w, 1)
            else:
                total += tl.load(clip_scores + ids, mask=corner, other=0.0).to(tl.float32)
    # Unchecked NaN (validate=False) ranks first, as torch.argmax ranks it.
    holds_nan = corner & (total != total)
    best = tl.argmax(tl.where(corner & ~holds_nan, total, float("-inf")), axis=0, tie_break_left=True)
    first_nan = tl.argmax(holds_nan.to(tl.int32), axis=0, tie_break_left=True)
    best = tl.where(tl.max(holds_nan.to(tl.int32), axis=0) > 0, first_nan, best)
    r = tl.arange(0, WIN_BLOCK)
    size = win_h * win_w
    dy = r // win_w
    ids = frame * plane + best + dy * out_w + (r - dy * win_w)
    tl.store(out_ptr + (clip.to(tl.int64) * frames + frame) * size + r, ids, mask=r < size)


def _launch_config(plane: int, size: int) -> Tuple[int, int, int]:
    block = next_power_of_2(plane)
    return block, next_power_of_2(size), max(1, min(16, block // 256))


def _reference(scores, window, grid, out_grid):
    return reference.select_windows(scores, window, grid=grid, out_grid=out_grid)


@triton_op("lookwhen::select_windows", mutates_args=())
def _select_windows(scores: torch.Tensor, window: List[int], grid: List[int], out_grid: List[int]) -> torch.Tensor:
    if not use_triton(scores):
        return cpu_dispatch(None, (scores, window, grid, out_grid), _reference)
    batch, n_in = scores.shape
    frames, h, w = grid
    _, out_h, out_w = out_grid
    win_h, win_w = window
    out = torch.empty((batch, frames * win_h * win_w), device=scores.device, dtype=torch.int32)
    if batch:
        block, win_block, num_warps = _launch_config(out_h * out_w, win_h * win_w)
        wrap_triton(_select_windows_kernel)[(batch, frames)](
            scores, out, n_in, h, w, out_h, out_w, h / out_h, w / out_w, win_h, win_w,
            UPSAMPLE=tuple(grid) != tuple(out_grid), BLOCK=block, WIN_BLOCK=win_block, num_warps=num_warps,
        )
    return out


def check_window(window, out_grid) -> Tuple[int, int]:
    """``window`` as ``(h, w)`` tokens of the output grid (an int is square)."""
    pair = window if isinstance(window, (tuple, list)) else (window, window)
    try:
        if len(pair) != 2:
            raise ValueError
        pair = tuple(check_int("window", v, 1) for v in pair)
    except ValueError:
        raise ValueError(f"window: expected a positive int or two (h, w), got {window!r}") from None
    if pair[0] > out_grid[1] or pair[1] > out_grid[2]:
        raise ValueError(f"window: {tuple(pair)} does not fit the {out_grid[1]} x {out_grid[2]} token frame")
    return int(pair[0]), int(pair[1])


def select_windows(
    scores: torch.Tensor,
    window,
    *,
    grid: Sequence[int],
    out_grid: Optional[Sequence[int]] = None,
    validate: bool = True,
) -> torch.Tensor:
    """Per frame, the ids of the ``window = (h, w)`` tokens (an int: square)
    whose scores sum highest; ties go to the lowest top-left index.

    ``scores [B, T*h*w]`` (fp16, bf16 or fp32, contiguous) on ``grid = (T,
    h, w)``. With ``out_grid = (T, H, W)`` the scores are first bilinearly
    upsampled per frame as in :func:`topk_tokens` and the window and ids
    refer to the fine grid (one frame of at most ``MAX_TOKENS`` tokens).
    Returns int32 ``[B, T*h*w_window]``, ascending (frame after frame, each
    window row by row): the fixed-budget selection contract. Window sums are
    formed in fp32. ``validate=True`` refuses non-finite scores (a host read:
    a window holding +inf and -inf has no sum). Not differentiable.
    """
    grid, out_grid = check_scores_on_grid("select_windows", scores, grid, out_grid)
    if out_grid[1] * out_grid[2] > MAX_TOKENS:
        raise ValueError(f"out_grid: a frame of {out_grid[1] * out_grid[2]} tokens exceeds {MAX_TOKENS}")
    window = check_window(window, out_grid)
    if checks_values(validate, scores) and not bool(torch.isfinite(scores).all()):
        raise ValueError("scores: contain non-finite values (window sums need finite scores)")
    return _select_windows(scores, list(window), list(grid), list(out_grid))


def compile_specs():
    # The 2x scaled-down selector grid of 16 frames at 224 px (7 x 7 coarse
    # tokens) upsampled to the 14 x 14 fine frame, with a 7 x 7 window (a
    # quarter of the frame, AdaFocus's patch size); and the window taken on the
    # coarse grid directly.
    specs = []
    scalars = {"n_in": "i32", "h": "i32", "w": "i32", "out_h": "i32", "out_w": "i32", "scale_h": "fp32",
               "scale_w": "fp32", "win_h": "i32", "win_w": "i32"}
    for mode, (plane, upsample) in {"upsample": (196, True), "direct": (196, False)}.items():
        block, win_block, num_warps = _launch_config(plane, 49)
        flags = {"UPSAMPLE": upsample, "BLOCK": block, "WIN_BLOCK": win_block}
        for dtype in FLOAT_DTYPES:
            ty = TRITON_DTYPE[dtype]
            specs.append(CompileSpec(
                f"select_windows[{ty},{mode}]", _select_windows_kernel,
                {"scores_ptr": f"*{ty}", "out_ptr": "*i32"} | scalars | {name: "constexpr" for name in flags},
                flags, num_warps=num_warps,
            ))
    return specs
