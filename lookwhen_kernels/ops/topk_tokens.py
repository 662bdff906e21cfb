"""``topk_tokens``: per-clip top-K token selection, optionally on coarse
scores bilinearly upsampled to the fine token grid.

One program owns one clip and holds all of its (fine) scores in registers: it
reads the coarse scores, upsamples them on the fly, selects and writes the
position-sorted ids, so no score ever goes back to memory between the steps.

Selection is exact and sort-free. A float maps to an int32 key with the same
order (flip the magnitude bits of negatives; -0.0 is folded into +0.0 first so
the two compare equal, as floats do). The K-th largest key is built bit by bit
from the top, 32 counting passes over the block (``count(key >= candidate) >=
K`` keeps the bit). Every key above it is taken, and of the keys equal to it
the ones with the lowest token ids fill the rest (a prefix count over the tie
mask). A prefix sum over the final selection mask then gives every chosen id
its output slot, so the output comes out in ascending token order without a
sort.
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from lookwhen_kernels import reference
from lookwhen_kernels.layout import cu_seqlens_from_lengths
from lookwhen_kernels.ops._common import (
    FLOAT_DTYPES,
    TRITON_DTYPE,
    CompileSpec,
    check_int32,
    check_shape,
    check_tensor,
    checks_values,
    native_kernel,
    next_power_of_2,
    use_triton,
)

# One clip's fine scores live in one program's registers up to 8192 tokens
# (8 frames of a 32 x 32 patch grid; 16 frames at 224 px are 3136). Larger
# clips run the looped kernel, which streams the clip in CHUNK-token pieces
# through an int32 key buffer instead.
MAX_TOKENS = 8192
CHUNK = 4096
# Sub-grid scores (3-d, r > 1) hold more address arithmetic per score: half
# the register kernel's limit keeps them spill-free.
MAX_SUB_GRID_TOKENS = MAX_TOKENS // 2


@triton.jit
def _sub_grid_score(base, y, x, w, valid, SUB: tl.constexpr):
    # Score (y, x) of the frame's score map. SUB = 1: the map is the coarse
    # grid itself. SUB = r: each coarse token (i, j) holds its r x r logits at
    # [token, a*r + b], the map's (i*r + a, j*r + b) (LookWhere's rearrange
    # "(h w) (i j) -> (h i) (w j)"): the map is never materialised.
    if SUB == 1:
        ptr = base + y * w + x
    else:
        i = y // SUB
        j = x // SUB
        ptr = base + (i * w + j) * (SUB * SUB) + (y - i * SUB) * SUB + (x - j * SUB)
    return tl.load(ptr, mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _upsampled_scores(
    coarse_ptr, ids, valid, h, w, out_h, out_w, scale_h, scale_w, SUB: tl.constexpr,
):
    # F.interpolate(mode="bilinear", align_corners=False) per frame, with
    # PyTorch's source-index rule and its order of the weighted sums, from the
    # (SUB*h) x (SUB*w) score map.
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
    v00 = _sub_grid_score(base, y0, x0, w, valid, SUB)
    v01 = _sub_grid_score(base, y0, x1, w, valid, SUB)
    v10 = _sub_grid_score(base, y1, x0, w, valid, SUB)
    v11 = _sub_grid_score(base, y1, x1, w, valid, SUB)
    return (1.0 - ly) * ((1.0 - lx) * v00 + lx * v01) + ly * ((1.0 - lx) * v10 + lx * v11)


@triton.jit
def _order_key(score):
    score = tl.where(score == 0.0, 0.0, score)
    bits = score.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _kth_largest_key(key, valid, k):
    # The answer is built in the unsigned image of the key (sign bit flipped),
    # where setting bits from the top is a bisection; each candidate is
    # compared back in the signed image. With k == 0 every bit is kept and the
    # result exceeds every finite key, so nothing is selected.
    sign = tl.full([], 1, tl.int32) << 31
    prefix = tl.zeros([], dtype=tl.int32)
    for i in range(32):
        candidate = prefix | (tl.full([], 1, tl.int32) << (31 - i))
        count = tl.sum((valid & (key >= (candidate ^ sign))).to(tl.int32), axis=0)
        prefix = tl.where(count >= k, candidate, prefix)
    return prefix ^ sign


@triton.jit
def _clip_budget(clip, budgets_ptr, offsets_ptr, k, PER_CLIP: tl.constexpr):
    """The clip's K and the offset of its first output slot."""
    if PER_CLIP:
        return tl.load(budgets_ptr + clip), tl.load(offsets_ptr + clip).to(tl.int64)
    return k, clip.to(tl.int64) * k


