"""``budgets_from_scores``: per clip, the smallest K whose softmax mass
reaches a target (Uni-AdaFocus's sample-wise dynamic computation): clips whose
scores are concentrated get fewer tokens.

One program owns one clip (its fine scores in registers, read through
the selection core's upsampling when an ``out_grid`` is given). With ``e = exp(s -
max s)`` the top-K of the clip reaches the mass when their ``e`` sum to at
least ``mass * sum(e)``. No sort: the K-th largest order key is found bit by
bit as in topk_tokens, keeping a bit while the ``e`` of the keys at or above
the candidate still reach the target (a monotone test); of the keys equal to
it, as many (in id order) as needed are added.
"""
from __future__ import annotations

import math
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
    check_real,
    check_tensor,
    cpu_dispatch,
    next_power_of_2,
    use_triton,
    wrap_triton,
)
from lookwhen_kernels.ops.selection import (
    MAX_TOKENS,
    check_finite_scores,
    clip_num_warps,
    order_key,
    resolve_grids,
    upsampled_scores,
)


@triton.jit
def _budgets_kernel(
    scores_ptr, out_ptr, n_in, n_out, h, w, out_h, out_w, scale_h, scale_w, inv_temperature, mass, min_k, max_k,
    UPSAMPLE: tl.constexpr, BLOCK: tl.constexpr,
):
    clip = tl.program_id(0)
    ids = tl.arange(0, BLOCK)
    valid = ids < n_out
    clip_scores = scores_ptr + clip.to(tl.int64) * n_in
    if UPSAMPLE:
        score = upsampled_scores(clip_scores, ids, valid, h, w, out_h, out_w, scale_h, scale_w, 1)
    else:
        score = tl.load(clip_scores + ids, mask=valid, other=0.0).to(tl.float32)
    # Unchecked NaN (validate=False) ranks first, as in topk_tokens: it
    # counts as +inf, holding the mass.
    score = tl.where(score != score, float("inf"), score)
    top = tl.max(tl.where(valid, score, float("-inf")), axis=0)
    # A score equal to the top gets weight 1 before the rest: with +inf
    # scores they share all the mass (the limit as they grow), and a clip of
    # -inf shares it evenly, where inf - inf would be NaN.
    e = tl.where(valid, tl.exp(tl.where(score == top, 0.0, (score - top) * inv_temperature)), 0.0)
    target = mass * tl.sum(e, axis=0)
    key = order_key(score)
    # As the selection core's kth_largest_key, with a mass instead of a count.
    sign = tl.full([], 1, tl.int32) << 31
    prefix = tl.zeros([], dtype=tl.int32)
    for i in range(32):
        candidate = prefix | (tl.full([], 1, tl.int32) << (31 - i))
        reached = tl.sum(tl.where(valid & (key >= (candidate ^ sign)), e, 0.0), axis=0)
        prefix = tl.where(reached >= target, candidate, prefix)
    kth = prefix ^ sign
    above = valid & (key > kth)
    tied = valid & (key == kth)
    # Every tie has the same e; a tie is needed while the mass before it falls short.
    e_kth = tl.max(tl.where(tied, e, 0.0), axis=0)
    before = tl.sum(tl.where(above, e, 0.0), axis=0) + (tl.cumsum(tied.to(tl.int32), axis=0) - 1).to(tl.float32) * e_kth
    # A token of zero weight (-inf, or underflowed) adds no mass: never needed.
    needed = (above | (tied & (before < target))) & (e > 0.0)
    k = tl.sum(needed.to(tl.int32), axis=0)
    tl.store(out_ptr + clip, tl.minimum(tl.maximum(k, min_k), max_k))


def _reference(scores, mass, temperature, min_k, max_k, grid, out_grid):
    return reference.budgets_from_scores(scores, mass=mass, temperature=temperature, min_k=min_k, max_k=max_k,
                                         grid=grid, out_grid=out_grid)


