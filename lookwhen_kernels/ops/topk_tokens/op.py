"""topk_tokens' registered ops and public functions."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch.library import triton_op

from lookwhen_kernels import reference
from lookwhen_kernels.layout import cu_seqlens_from_lengths
from lookwhen_kernels.ops._common import (
    FLOAT_DTYPES,
    check_int,
    check_int32,
    check_real,
    check_shape,
    check_tensor,
    checks_values,
    cpu_dispatch,
    use_triton,
)
from lookwhen_kernels.ops.selection import (
    check_budgets,
    check_finite_scores,
    keep_ratio_to_k,
    resolve_grids,
    sub_grid,
)
from lookwhen_kernels.ops.topk_tokens.launch import select_into


def _reference_fixed(scores, k, grid, out_grid):
    return reference.topk_tokens(scores, k, grid=grid, out_grid=out_grid)


def _reference_budgets(scores, budgets, cu_seqlens, total, grid, out_grid):
    return reference.topk_tokens_budgets(scores, budgets, grid=grid, out_grid=out_grid)[0]


@triton_op("lookwhen::topk_tokens", mutates_args=())
def _topk_tokens(scores: torch.Tensor, k: int, grid: List[int], out_grid: List[int]) -> torch.Tensor:
    if not use_triton(scores):
        return cpu_dispatch("topk_tokens", (scores, k, grid, out_grid), _reference_fixed, handles=scores.dim() == 2)
    out = torch.empty((scores.shape[0], k), device=scores.device, dtype=torch.int32)
    select_into(scores, out, grid, out_grid, k=k)
    return out


@torch.library.custom_op("lookwhen::topk_tokens_budgets_cpu", mutates_args=())
def _topk_tokens_budgets_cpu(
    scores: torch.Tensor, budgets: torch.Tensor, total: int, grid: List[int], out_grid: List[int],
) -> torch.Tensor:
    """The CPU path, opaque to torch.compile: its per-clip loop reads the
    budgets, which tracing must not see (the output size is ``total``)."""
    args = (scores, budgets, cu_seqlens_from_lengths(budgets), total, grid, out_grid)
    return cpu_dispatch("topk_tokens_budgets", args, _reference_budgets, handles=scores.dim() == 2)


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
    select_into(scores, out, grid, out_grid, budgets=budgets, offsets=cu_seqlens)
    return out


def _check_scores(scores: torch.Tensor, grid, out_grid, validate: bool) -> Tuple[List[int], List[int], int]:
    """The checks both forms share: ``(grid, out_grid, N_out)`` resolved."""
    check_tensor("scores", scores, dtypes=FLOAT_DTYPES, contiguous=True)
    if scores.dim() not in (2, 3):
        raise ValueError(f"scores: expected a 2-d [B, N] or 3-d [B, n, r*r] tensor, got {scores.dim()}-d")
    n = scores.shape[1]
    if n == 0:
        raise ValueError("scores: expected at least one token per clip (dimension 1 is 0)")
    sub = sub_grid(scores)
    if scores.dim() == 3 and (scores.shape[2] < 1 or sub * sub != scores.shape[2]):
        raise ValueError(f"scores: the last dimension must be r*r (a square, r >= 1), got {scores.shape[2]}")
    grid, out_grid = resolve_grids(n, grid, out_grid, sub)
    check_finite_scores(scores, sub > 1 or grid != out_grid, validate)
    return list(grid), list(out_grid), math.prod(out_grid)


def topk_tokens(
    scores: torch.Tensor,
    k: Optional[int] = None,
    *,
    keep_ratio: Optional[float] = None,
    grid: Optional[Sequence[int]] = None,
    out_grid: Optional[Sequence[int]] = None,
    validate: bool = True,
) -> torch.Tensor:
    """Ids of the ``K`` highest-scoring tokens of every clip, in ascending
    order: int32 ``[B, K]``.

    ``scores [B, N]`` (fp16, bf16 or fp32), or ``[B, n, r*r]``: r x r
    logits per coarse token of ``grid=(T, h, w)`` (``score_tokens`` with
    ``R = r*r`` outputs, LookWhere's head), which lie on the r-times finer
    map ``(T, h*r, w*r)``: logit ``a*r + b`` of token ``(t, i, j)`` is its
    ``(t, i*r + a, j*r + b)``; that map is then upsampled to ``out_grid``
    (default: the map itself) in the same pass, never stored. With
    ``grid=(T, h, w)`` and ``out_grid=(T, H, W)`` the scores are first
    upsampled per frame to the fine grid exactly as
    ``F.interpolate(mode="bilinear", align_corners=False)`` does (in fp32),
    and ids refer to the fine grid (``N_out = T*H*W``; past ``MAX_TOKENS``,
    or ``MAX_SUB_GRID_TOKENS`` for 3-d scores, a looped kernel streams the
    clip through a key buffer of ``B*N_out`` int32). Give exactly one of
    ``k`` (tokens per clip) or ``keep_ratio`` (in (0, 1]; ``K = max(1,
    round(keep_ratio * N_out))``, :func:`keep_ratio_to_k`); one K per clip
    is :func:`topk_tokens_budgets`.

    Equal scores are ranked by token id (the lower id wins; -0.0 equals
    +0.0). NaN scores are refused, and so are infinite ones when upsampling
    (a zero interpolation weight times inf is NaN). Not differentiable: the
    result is indices.

    ``validate=True`` (the default) scans the scores for NaN (and inf), a
    host read; ``validate=False`` skips it (the caller vouches for its
    scores) and then nothing is read; torch.compile's tracing skips it too.
    """
    grid, out_grid, n_out = _check_scores(scores, grid, out_grid, validate)
    given = [name for name, v in (("k", k), ("keep_ratio", keep_ratio)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"k, keep_ratio: give exactly one, got {given or 'none'}")
    if keep_ratio is not None:
        k = keep_ratio_to_k(check_real("keep_ratio", keep_ratio, "(0, 1]"), n_out)
    k = check_int("k", k, 0, n_out, note="tokens per clip")
    check_int32("k", scores.shape[0] * k, "the number of output ids (B * k)")
    return _topk_tokens(scores, k, grid, out_grid)


def topk_tokens_budgets(
    scores: torch.Tensor,
    budgets: torch.Tensor,
    *,
    grid: Optional[Sequence[int]] = None,
    out_grid: Optional[Sequence[int]] = None,
    total: Optional[int] = None,
    max_seqlen: Optional[int] = None,
    validate: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Per-clip budgets: the ids of the ``budgets[b]`` highest-scoring tokens
    of clip ``b``, in the packed selection layout ``(indices [total],
    cu_seqlens [B+1], max_seqlen)`` (int32 tensors, ``max_seqlen`` the
    largest budget), each clip's ids ascending.

    ``scores``, ``grid``, ``out_grid`` and the ranking as in
    :func:`topk_tokens`; ``budgets`` int32 ``[B]``, each in ``[0, N_out]``.

    Host reads: sizing the output needs ``sum(budgets)`` and the layout
    ``max(budgets)``: pass them as ``total`` and ``max_seqlen`` to avoid
    reading the budgets (one device sync otherwise, for both).
    ``validate=True`` (the default) scans the scores for NaN (and inf) and
    checks the budgets' range (and ``total``/``max_seqlen`` against them),
    which reads data back to the host; ``validate=False`` skips those
    checks (the caller vouches for its scores and budgets), and so does
    torch.compile while it traces.
    """
    grid, out_grid, n_out = _check_scores(scores, grid, out_grid, validate)
    check_tensor("budgets", budgets, ndim=1, dtypes=(torch.int32,), device=scores.device, contiguous=True)
    check_shape("budgets", budgets, [scores.shape[0]])
    if total is not None:
        check_int("total", total, 0, note="the sum of budgets")
    if max_seqlen is not None:
        check_int("max_seqlen", max_seqlen, 0, n_out, note="the largest budget")
    if checks_values(validate, scores) or total is None or max_seqlen is None:
        host = budgets.detach().to("cpu", torch.int64)
        check_budgets("budgets", host, n_out)
        longest = int(host.max()) if host.numel() else 0
        for name, given, actual, what in (("total", total, int(host.sum()), "the sum"),
                                          ("max_seqlen", max_seqlen, longest, "the largest")):
            if given is not None and given != actual:
                raise ValueError(f"{name}: {given} is not {what} of budgets ({actual})")
        total, max_seqlen = int(host.sum()), longest
    check_int32("budgets", total, "the sum of the budgets (int32 cu_seqlens)")
    cu_seqlens = cu_seqlens_from_lengths(budgets)
    indices = _topk_tokens_budgets(scores, budgets, cu_seqlens, int(total), grid, out_grid)
    return indices, cu_seqlens, int(max_seqlen)
