"""Scores on a coarse token grid, bilinearly upsampled per frame to a fine
one (``F.interpolate(mode="bilinear", align_corners=False)``): Triton helpers
that read the upsampled scores straight from the coarse grid (never stored),
and the same map in PyTorch.

3-d scores ``[B, n, r*r]`` (LookWhere's head) hold r x r logits per coarse
token of ``(T, h, w)``; they lie on the r-times finer map ``(T, h*r, w*r)``:
logit ``a*r + b`` of token ``(t, i, j)`` is its ``(t, i*r + a, j*r + b)``.
"""
import math

import torch
import triton
import triton.language as tl

from lookwhen_kernels.ops._common import work_dtype


@triton.jit
def sub_grid_score(base, y, x, w, valid, SUB: tl.constexpr):
    """Score ``(y, x)`` of a frame's score map. SUB = 1: the map is the
    coarse grid itself. SUB = r: each coarse token (i, j) holds its r x r
    logits at ``[token, a*r + b]``, the map's (i*r + a, j*r + b) (LookWhere's
    rearrange "(h w) (i j) -> (h i) (w j)"): the map is never materialised."""
    if SUB == 1:
        ptr = base + y * w + x
    else:
        i = y // SUB
        j = x // SUB
        ptr = base + (i * w + j) * (SUB * SUB) + (y - i * SUB) * SUB + (x - j * SUB)
    return tl.load(ptr, mask=valid, other=0.0).to(tl.float32)


@triton.jit
def upsampled_scores(
    coarse_ptr, ids, valid, h, w, out_h, out_w, scale_h, scale_w, SUB: tl.constexpr,
):
    """Fine scores (fp32) of the fine token ids ``ids`` of one clip, from the
    ``(SUB*h) x (SUB*w)`` score map of each frame at ``coarse_ptr``, with
    PyTorch's source-index rule and its order of the weighted sums."""
    if SUB == 1:
        map_h = h
        map_w = w
    else:
        map_h = h * SUB
        map_w = w * SUB
    plane = out_h * out_w
    frame = ids // plane
    rest = ids - frame * plane
    row = rest // out_w
    col = rest - row * out_w
    y = tl.maximum(scale_h * (row.to(tl.float32) + 0.5) - 0.5, 0.0)
    x = tl.maximum(scale_w * (col.to(tl.float32) + 0.5) - 0.5, 0.0)
    # y, x >= 0, so truncation is floor; the clamp keeps addresses in the frame.
    y0 = tl.minimum(y.to(tl.int32), map_h - 1)
    x0 = tl.minimum(x.to(tl.int32), map_w - 1)
    ly = y - y0.to(tl.float32)
    lx = x - x0.to(tl.float32)
    y1 = y0 + (y0 < map_h - 1).to(tl.int32)
    x1 = x0 + (x0 < map_w - 1).to(tl.int32)
    base = coarse_ptr + frame * (map_h * map_w)
    v00 = sub_grid_score(base, y0, x0, w, valid, SUB)
    v01 = sub_grid_score(base, y0, x1, w, valid, SUB)
    v10 = sub_grid_score(base, y1, x0, w, valid, SUB)
    v11 = sub_grid_score(base, y1, x1, w, valid, SUB)
    return (1.0 - ly) * ((1.0 - lx) * v00 + lx * v01) + ly * ((1.0 - lx) * v10 + lx * v11)


def sub_grid_map(scores: torch.Tensor, grid) -> torch.Tensor:
    """3-d scores ``[B, n, r*r]`` on the coarse ``grid=(T, h, w)`` -> the
    r-times finer map ``[B, T*(h*r)*(w*r)]``: logit ``a*r + b`` of token
    ``(t, i, j)`` goes to ``(t, i*r + a, j*r + b)`` (LookWhere's rearrange
    ``"(h w) (i j) -> (h i) (w j)"``, per frame)."""
    batch, _, outputs = scores.shape
    frames, h, w = grid
    r = math.isqrt(outputs)
    cells = scores.reshape(batch, frames, h, w, r, r).permute(0, 1, 2, 4, 3, 5)
    return cells.reshape(batch, frames * h * r * w * r)


def upsample_scores(scores: torch.Tensor, grid, out_grid) -> torch.Tensor:
    """``[B, T*h*w]`` -> ``[B, T*H*W]``: every frame bilinearly resized from
    ``h x w`` to ``H x W`` (``align_corners=False``), in at least float32.
    3-d scores ``[B, n, r*r]`` are first laid onto their ``(T, h*r, w*r)``
    map (:func:`sub_grid_map`), which is then resized."""
    work = scores.to(work_dtype(scores.dtype))
    if scores.dim() == 3:
        r = math.isqrt(scores.shape[2])
        work = sub_grid_map(work, grid)
        grid = (grid[0], grid[1] * r, grid[2] * r)
    if tuple(grid) == tuple(out_grid):
        return work
    frames, h, w = grid
    _, out_h, out_w = out_grid
    planes = work.reshape(scores.shape[0], frames, h, w)
    fine = torch.nn.functional.interpolate(planes, size=(out_h, out_w), mode="bilinear", align_corners=False)
    return fine.reshape(scores.shape[0], frames * out_h * out_w)
