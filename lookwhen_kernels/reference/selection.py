"""References of the selection ops: top-K (fixed and per-clip budgets),
perturbed top-K, windows, frames, budgets from scores, static tokens."""
from __future__ import annotations

import torch

from lookwhen_kernels.layout import cu_seqlens_from_lengths
from lookwhen_kernels.ops._common import work_dtype
from lookwhen_kernels.ops.selection import upsample_scores


def topk_tokens(scores: torch.Tensor, k: int, *, grid=None, out_grid=None) -> torch.Tensor:
    """Per clip, the ids of the ``k`` highest scores after upsampling from
    ``grid`` to ``out_grid`` (when both are given; 3-d ``[B, n, r*r]``
    scores through their r-times finer map), ties to the lower id, returned
    in ascending order: int32 ``[B, k]``."""
    return _ranked(scores, grid, out_grid)[:, :k].sort(dim=1).values.to(torch.int32)


def topk_tokens_budgets(scores: torch.Tensor, budgets: torch.Tensor, *, grid=None, out_grid=None):
    """:func:`topk_tokens` with ``budgets[b]`` ids for clip ``b``: ``(indices
    [total], cu_seqlens [B+1])``, int32."""
    order = _ranked(scores, grid, out_grid)
    chosen = [order[b, :count].sort().values for b, count in enumerate(budgets.tolist())]
    indices = torch.cat(chosen) if chosen else order.new_zeros(0)
    return indices.to(torch.int32), cu_seqlens_from_lengths(budgets)


def _ranked(scores: torch.Tensor, grid, out_grid) -> torch.Tensor:
    """Every clip's token ids by descending (upsampled) score, ties by id."""
    fine = upsample_scores(scores, grid, out_grid) if grid is not None and out_grid is not None else scores
    # A stable descending sort keeps equal scores in id order.
    return torch.sort(fine, dim=1, descending=True, stable=True).indices


def static_token_mask(clip, *, patch_size: int, threshold: float, tubelet: int = 1, std=None) -> torch.Tensor:
    """RLT's static-token test, bool ``[B, T/tubelet, Hp*Wp]``: a token of
    tubelet ``t >= 1`` is kept when the mean over its patch's pixels and
    channels of ``|x_last(t) - x_first(t-1)| / 255`` (each channel divided by
    ``std[c]`` when given: the difference of normalised pixels) is at least
    ``threshold``; ``x_last(t)`` is the tubelet's last frame, ``x_first(t-1)``
    the previous tubelet's first. Every token of tubelet 0 is kept. Byte
    differences are summed exactly in integers, then weighted in float64."""
    batch, frames, height, width, _ = clip.shape
    tubelets, p = frames // tubelet, patch_size
    grid_h, grid_w = height // p, width // p
    later = clip[:, 2 * tubelet - 1::tubelet].to(torch.int16)
    earlier = clip[:, :frames - tubelet:tubelet].to(torch.int16)
    sums = (later - earlier).abs().reshape(batch, tubelets - 1, grid_h, p, grid_w, p, 3).sum((3, 5))
    weights = torch.ones(3, dtype=torch.float64) if std is None else 1 / torch.tensor(std, dtype=torch.float64)
    score = (sums.double() * weights.to(clip.device)).sum(-1) / (255 * 3 * p * p)
    moved = (score >= threshold).reshape(batch, tubelets - 1, grid_h * grid_w)
    first = torch.ones(batch, 1, grid_h * grid_w, dtype=torch.bool, device=clip.device)
    return torch.cat([first, moved], dim=1)


def pack_static_tokens(keep: torch.Tensor):
    """``keep bool [B, T', S]`` -> ``(indices [total], cu_seqlens [B+1],
    run_lengths [total])``, all int32: the kept token ids of each clip in
    ascending order and, for each, the number of tubelets until the next kept
    token at the same spatial position (or the clip's end)."""
    batch, tubelets, spatial = keep.shape
    steps = torch.arange(tubelets, device=keep.device)[:, None]
    kept_at = torch.where(keep, steps, tubelets)
    # The first kept tubelet at or after t, then strictly after t.
    at_or_after = kept_at.flip(1).cummin(1).values.flip(1)
    after = torch.cat([at_or_after[:, 1:], kept_at.new_full((batch, 1, spatial), tubelets)], dim=1)
    flat = keep.flatten(1)
    clips, tokens = flat.nonzero(as_tuple=True)
    run_lengths = (after - steps).flatten(1)[clips, tokens]
    return tokens.to(torch.int32), cu_seqlens_from_lengths(flat.sum(1)), run_lengths.to(torch.int32)