@triton.jit
def _topk_kernel(
    scores_ptr, budgets_ptr, offsets_ptr, out_ptr,
    n_in, n_out, k,
    h, w, out_h, out_w, scale_h, scale_w,
    UPSAMPLE: tl.constexpr, PER_CLIP: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr,
):
    clip = tl.program_id(0)
    ids = tl.arange(0, BLOCK)
    valid = ids < n_out
    clip_scores = scores_ptr + clip.to(tl.int64) * n_in
    if UPSAMPLE:
        score = _upsampled_scores(clip_scores, ids, valid, h, w, out_h, out_w, scale_h, scale_w, SUB)
    else:
        score = tl.load(clip_scores + ids, mask=valid, other=0.0).to(tl.float32)
    budget, out_base = _clip_budget(clip, budgets_ptr, offsets_ptr, k, PER_CLIP)
    key = _order_key(score)
    kth = _kth_largest_key(key, valid, budget)
    above = valid & (key > kth)
    free_slots = budget - tl.sum(above.to(tl.int32), axis=0)
    _store_selection(out_ptr + out_base, ids, key, valid, kth, free_slots, 0, 0)


@triton.jit
def _store_selection(out_ptr, ids, key, valid, kth, free_slots, tied_before, written_before):
    """Write the chosen ids of one block: every key above the K-th, and of the
    keys equal to it the first ``free_slots`` (in id order, counting the
    ``tied_before`` ties of earlier blocks), at the slots after
    ``written_before``. Returns the block's (ties, ids written)."""
    above = valid & (key > kth)
    tied = valid & (key == kth)
    take = above | (tied & (tied_before + tl.cumsum(tied.to(tl.int32), axis=0) <= free_slots))
    slot = written_before + tl.cumsum(take.to(tl.int32), axis=0) - 1
    tl.store(out_ptr + slot, ids, mask=take)
    return tl.sum(tied.to(tl.int32), axis=0), tl.sum(take.to(tl.int32), axis=0)


