"""Host-side pieces of the selection ops: token grids, budgets, keep
ratios, the per-clip limits and the warps a one-clip program runs with."""
from __future__ import annotations

import math
from typing import Tuple

import torch

from lookwhen_kernels.ops._common import FLOAT_DTYPES, check_int, check_tensor, checks_values, next_power_of_2

# One clip's fine scores live in one program's registers up to 8192 tokens
# (8 frames of a 32 x 32 patch grid; 16 frames at 224 px are 3136).
MAX_TOKENS = 8192
# Sub-grid scores (3-d, r > 1) hold more address arithmetic per score: half
# the register limit keeps them spill-free.
MAX_SUB_GRID_TOKENS = MAX_TOKENS // 2

Grid = Tuple[int, int, int]


def clip_num_warps(n: int) -> int:
    """Warps of a program that holds one clip's ``n`` scores in registers: 8
    per thread up to 16 warps. Upsampling holds about 10 registers per score,
    so MAX_TOKENS (16 per thread) just fits the 128 registers a 512-thread
    program may use; 32 warps would cap them at 64 and spill."""
    return max(4, min(16, next_power_of_2(n) // 256))


def sub_grid(scores: torch.Tensor) -> int:
    """r of 3-d scores ``[B, n, r*r]`` (1 for 2-d scores)."""
    return 1 if scores.dim() == 2 else math.isqrt(scores.shape[2])


def check_grid(name: str, grid) -> Grid:
    """``grid`` as three positive ints ``(T, h, w)``."""
    if not isinstance(grid, (tuple, list)) or len(grid) != 3:
        raise ValueError(f"{name}: expected three positive ints (T, h, w), got {grid!r}")
    try:
        return tuple(check_int(name, g, low=1) for g in grid)
    except ValueError:
        raise ValueError(f"{name}: expected three positive ints (T, h, w), got {grid!r}") from None


def resolve_grids(n: int, grid, out_grid, sub: int = 1) -> Tuple[Grid, Grid]:
    """``(grid, out_grid)`` of ``n`` scores per clip (tokens, for 3-d scores
    with ``sub = r``): no grid means one frame of one row; no ``out_grid``
    means the score map itself (no upsampling)."""
    if grid is None:
        if sub > 1:
            raise ValueError("grid: 3-d scores [B, n, r*r] need grid, the coarse (T, h, w) of their tokens")
        if out_grid is not None:
            raise ValueError("out_grid: needs grid (the coarse (T, h, w) of the scores) as well")
        return (1, 1, n), (1, 1, n)
    grid = check_grid("grid", grid)
    if math.prod(grid) != n:
        what = "tokens" if sub > 1 else "scores"
        raise ValueError(f"grid: T*h*w = {math.prod(grid)} does not match the {n} {what} per clip")
    if out_grid is None:
        return grid, (grid[0], grid[1] * sub, grid[2] * sub)
    out_grid = check_grid("out_grid", out_grid)
    if out_grid[0] != grid[0]:
        raise ValueError(f"out_grid: must keep the {grid[0]} frames of grid, got T={out_grid[0]}")
    return grid, out_grid


def check_scores_on_grid(op: str, scores: torch.Tensor, grid, out_grid) -> Tuple[Grid, Grid]:
    """The checks of a strategy that reads 2-d scores on a token grid
    (select_frames, select_windows): ``(grid, out_grid)`` resolved."""
    check_tensor("scores", scores, ndim=2, dtypes=FLOAT_DTYPES, contiguous=True)
    if scores.shape[1] == 0:
        raise ValueError("scores: expected at least one token per clip (dimension 1 is 0)")
    if grid is None:
        raise ValueError(f"grid: {op} needs the (T, h, w) token grid of the scores")
    return resolve_grids(scores.shape[1], grid, out_grid)


def check_finite_scores(scores: torch.Tensor, upsample: bool, validate: bool) -> None:
    """Refuse NaN scores, and infinite ones when upsampling (a zero
    interpolation weight times inf is NaN): a host read, under ``validate``."""
    if checks_values(validate, scores) and bool((~torch.isfinite(scores) if upsample else torch.isnan(scores)).any()):
        kind = "non-finite values (upsampling needs finite scores)" if upsample else "NaN"
        raise ValueError(f"scores: contain {kind}")


def check_budgets(name: str, host_budgets: torch.Tensor, n_tokens: int) -> None:
    """Every budget of a host copy lies in ``[0, n_tokens]``: the check a
    caller that passes ``validate=False`` makes at its own boundary."""
    if host_budgets.numel() and (int(host_budgets.min()) < 0 or int(host_budgets.max()) > n_tokens):
        raise ValueError(
            f"{name}: every budget must lie in [0, {n_tokens}], got values in "
            f"[{int(host_budgets.min())}, {int(host_budgets.max())}]"
        )


def keep_ratio_to_k(keep_ratio: float, n_tokens: int) -> int:
    """``max(1, round(keep_ratio * n_tokens))`` (Python's round: half to even)."""
    return max(1, round(keep_ratio * n_tokens))