@triton_op("lookwhen::budgets_from_scores", mutates_args=())
def _budgets_from_scores(
    scores: torch.Tensor, mass: float, temperature: float, min_k: int, max_k: int, grid: List[int],
    out_grid: List[int],
) -> torch.Tensor:
    if not use_triton(scores):
        return cpu_dispatch(None, (scores, mass, temperature, min_k, max_k, grid, out_grid), _reference)
    batch, n_in = scores.shape
    frames, h, w = grid
    _, out_h, out_w = out_grid
    n_out = frames * out_h * out_w
    out = torch.empty((batch,), device=scores.device, dtype=torch.int32)
    if batch:
        block = next_power_of_2(n_out)
        wrap_triton(_budgets_kernel)[(batch,)](
            scores, out, n_in, n_out, h, w, out_h, out_w, h / out_h, w / out_w, 1.0 / temperature, mass, min_k, max_k,
            UPSAMPLE=tuple(grid) != tuple(out_grid), BLOCK=block, num_warps=clip_num_warps(n_out),
        )
    return out


def budgets_from_scores(
    scores: torch.Tensor,
    *,
    mass: float,
    temperature: float = 1.0,
    min_k: int = 1,
    max_k: Optional[int] = None,
    grid: Optional[Sequence[int]] = None,
    out_grid: Optional[Sequence[int]] = None,
    validate: bool = True,
) -> torch.Tensor:
    """Per clip, the smallest K whose top-K tokens hold at least ``mass`` (in
    (0, 1]) of ``softmax(scores / temperature)`` over the clip, clamped to ``[min_k,
    max_k]`` (``max_k`` defaults to the tokens per clip): int32 ``[B]``, the
    ``budgets`` of :func:`topk_tokens`'s packed path. Ties rank by token id
    as in topk_tokens. With ``grid``/``out_grid`` the softmax is over the
    upsampled fine scores (the tokens topk_tokens then picks from), so the
    budgets count fine tokens. Computed in fp32 (a clip near a boundary may
    differ by one token from the float64 count). ``validate=True`` refuses
    NaN (and, when upsampling, infinite) scores: a host read.
    """
    check_tensor("scores", scores, ndim=2, dtypes=FLOAT_DTYPES, contiguous=True)
    batch, n = scores.shape
    if n == 0:
        raise ValueError("scores: expected at least one token per clip (dimension 1 is 0)")
    grid, out_grid = resolve_grids(n, grid, out_grid)
    n_out = math.prod(out_grid)
    if n_out > MAX_TOKENS:
        raise ValueError(f"out_grid: {n_out} tokens per clip exceed the {MAX_TOKENS} one program holds")
    mass = check_real("mass", mass, "(0, 1]")
    temperature = check_real("temperature", temperature, "(0, inf)")
    min_k = check_int("min_k", min_k, 0, n_out, note="tokens per clip")
    max_k = check_int("max_k", n_out if max_k is None else max_k, 0, n_out, note="tokens per clip")
    if min_k > max_k:
        raise ValueError(f"min_k, max_k: min_k = {min_k} exceeds max_k = {max_k}")
    check_finite_scores(scores, grid != out_grid, validate)
    return _budgets_from_scores(scores, mass, temperature, min_k, max_k, list(grid), list(out_grid))


def compile_specs():
    # LookWhen's selector scores (16 x 7 x 7) upsampled to the 3136 fine
    # tokens, and fine scores given directly.
    specs = []
    scalars = {"n_in": "i32", "n_out": "i32", "h": "i32", "w": "i32", "out_h": "i32", "out_w": "i32",
               "scale_h": "fp32", "scale_w": "fp32", "inv_temperature": "fp32", "mass": "fp32", "min_k": "i32", "max_k": "i32"}
    block = next_power_of_2(3136)
    for mode, upsample in (("upsample", True), ("direct", False)):
        flags = {"UPSAMPLE": upsample, "BLOCK": block}
        for dtype in FLOAT_DTYPES:
            ty = TRITON_DTYPE[dtype]
            specs.append(CompileSpec(
                f"budgets_from_scores[{ty},{mode}]", _budgets_kernel,
                {"scores_ptr": f"*{ty}", "out_ptr": "*i32"} | scalars | {name: "constexpr" for name in flags},
                flags, num_warps=clip_num_warps(3136), divisible_by_16=("n_in", "n_out"),
            ))
    return specs