@triton.jit
def _topk_looped_kernel(
    scores_ptr, budgets_ptr, offsets_ptr, out_ptr, keys_ptr,
    n_in, n_out, k,
    h, w, out_h, out_w, scale_h, scale_w,
    UPSAMPLE: tl.constexpr, PER_CLIP: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr,
):
    # The same selection as _topk_kernel, for clips past the register limit:
    # one pass writes the clip's order keys to ``keys_ptr [B, n_out]``, the
    # 32 counting passes and the selection stream them back chunk by chunk.
    clip = tl.program_id(0)
    clip_scores = scores_ptr + clip.to(tl.int64) * n_in
    clip_keys = keys_ptr + clip.to(tl.int64) * n_out
    for start in range(0, n_out, CHUNK):
        ids = start + tl.arange(0, CHUNK)
        valid = ids < n_out
        if UPSAMPLE:
            score = _upsampled_scores(clip_scores, ids, valid, h, w, out_h, out_w, scale_h, scale_w, SUB)
        else:
            score = tl.load(clip_scores + ids, mask=valid, other=0.0).to(tl.float32)
        tl.store(clip_keys + ids, _order_key(score), mask=valid)
    budget, out_base = _clip_budget(clip, budgets_ptr, offsets_ptr, k, PER_CLIP)
    # As _kth_largest_key, with each count summed over the chunks.
    sign = tl.full([], 1, tl.int32) << 31
    prefix = tl.zeros([], dtype=tl.int32)
    for i in range(32):
        candidate = prefix | (tl.full([], 1, tl.int32) << (31 - i))
        count = tl.zeros([], dtype=tl.int32)
        for start in range(0, n_out, CHUNK):
            ids = start + tl.arange(0, CHUNK)
            valid = ids < n_out
            key = tl.load(clip_keys + ids, mask=valid, other=0)
            count += tl.sum((valid & (key >= (candidate ^ sign))).to(tl.int32), axis=0)
        prefix = tl.where(count >= budget, candidate, prefix)
    kth = prefix ^ sign
    n_above = tl.zeros([], dtype=tl.int32)
    for start in range(0, n_out, CHUNK):
        ids = start + tl.arange(0, CHUNK)
        valid = ids < n_out
        key = tl.load(clip_keys + ids, mask=valid, other=0)
        n_above += tl.sum((valid & (key > kth)).to(tl.int32), axis=0)
    free_slots = budget - n_above
    tied_before = tl.zeros([], dtype=tl.int32)
    written = tl.zeros([], dtype=tl.int32)
    for start in range(0, n_out, CHUNK):
        ids = start + tl.arange(0, CHUNK)
        valid = ids < n_out
        key = tl.load(clip_keys + ids, mask=valid, other=0)
        ties, taken = _store_selection(out_ptr + out_base, ids, key, valid, kth, free_slots, tied_before, written)
        tied_before += ties
        written += taken