def static_tokens(clip, *, patch_size: int, threshold: float, tubelet: int = 1, std=None):
    """RLT's selection (:func:`static_token_mask`), packed by
    :func:`pack_static_tokens`."""
    return pack_static_tokens(
        static_token_mask(clip, patch_size=patch_size, threshold=threshold, tubelet=tubelet, std=std)
    )


def _perturbed_selections(scores: torch.Tensor, k: int, noise: torch.Tensor, sigma: float):
    """Each sample's top-K ids ``int64 [B, n, k]`` (ascending) of ``scores +
    sigma * noise``, formed in float32 as the kernels form them, so the same
    noise gives the same selections."""
    batch, n_samples, n_tokens = noise.shape
    perturbed = scores.float()[:, None, :] + sigma * noise.float()
    ids = topk_tokens(perturbed.reshape(batch * n_samples, n_tokens), k).long()
    return ids.reshape(batch, n_samples, k)


def _slot_offsets(ids: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Flat ``slot * N + id`` offsets into a clip's ``[k, N]`` indicators, ``[B, n*k]``."""
    slots = torch.arange(ids.shape[2], device=ids.device) * n_tokens
    return (ids + slots).flatten(1)


def perturbed_topk(scores: torch.Tensor, k: int, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """STTS's perturbed top-K with the given samples ``noise [B, n, N]``: the
    mean over samples of the one-hot indicators ``[B, k, N]`` of each
    sample's ascending top-K ids, in at least float32 (float64 for float64
    scores). Counts are added per clip, so ``[B, n, k, N]`` never exists."""
    batch, n_samples, n_tokens = noise.shape
    work = work_dtype(scores.dtype)
    ids = _perturbed_selections(scores, k, noise, sigma)
    counts = torch.zeros((batch, k * n_tokens), device=scores.device, dtype=work)
    offsets = _slot_offsets(ids, n_tokens)
    counts.scatter_add_(1, offsets, torch.ones(offsets.shape, device=scores.device, dtype=work))
    return (counts / n_samples).reshape(batch, k, n_tokens)


# At or under this noise scale the perturbed top-K is the hard one and its
# gradient zero, as in STTS's backward; the estimator's 1 / sigma would
# otherwise blow rounding noise up to ~1e19.
SIGMA_FLOOR = 1e-20


def perturbed_topk_backward(grad: torch.Tensor, scores: torch.Tensor, k: int, noise: torch.Tensor,
                            sigma: float) -> torch.Tensor:
    """The Monte-Carlo gradient of :func:`perturbed_topk` with respect to the
    scores over the same samples: ``d[b, t] = sum_j grad[b, j, t] *
    mean_s(onehot_s[j, t] * noise_s[t]) / sigma`` (STTS's backward), in at
    least float32, zero for ``sigma <= SIGMA_FLOOR``; ``[B, N]``."""
    batch, n_samples, n_tokens = noise.shape
    work = work_dtype(scores.dtype)
    if sigma <= SIGMA_FLOOR:
        return torch.zeros((batch, n_tokens), device=scores.device, dtype=work)
    ids = _perturbed_selections(scores, k, noise, sigma)
    picked = grad.to(work).reshape(batch, k * n_tokens).gather(1, _slot_offsets(ids, n_tokens))
    noise_at = noise.to(work).gather(2, ids).flatten(1)
    out = torch.zeros((batch, n_tokens), device=scores.device, dtype=work)
    out.scatter_add_(1, ids.flatten(1), picked * noise_at)
    return out / (n_samples * sigma)


def select_windows(scores: torch.Tensor, window, *, grid, out_grid) -> torch.Tensor:
    """Per frame (after upsampling from ``grid`` to ``out_grid``), the ids of
    the ``window = (h, w)`` tokens with the largest sum, ties to the lowest
    top-left index: int32 ``[B, T*h*w]``, ascending. Sums are added ``dy``
    outer, ``dx`` inner in at least float32."""
    fine = upsample_scores(scores, grid, out_grid)
    frames, height, width = out_grid
    win_h, win_w = window
    planes = fine.reshape(scores.shape[0], frames, height, width)
    rows, cols = height - win_h + 1, width - win_w + 1
    sums = torch.zeros((scores.shape[0], frames, rows, cols), device=scores.device, dtype=fine.dtype)
    for dy in range(win_h):
        for dx in range(win_w):
            sums += planes[:, :, dy:dy + rows, dx:dx + cols]
    best = sums.flatten(2).argmax(dim=2)  # the first maximum: the lowest top-left index
    top, left = best // cols, best % cols
    offsets = (torch.arange(win_h, device=scores.device)[:, None] * width
               + torch.arange(win_w, device=scores.device)[None, :]).flatten()
    starts = torch.arange(frames, device=scores.device) * (height * width) + top * width + left
    return (starts[:, :, None] + offsets).flatten(1).to(torch.int32)


def frame_tokens(frames: torch.Tensor, plane: int) -> torch.Tensor:
    """Frame ids ``[B, F]`` -> the ids of all their tokens ``int32 [B, F*plane]``."""
    ids = frames.long()[:, :, None] * plane + torch.arange(plane, device=frames.device)
    return ids.flatten(1).to(torch.int32)


def select_frames(scores: torch.Tensor, n_frames: int, *, grid, out_grid, temperature: float = 1.0) -> torch.Tensor:
    """Uni-AdaFocus's temporal policy as a hard selection, its evaluation
    rule: the policy is the softmax over frames of each frame's mean score
    (on ``grid``) over ``temperature``; frame ``i`` of ``n_frames`` sits at
    the quantile ``(i + 1/2) / n_frames`` of the policy's cumulative
    distribution, read linearly within a frame and floored, then pushed past
    the frame before it and kept within the clip. Flat scores spread the
    frames evenly (8 of 16: 1, 3, ..., 15); a peaked policy gathers them
    around its peak. Returns the ids of all their tokens on ``out_grid``:
    int32 ``[B, n_frames*H*W]``, ascending. In float64."""
    frames, height, width = grid
    batch = scores.shape[0]
    if n_frames == 0:
        return torch.empty((batch, 0), dtype=torch.int32, device=scores.device)
    means = scores.to(torch.float64).reshape(batch, frames, height * width).mean(2)
    weights = torch.softmax(means / temperature, dim=1)
    cumulative = torch.cat([weights.new_zeros(batch, 1), weights.cumsum(1)], dim=1)
    cumulative[:, -1] = 1.0  # as AdaFocus: the last step ends at exactly 1
    steps = torch.arange(n_frames, device=scores.device)
    quantiles = (steps.to(torch.float64) + 0.5) / n_frames
    # The frame c whose step of the cumulative distribution holds each quantile.
    frame = (cumulative[:, None, 1:] < quantiles[None, :, None]).sum(2).clamp(max=frames - 1)
    low, high = cumulative.gather(1, frame), cumulative.gather(1, frame + 1)
    within = torch.where(high > low, (quantiles - low) / (high - low), 0.0)
    chosen = (frame + within).floor().long().clamp(0, frames - 1)
    # Each frame after the one before (a running maximum of index - position),
    # and room left for the frames after it.
    chosen = (chosen - steps).cummax(dim=1).values + steps
    chosen = torch.minimum(chosen, frames - n_frames + steps)
    return frame_tokens(chosen, out_grid[1] * out_grid[2])


def budgets_from_scores(scores: torch.Tensor, *, mass: float, min_k: int, max_k: int, temperature: float = 1.0,
                        grid=None, out_grid=None) -> torch.Tensor:
    """Per clip, the smallest K whose K highest scores (ties by id, after
    upsampling from ``grid`` to ``out_grid``) hold ``mass`` of
    ``softmax(scores / temperature)``, clamped to ``[min_k, max_k]``: int32
    ``[B]``. In at least float32. +inf scores hold all the mass, in equal
    shares; -inf scores none (a clip of -inf: equal shares); a token of
    zero weight is never counted."""
    fine = upsample_scores(scores, grid, out_grid) if grid is not None and out_grid is not None else scores
    fine = fine.to(work_dtype(scores.dtype))
    # An unchecked NaN ranks first, as in topk_tokens: it counts as +inf.
    fine = fine.masked_fill(fine.isnan(), float("inf"))
    # The softmax with each clip's top score at weight 1 first: +inf scores
    # share all the mass (the limit as they grow) and a clip of -inf shares
    # it evenly, where torch.softmax would give NaN.
    top = fine.amax(dim=1, keepdim=True)
    weights = torch.exp(torch.where(fine == top, 0.0, (fine - top) * (1.0 / temperature)))
    probs = weights / weights.sum(dim=1, keepdim=True)
    ranked = probs.gather(1, torch.sort(fine, dim=1, descending=True, stable=True).indices)
    before = torch.cumsum(ranked, dim=1) - ranked
    # A token of zero weight (-inf, or underflowed) adds no mass: never
    # needed, however the sums round (mass 1.0).
    needed = torch.minimum((before < mass).sum(dim=1), (weights > 0).sum(dim=1))
    return needed.clamp(min_k, max_k).to(torch.int32)