def _launch_config(n_out: int) -> Tuple[int, int]:
    """BLOCK and num_warps: 8 scores per thread up to 16 warps. Upsampling
    holds about 10 registers per score, so MAX_TOKENS (16 per thread) just
    fits the 128 registers a 512-thread program may use; 32 warps would cap
    them at 64 and spill."""
    block = next_power_of_2(n_out)
    return block, max(4, min(16, block // 256))


# 4096 keys a chunk over 16 warps: 8 per thread, as the register kernel's
# smaller blocks.
LOOPED_WARPS = 16


def _launch(
    scores: torch.Tensor,
    out: torch.Tensor,
    grid: Sequence[int],
    out_grid: Sequence[int],
    k: int = 0,
    budgets: Optional[torch.Tensor] = None,
    offsets: Optional[torch.Tensor] = None,
) -> None:
    """Write the selection of every clip into ``out`` (``[B, k]`` or packed)."""
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
    sizes = (n_in, n_out, k, h, w, out_h, out_w, sub * h / out_h, sub * w / out_w)
    # Sub-grid scores always take the upsampling path: at the same size it is
    # the identity (weights 1 and 0) and it holds the rearrangement.
    flags = {"UPSAMPLE": sub > 1 or tuple(grid) != tuple(out_grid), "PER_CLIP": per_clip, "SUB": sub}
    if n_out > (MAX_TOKENS if sub == 1 else MAX_SUB_GRID_TOKENS):
        keys = torch.empty((batch, n_out), device=scores.device, dtype=torch.int32)
        wrap_triton(_topk_looped_kernel)[(batch,)](*args, keys, *sizes, **flags, CHUNK=CHUNK,
                                                   num_warps=LOOPED_WARPS)
        return
    block, num_warps = _launch_config(n_out)
    wrap_triton(_topk_kernel)[(batch,)](*args, *sizes, **flags, BLOCK=block, num_warps=num_warps)


@triton_op("lookwhen::topk_tokens", mutates_args=())
def _topk_tokens(scores: torch.Tensor, k: int, grid: List[int], out_grid: List[int]) -> torch.Tensor:
    if not use_triton(scores):
        native = native_kernel("topk_tokens", scores, handles=scores.dim() == 2)
        if native is not None:
            return native(scores, k, grid, out_grid)
        return reference.topk_tokens(scores, k, grid=grid, out_grid=out_grid)
    out = torch.empty((scores.shape[0], k), device=scores.device, dtype=torch.int32)
    _launch(scores, out, grid, out_grid, k=k)
    return out


@torch.library.custom_op("lookwhen::topk_tokens_budgets_cpu", mutates_args=())
def _topk_tokens_budgets_cpu(
    scores: torch.Tensor, budgets: torch.Tensor, total: int, grid: List[int], out_grid: List[int],
) -> torch.Tensor:
    """The reference, opaque to torch.compile: its per-clip loop reads the
    budgets, which tracing must not see (the output size is ``total``)."""
    native = native_kernel("topk_tokens_budgets", scores, handles=scores.dim() == 2)
    if native is not None:
        return native(scores, budgets, cu_seqlens_from_lengths(budgets), total, grid, out_grid)
    return reference.topk_tokens(scores, budgets=budgets, grid=grid, out_grid=out_grid)[0]


@_topk_tokens_budgets_cpu.register_fake
def _topk_tokens_budgets_cpu_fake(scores, budgets, total, grid, out_grid):
    return scores.new_empty((total,), dtype=torch.int32)


@triton_op("lookwhen::topk_tokens_budgets", mutates_args=())
def _topk_tokens_budgets(
    scores: torch.Tensor, budgets: torch.Tensor, cu_seqlens: torch.Tensor, total: int,
    grid: List[int], out_grid: List[int],
) -> torch.Tensor:
    if not use_triton(scores):
        return torch.ops.lookwhen.topk_tokens_budgets_cpu(scores, budgets, total, grid, out_grid)
    out = torch.empty((total,), device=scores.device, dtype=torch.int32)
    _launch(scores, out, grid, out_grid, budgets=budgets, offsets=cu_seqlens)
    return out


def sub_grid(scores: torch.Tensor) -> int:
    """r of 3-d scores ``[B, n, r*r]`` (1 for 2-d scores)."""
    return 1 if scores.dim() == 2 else math.isqrt(scores.shape[2])


def _check_grid(name: str, grid) -> Tuple[int, int, int]:
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 3
        or not all(isinstance(g, Integral) and not isinstance(g, bool) and g >= 1 for g in grid)
    ):
        raise ValueError(f"{name}: expected three positive ints (T, h, w), got {grid!r}")
    return tuple(int(g) for g in grid)


def _resolve_grids(n: int, grid, out_grid, sub: int = 1) -> Tuple[Tuple[int, int, int], Tuple[int, int, int]]:
    if grid is None:
        if sub > 1:
            raise ValueError("grid: 3-d scores [B, n, r*r] need grid, the coarse (T, h, w) of their tokens")
        if out_grid is not None:
            raise ValueError("out_grid: needs grid (the coarse (T, h, w) of the scores) as well")
        return (1, 1, n), (1, 1, n)
    grid = _check_grid("grid", grid)
    if math.prod(grid) != n:
        what = "tokens" if sub > 1 else "scores"
        raise ValueError(f"grid: T*h*w = {math.prod(grid)} does not match the {n} {what} per clip")
    if out_grid is None:
        return grid, (grid[0], grid[1] * sub, grid[2] * sub)
    out_grid = _check_grid("out_grid", out_grid)
    if out_grid[0] != grid[0]:
        raise ValueError(f"out_grid: must keep the {grid[0]} frames of grid, got T={out_grid[0]}")
    return grid, out_grid


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


def topk_tokens(
    scores: torch.Tensor,
    k: Optional[int] = None,
    *,
    keep_ratio: Optional[float] = None,
    grid: Optional[Sequence[int]] = None,
    out_grid: Optional[Sequence[int]] = None,
    budgets: Optional[torch.Tensor] = None,
    total: Optional[int] = None,
    validate: bool = True,
):
    """Ids of the highest-scoring tokens of every clip, in ascending order.

    ``scores [B, N]`` (fp16, bf16 or fp32), or ``[B, n, r*r]``: r x r
    logits per coarse token of ``grid=(T, h, w)`` (``score_tokens`` with
    ``R = r*r`` outputs, LookWhere's head), which lie on the r-times finer
    map ``(T, h*r, w*r)``: logit ``a*r + b`` of token ``(t, i, j)`` is its
    ``(t, i*r + a, j*r + b)``; that map is then upsampled to ``out_grid``
    (default: the map itself) in the same pass, never stored. With ``grid=(T, h, w)`` and
    ``out_grid=(T, H, W)`` the scores are first upsampled per frame to the
    fine grid exactly as ``F.interpolate(mode="bilinear",
    align_corners=False)`` does (in fp32), and ids refer to the fine grid
    (``N_out = T*H*W``; past ``MAX_TOKENS``, or ``MAX_SUB_GRID_TOKENS``
    for 3-d scores, a looped kernel streams the clip through a key buffer of
    ``B*N_out`` int32). Give exactly one of ``k``
    (tokens per clip), ``keep_ratio`` (in (0, 1]; ``K = max(1,
    round(keep_ratio * N_out))``) or ``budgets`` (int32 ``[B]``, one K per
    clip in ``[0, N_out]``).

    Returns int32 ``[B, K]`` for ``k``/``keep_ratio``, and ``(indices
    [sum(budgets)], cu_seqlens [B+1])`` for ``budgets``. Equal scores are
    ranked by token id (the lower id wins; -0.0 equals +0.0). NaN scores are
    refused, and so are infinite ones when upsampling (a zero interpolation
    weight times inf is NaN). Not differentiable: the result is indices.

    Host reads: with ``validate=True`` (the default) the scan for NaN (and
    inf) scores and the range check of ``budgets`` read data back to the
    host; ``validate=False`` skips them (the caller vouches for its scores
    and budgets), and so does torch.compile while it traces. With
    ``budgets``, sizing the output needs ``sum(budgets)``: pass it as
    ``total`` to avoid that read (one device sync otherwise). A fixed ``k``
    or ``keep_ratio`` with ``validate=False`` reads nothing.
    """
    check_tensor("scores", scores, dtypes=FLOAT_DTYPES, contiguous=True)
    if scores.dim() not in (2, 3):
        raise ValueError(f"scores: expected a 2-d [B, N] or 3-d [B, n, r*r] tensor, got {scores.dim()}-d")
    batch, n = scores.shape[:2]
    if n == 0:
        raise ValueError("scores: expected at least one token per clip (dimension 1 is 0)")
    sub = sub_grid(scores)
    if scores.dim() == 3 and (scores.shape[2] < 1 or sub * sub != scores.shape[2]):
        raise ValueError(f"scores: the last dimension must be r*r (a square, r >= 1), got {scores.shape[2]}")
    grid, out_grid = _resolve_grids(n, grid, out_grid, sub)
    n_out = math.prod(out_grid)
    given = [name for name, v in (("k", k), ("keep_ratio", keep_ratio), ("budgets", budgets)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"k, keep_ratio, budgets: give exactly one, got {given or 'none'}")
    if total is not None and budgets is None:
        raise ValueError("total: only meaningful with budgets")
    upsample = sub > 1 or grid != out_grid
    reads = checks_values(validate, scores)
    if reads and bool((~torch.isfinite(scores) if upsample else torch.isnan(scores)).any()):
        kind = "non-finite values (upsampling needs finite scores)" if upsample else "NaN"
        raise ValueError(f"scores: contain {kind}")
    if budgets is not None:
        check_tensor("budgets", budgets, ndim=1, dtypes=(torch.int32,), device=scores.device, contiguous=True)
        check_shape("budgets", budgets, [batch])
        if total is not None and (isinstance(total, bool) or not isinstance(total, Integral) or total < 0):
            raise ValueError(f"total: expected a non-negative int (the sum of budgets), got {total!r}")
        if reads or total is None:
            host = budgets.detach().to("cpu", torch.int64)
            check_budgets("budgets", host, n_out)
            if total is not None and total != int(host.sum()):
                raise ValueError(f"total: {total} is not the sum of budgets ({int(host.sum())})")
            total = int(host.sum())
        check_int32("budgets", total, "the sum of the budgets (int32 cu_seqlens)")
        cu_seqlens = cu_seqlens_from_lengths(budgets)
        indices = _topk_tokens_budgets(scores, budgets, cu_seqlens, total, list(grid), list(out_grid))
        return indices, cu_seqlens
    if keep_ratio is not None:
        if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, Real) or not 0 < keep_ratio <= 1:
            raise ValueError(f"keep_ratio: expected a float in (0, 1], got {keep_ratio!r}")
        k = keep_ratio_to_k(float(keep_ratio), n_out)
    if isinstance(k, bool) or not isinstance(k, Integral) or not 0 <= k <= n_out:
        raise ValueError(f"k: expected an int in [0, {n_out}] (tokens per clip), got {k!r}")
    return _topk_tokens(scores, int(k), list(grid), list(out_grid))


def compile_specs():
    # ViT-B/16 at 224 over 16 frames: 784 coarse selector tokens (the 2x
    # scaled-down clip) upsampled to 3136 fine tokens, K = 314 (keep 10%);
    # plus the largest clip held in registers, and one past it (the looped
    # kernel: 16 frames of a 32 x 32 grid); and LookWhere's head, 11 x 11
    # tokens of 4 x 4 logits resized to a 37 x 37 grid (518 px, patch 14),
    # and the same map over 16 frames, past the register limit.
    fp32 = (torch.float32,)
    configs = (
        ("upsample", 3136, True, False, FLOAT_DTYPES, 1),
        ("direct", 3136, False, False, FLOAT_DTYPES, 1),
        ("upsample_budgets", 3136, True, True, fp32, 1),
        ("upsample_budgets", MAX_TOKENS, True, True, fp32, 1),
        ("upsample_budgets", 16384, True, True, fp32, 1),
        ("direct", 16384, False, False, (torch.float16,), 1),
        ("sub4", 1369, True, False, FLOAT_DTYPES, 4),
        ("sub4_budgets", MAX_SUB_GRID_TOKENS, True, True, fp32, 4),
        ("sub4_budgets", 16 * 1369, True, True, fp32, 4),
    )
    scalars = {"n_in": "i32", "n_out": "i32", "k": "i32", "h": "i32", "w": "i32", "out_h": "i32", "out_w": "i32",
               "scale_h": "fp32", "scale_w": "fp32", "UPSAMPLE": "constexpr", "PER_CLIP": "constexpr",
               "SUB": "constexpr"}
    specs = []
    for mode, n_out, upsample, per_clip, dtypes, sub in configs:
        flags = {"UPSAMPLE": upsample, "PER_CLIP": per_clip, "SUB": sub}
        pointers = {"budgets_ptr": "*i32", "offsets_ptr": "*i32", "out_ptr": "*i32"}
        if n_out > (MAX_TOKENS if sub == 1 else MAX_SUB_GRID_TOKENS):
            fn, num_warps, flags = _topk_looped_kernel, LOOPED_WARPS, flags | {"CHUNK": CHUNK}
            pointers["keys_ptr"] = "*i32"
        else:
            block, num_warps = _launch_config(n_out)
            fn, flags = _topk_kernel, flags | {"BLOCK": block}
        divisible = ("n_in", "n_out") if n_out % 16 == 0 else ("n_in",)
        for dtype in dtypes:
            ty = TRITON_DTYPE[dtype]
            specs.append(CompileSpec(
                f"topk_tokens[{ty},{mode},N={n_out}]", fn,
                {"scores_ptr": f"*{ty}"} | pointers | scalars | {name: "constexpr" for name in flags},
                flags, num_warps=num_warps, divisible_by_16=divisible,
            ))
    return specs
