"""Plain-PyTorch implementation of every op.

Two jobs: the test oracle (called on float64 inputs) and the CPU path (called
on the caller's dtype when Triton is not in play). Written for clarity, not
speed: each function is the contract of its op, stated in code.
"""
from __future__ import annotations

import functools
import math
import operator

import torch

from lookwhen_kernels.layout import cu_seqlens_from_lengths


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def frame_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x [B, T, n, D]``: standardise each channel over the frame's n tokens
    (population variance), computed in at least float32."""
    work = x.to(_work_dtype(x.dtype))
    mean = work.mean(dim=2, keepdim=True)
    var = work.var(dim=2, unbiased=False, keepdim=True)
    return ((work - mean) * torch.rsqrt(var + eps)).to(x.dtype)


def frame_normalize_backward(grad: torch.Tensor, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Closed-form gradient of :func:`frame_normalize` with respect to ``x``:
    ``rstd * (g - mean(g) - xhat * mean(g * xhat))``, means over the frame."""
    work = x.to(_work_dtype(x.dtype))
    g = grad.to(work.dtype)
    mean = work.mean(dim=2, keepdim=True)
    rstd = torch.rsqrt(work.var(dim=2, unbiased=False, keepdim=True) + eps)
    xhat = (work - mean) * rstd
    dx = rstd * (g - g.mean(dim=2, keepdim=True) - xhat * (g * xhat).mean(dim=2, keepdim=True))
    return dx.to(x.dtype)


def patch_rows(indices, cu_seqlens, batch: int, n_tokens: int, device=None):
    """``(clip index, token id)`` of every packed output row of
    :func:`gather_patch_embed`, as int64 ``[total]`` tensors. ``indices`` is
    ``[B, K]``, packed ``[total]`` (with ``cu_seqlens``) or ``None`` (every
    token of every clip, in order)."""
    if indices is None:
        tokens = torch.arange(n_tokens, device=device).repeat(batch)
        clips = torch.arange(batch, device=device).repeat_interleave(n_tokens)
        return clips, tokens
    tokens = indices.reshape(-1).long()
    if indices.dim() == 2:
        clips = torch.arange(batch, device=indices.device).repeat_interleave(indices.shape[1])
    else:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        clips = torch.arange(batch, device=indices.device).repeat_interleave(
            lengths, output_size=tokens.numel()
        )
    return clips, tokens


def _block_sum(x: torch.Tensor, dim: int, factor: int) -> torch.Tensor:
    """Sums of consecutive groups of ``factor`` entries along ``dim``, as
    adds of strided views (on CPU about 8x faster than ``avg_pool2d``)."""
    if factor == 1:
        return x
    groups = x.unflatten(dim, (x.shape[dim] // factor, factor))
    return functools.reduce(operator.add, groups.unbind(dim + 1))


def gather_patches(clip, indices, *, patch_size, mean, std, cu_seqlens=None, downsample=1, dtype=torch.float32):
    """Normalised patches ``[total, 3*p*p]`` (channel, row, column order, as
    ``weight.reshape(D, -1)``) of the selected tokens, in ``dtype``.

    Each token is a ``(downsample*p)``-pixel window of the clip,
    average-pooled by ``downsample`` and normalised with timm's
    ``(x / 255 - mean) / std`` (computed as block sums times
    ``1 / (255 * downsample**2 * std)`` minus ``mean / std``). Pixels keep the
    clip's channel-last order until the last step: converting, pooling and
    normalising contiguous memory is what makes this path fast on CPU."""
    batch, frames, height, width, _ = clip.shape
    window = downsample * patch_size
    grid_h, grid_w = height // window, width // window
    mean = torch.as_tensor(mean, dtype=dtype, device=clip.device)
    std = torch.as_tensor(std, dtype=dtype, device=clip.device)

    # Block sums of bytes are exact in int16 (blocks up to 11 x 11) at half
    # the memory traffic of float32.
    accumulate = torch.int16 if 255 * downsample**2 <= torch.iinfo(torch.int16).max else torch.int32

    def pool_and_normalise(pixels, row_dim, col_dim):
        """uint8 pixels -> pooled, normalised ``dtype`` values."""
        if downsample > 1:
            pixels = _block_sum(_block_sum(pixels.to(accumulate), col_dim, downsample), row_dim, downsample)
        return torch.addcmul(-mean / std, pixels.to(dtype), 1 / (255 * downsample**2 * std))

    if indices is None:
        # Every token: the whole clip in order, no gather.
        pixels = pool_and_normalise(clip, 2, 3)
        cells = pixels.view(batch, frames, grid_h, patch_size, grid_w, patch_size, 3)
        patches = cells.permute(0, 1, 2, 4, 6, 3, 5)
    else:
        clips, tokens = patch_rows(indices, cu_seqlens, batch, frames * grid_h * grid_w, clip.device)
        # [B, T, grid_h, grid_w, window, window, 3] (a view)
        cells = clip.reshape(batch, frames, grid_h, window, grid_w, window, 3).transpose(3, 4)
        t, rest = tokens // (grid_h * grid_w), tokens % (grid_h * grid_w)
        pixels = pool_and_normalise(cells[clips, t, rest // grid_w, rest % grid_w], 1, 2)
        patches = pixels.permute(0, 3, 1, 2)
    return patches.reshape(-1, 3 * patch_size * patch_size)


def gather_patch_embed(
    clip, indices, weight, bias, pos_embed, *, patch_size, mean, std, cu_seqlens=None, downsample=1
):
    """Patch embedding of the selected tokens, packed ``[total, D]`` in the
    weight's dtype: ``linear(patches, weight.reshape(D, -1), bias) +
    pos_embed[token id]``. As on tensor cores, the patches are rounded to the
    weight's dtype and the products are accumulated in float32 (float64 for
    float64 weights)."""
    work = _work_dtype(weight.dtype)
    patches = gather_patches(
        clip, indices, patch_size=patch_size, mean=mean, std=std,
        cu_seqlens=cu_seqlens, downsample=downsample, dtype=work,
    ).to(weight.dtype).to(work)
    _, tokens = patch_rows(indices, cu_seqlens, clip.shape[0], pos_embed.shape[0], clip.device)
    out = torch.nn.functional.linear(patches, weight.reshape(weight.shape[0], -1).to(work), bias.to(work))
    return (out + pos_embed.to(work)[tokens]).to(weight.dtype)


def gather_patch_embed_backward(
    grad, clip, indices, *, patch_size, mean, std, cu_seqlens=None, downsample=1
):
    """Gradients of :func:`gather_patch_embed` with respect to
    ``(weight, bias, pos_embed)``, in ``grad``'s dtype: ``grad^T @ patches``,
    the column sums of ``grad``, and ``grad``'s rows added into ``[N, D]`` at
    their token ids."""
    work = _work_dtype(grad.dtype)
    patches = gather_patches(
        clip, indices, patch_size=patch_size, mean=mean, std=std,
        cu_seqlens=cu_seqlens, downsample=downsample, dtype=work,
    ).to(grad.dtype).to(work)
    batch, frames, height, width, _ = clip.shape
    window = downsample * patch_size
    n_tokens = frames * (height // window) * (width // window)
    _, tokens = patch_rows(indices, cu_seqlens, batch, n_tokens, clip.device)
    g = grad.to(work)
    d_weight = (g.t() @ patches).reshape(grad.shape[1], 3, patch_size, patch_size)
    d_pos = g.new_zeros(n_tokens, grad.shape[1]).index_add_(0, tokens, g)
    return d_weight.to(grad.dtype), g.sum(0).to(grad.dtype), d_pos.to(grad.dtype)


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
    work = scores.to(_work_dtype(scores.dtype))
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


def topk_tokens(scores: torch.Tensor, k=None, *, budgets=None, grid=None, out_grid=None):
    """Per clip, the ids of the ``k`` (or ``budgets[b]``) highest scores after
    upsampling from ``grid`` to ``out_grid`` (when both are given; 3-d
    ``[B, n, r*r]`` scores through their r-times finer map), ties to the
    lower id, returned in ascending order: int32 ``[B, k]``, or ``(indices
    [total], cu_seqlens [B+1])`` with ``budgets``."""
    fine = upsample_scores(scores, grid, out_grid) if grid is not None and out_grid is not None else scores
    # A stable descending sort keeps equal scores in id order.
    order = torch.sort(fine, dim=1, descending=True, stable=True).indices
    if budgets is None:
        return order[:, :k].sort(dim=1).values.to(torch.int32)
    chosen = [order[b, :count].sort().values for b, count in enumerate(budgets.tolist())]
    indices = torch.cat(chosen) if chosen else order.new_zeros(0)
    return indices.to(torch.int32), cu_seqlens_from_lengths(budgets)


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
    flat = keep.reshape(batch, -1)
    clips, tokens = flat.nonzero(as_tuple=True)
    run_lengths = (after - steps).reshape(batch, -1)[clips, tokens]
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
    return (ids + slots).reshape(ids.shape[0], -1)


def perturbed_topk(scores: torch.Tensor, k: int, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """STTS's perturbed top-K with the given samples ``noise [B, n, N]``: the
    mean over samples of the one-hot indicators ``[B, k, N]`` of each
    sample's ascending top-K ids, in at least float32 (float64 for float64
    scores). Counts are added per clip, so ``[B, n, k, N]`` never exists."""
    batch, n_samples, n_tokens = noise.shape
    work = _work_dtype(scores.dtype)
    ids = _perturbed_selections(scores, k, noise, sigma)
    counts = torch.zeros((batch, k * n_tokens), device=scores.device, dtype=work)
    offsets = _slot_offsets(ids, n_tokens)
    counts.scatter_add_(1, offsets, torch.ones(offsets.shape, device=scores.device, dtype=work))
    return (counts / n_samples).reshape(batch, k, n_tokens)


def perturbed_topk_backward(grad: torch.Tensor, scores: torch.Tensor, k: int, noise: torch.Tensor,
                            sigma: float) -> torch.Tensor:
    """The Monte-Carlo gradient of :func:`perturbed_topk` with respect to the
    scores over the same samples: ``d[b, t] = sum_j grad[b, j, t] *
    mean_s(onehot_s[j, t] * noise_s[t]) / sigma`` (STTS's backward), in at
    least float32; ``[B, N]``."""
    batch, n_samples, n_tokens = noise.shape
    work = _work_dtype(scores.dtype)
    ids = _perturbed_selections(scores, k, noise, sigma)
    picked = grad.to(work).reshape(batch, k * n_tokens).gather(1, _slot_offsets(ids, n_tokens))
    noise_at = noise.to(work).gather(2, ids).reshape(batch, -1)
    out = torch.zeros((batch, n_tokens), device=scores.device, dtype=work)
    out.scatter_add_(1, ids.reshape(batch, -1), picked * noise_at)
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


def select_frames(scores: torch.Tensor, n_frames: int, *, grid, out_grid) -> torch.Tensor:
    """The ``n_frames`` frames of ``grid`` with the highest total score (ties
    to the lower frame), as the ids of all their tokens on ``out_grid``:
    int32 ``[B, n_frames*H*W]``, ascending."""
    frames, height, width = grid
    totals = scores.to(_work_dtype(scores.dtype)).reshape(scores.shape[0], frames, height * width).sum(2)
    return frame_tokens(topk_tokens(totals, n_frames), out_grid[1] * out_grid[2])


def budgets_from_scores(scores: torch.Tensor, *, mass: float, min_k: int, max_k: int, temperature: float = 1.0,
                        grid=None, out_grid=None) -> torch.Tensor:
    """Per clip, the smallest K whose K highest scores (ties by id, after
    upsampling from ``grid`` to ``out_grid``) hold ``mass`` of
    ``softmax(scores / temperature)``, clamped to ``[min_k, max_k]``: int32
    ``[B]``. In at least float32."""
    fine = upsample_scores(scores, grid, out_grid) if grid is not None and out_grid is not None else scores
    fine = fine.to(_work_dtype(scores.dtype))
    probs = torch.softmax(fine / temperature, dim=1)
    ranked = probs.gather(1, torch.sort(fine, dim=1, descending=True, stable=True).indices)
    before = torch.cumsum(ranked, dim=1) - ranked
    return (before < mass).sum(dim=1).clamp(min_k, max_k).to(torch.int32)


def gather_tokens(x: torch.Tensor, indices: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
    """Rows ``x[b, indices]`` of every clip, packed ``[total, D]``."""
    clips, tokens = patch_rows(indices, cu_seqlens, x.shape[0], x.shape[1], x.device)
    return x[clips, tokens]


def scatter_tokens(packed: torch.Tensor, indices: torch.Tensor, n_tokens: int, cu_seqlens=None) -> torch.Tensor:
    """Adjoint of :func:`gather_tokens`: ``[B, n_tokens, D]``, packed row ``r``
    at ``(b, indices[r])``, zeros elsewhere (ids unique within a clip)."""
    batch = indices.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    clips, tokens = patch_rows(indices, cu_seqlens, batch, n_tokens, packed.device)
    out = packed.new_zeros((batch, n_tokens) + tuple(packed.shape[1:]))
    out[clips, tokens] = packed
    return out


def score_tokens(x, norm_weight, norm_bias, w1, b1, w2, b2, eps: float = 1e-6) -> torch.Tensor:
    """The selector's score head, ``x [B, n, D]`` -> float32 ``[B, n]`` (one
    output: ``w2 [1, hidden]`` or ``[hidden]``) or ``[B, n, R]`` (``w2 [R,
    hidden]``, R > 1): ``linear(gelu(linear(layer_norm(x), w1, b1)), w2, b2)``
    with the exact GELU, each step in x's dtype as the ``nn.Module`` stack
    computes it (float64 in, float64 out: the oracle)."""
    y = torch.nn.functional.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)
    h = torch.nn.functional.gelu(torch.nn.functional.linear(y, w1, b1))
    out = torch.nn.functional.linear(h, w2.reshape(-1, w1.shape[0]), b2)
    return (out.squeeze(-1) if out.shape[-1] == 1 else out).to(_work_dtype(x.dtype))


def score_tokens_backward(grad, x, norm_weight, norm_bias, w1, b1, w2, b2, eps: float = 1e-6):
    """Closed-form gradients of :func:`score_tokens` (computed in at least
    float32) with respect to ``(x, norm_weight, norm_bias, w1, b1, w2, b2)``,
    each in its input's dtype and shape."""
    work = _work_dtype(x.dtype)
    xw = x.to(work).reshape(-1, x.shape[-1])
    w2w = w2.to(work).reshape(-1, w1.shape[0])
    g = grad.to(work).reshape(-1, w2w.shape[0])
    gamma, beta, w1w, b1w = (t.to(work) for t in (norm_weight, norm_bias, w1, b1))
    mean = xw.mean(dim=1, keepdim=True)
    rstd = torch.rsqrt(xw.var(dim=1, unbiased=False, keepdim=True) + eps)
    xhat = (xw - mean) * rstd
    y = xhat * gamma + beta
    a = y @ w1w.T + b1w
    cdf = 0.5 * (1 + torch.erf(a * 0.5 ** 0.5))
    pdf = torch.exp(-0.5 * a * a) * (2 * torch.pi) ** -0.5
    d_a = (g @ w2w) * (cdf + a * pdf)
    d_y = d_a @ w1w
    d_xhat = d_y * gamma
    dx = rstd * (d_xhat - d_xhat.mean(dim=1, keepdim=True) - xhat * (d_xhat * xhat).mean(dim=1, keepdim=True))
    grads = (
        dx.reshape(x.shape),
        (d_y * xhat).sum(dim=0),
        d_y.sum(dim=0),
        d_a.T @ y,
        d_a.sum(dim=0),
        (g.T @ (a * cdf)).reshape(w2.shape),
        g.sum(dim=0).reshape(b2.shape),
    )
    inputs = (x, norm_weight, norm_bias, w1, b1, w2, b2)
    return tuple(d.to(t.dtype) for d, t in zip(grads, inputs))


def nn_uniqueness(x: torch.Tensor, metric: str = "l2", eps: float = 1e-12) -> torch.Tensor:
    """``x [B, N, D]`` -> float32 (float64 for float64) ``[B, N]``: distance from every token to its
    nearest other token of the clip, computed in at least float32; ``inf`` for
    a clip of one token. "l2": Euclidean distance; "cosine": ``1 - max cosine
    similarity`` with ``u = x / max(|x|, eps)`` as ``F.normalize`` (a zero
    vector has cosine 0 with everything).

    The ``[N, N]`` matrix only picks each token's neighbour: its expansion
    cancels digits for close pairs, so the distance to the neighbour is then
    measured directly (exact duplicates give exactly 0)."""
    work = x.to(_work_dtype(x.dtype))
    batch, n_tokens, _ = x.shape
    if n_tokens <= 1:
        return torch.full((batch, n_tokens), float("inf"), device=x.device, dtype=work.dtype)
    sq = (work * work).sum(dim=-1)
    if metric == "cosine":
        feats = torch.nn.functional.normalize(work, dim=-1, eps=eps)
        score = -(feats @ feats.transpose(1, 2))
    else:
        feats = work
        score = sq[:, :, None] + sq[:, None, :] - 2 * work @ work.transpose(1, 2)
    self_mask = torch.eye(n_tokens, dtype=torch.bool, device=x.device)
    nearest = score.masked_fill(self_mask, float("inf")).argmin(dim=2)
    neighbour = torch.gather(feats, 1, nearest[:, :, None].expand_as(feats))
    d2 = (feats - neighbour).pow(2).sum(dim=-1)
    if metric == "cosine":
        # 1 - u.v = (|u - v|^2 + (1 - |u|^2) + (1 - |v|^2)) / 2; the last two
        # terms are exactly 0 unless |x| < eps.
        short = 1 - (sq / eps**2).clamp(max=1)
        return 0.5 * (d2 + short + torch.gather(short, 1, nearest))
    return d2.sqrt()


def _attention_lse(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``q [..., H, Lq, Dh]``, ``k [..., H_kv, Lk, Dh]`` -> ``[..., H, Lq]``
    natural-log sum-exp of the scaled scores, in at least float32."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    kv_heads = k.shape[-3]
    grouped = q.to(work).unflatten(-3, (kv_heads, q.shape[-3] // kv_heads))
    scores = grouped @ k.to(work).unsqueeze(-3).transpose(-1, -2) * scale
    return torch.logsumexp(scores, dim=-1).flatten(-3, -2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """``q [B, H, Lq, Dh]``, ``k, v [B, H_kv, Lk, Dh]`` with ``Lk > 0`` ->
    ``out`` like ``q`` and ``lse [B, H, Lq]``.

    On CPU this is ATen's fused flash-attention kernel (what
    ``scaled_dot_product_attention`` runs there): it shares kv heads natively
    and returns lse for free, but its lse carries no gradient. Elsewhere SDPA
    and an explicit logsumexp."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out, _attention_lse(q, k, scale)


def _attention_segments(cu_seqlens_q, cu_seqlens_k):
    """Row slices ``(q rows, k rows)`` of every sequence, and the common
    ``(Lq, Lk)`` when all sequences share non-zero lengths (else ``None``)."""
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    segments = [(slice(a, b), slice(c, d)) for a, b, c, d in zip(starts_q, starts_q[1:], starts_k, starts_k[1:])]
    shapes = {(rq.stop - rq.start, rk.stop - rk.start) for rq, rk in segments}
    uniform = shapes.pop() if len(shapes) == 1 else None
    return segments, uniform if uniform is not None and min(uniform) > 0 else None


def attention_mask(len_q: int, len_k: int, window_size=(-1, -1), device=None) -> torch.Tensor:
    """``bool [Lq, Lk]``, True where query ``i`` may see key ``j``. Queries
    are aligned to the bottom-right of the score matrix (query ``i`` sits at
    key position ``i + Lk - Lq``, as in FlashAttention >= 2.1); ``window_size
    = (left, right)`` keeps keys from ``left`` before to ``right`` after that
    position, ``-1`` meaning unbounded (causal is ``(-1, 0)``)."""
    rel = torch.arange(len_k, device=device)[None, :] - torch.arange(len_q, device=device)[:, None] - (len_k - len_q)
    left, right = window_size
    allowed = torch.ones(len_q, len_k, dtype=torch.bool, device=device)
    if left >= 0:
        allowed &= rel >= -left
    if right >= 0:
        allowed &= rel <= right
    return allowed


def _score_mods(scores, window_size, softcap, slopes):
    """Scaled scores ``[..., H, Lq, Lk]`` -> FlashAttention's modified scores
    (soft cap, then ALiBi bias with ``slopes [..., H]``, then ``-inf`` outside
    the window), and the soft cap's derivative (``None`` without one)."""
    len_q, len_k = scores.shape[-2:]
    derivative = None
    if softcap > 0:
        t = torch.tanh(scores / softcap)
        scores, derivative = softcap * t, 1 - t * t
    if slopes is not None:
        rel = torch.arange(len_k, device=scores.device)[None, :] - torch.arange(len_q, device=scores.device)[:, None]
        scores = scores - slopes.to(scores.dtype)[..., None, None] * (rel - (len_k - len_q)).abs()
    allowed = attention_mask(len_q, len_k, window_size, scores.device)
    return torch.where(allowed, scores, float("-inf")), derivative


def _attend_explicit(q, k, v, scale, window_size, softcap, slopes):
    """One sequence with an explicit score matrix: ``q [Lq, H, Dh]``, ``k, v
    [Lk, H_kv, Dh]``, ``slopes [H]`` or ``None``. Scores in q's dtype (as
    FlashAttention's tests' same-precision reference), softmax in at least
    float32. Differentiable in q, k, v through ``out`` and ``lse``; queries
    that see no key give zeros and ``lse = -inf`` with zero gradients."""
    len_q, len_k = q.shape[0], k.shape[0]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    kb, vb = (t.repeat_interleave(group, dim=1).transpose(0, 1) for t in (k, v))
    scores, _ = _score_mods((q.transpose(0, 1) @ kb.transpose(-1, -2)).to(work) * scale, window_size, softcap,
                            slopes)
    # A row without keys gets finite dummy scores, then is overwritten: the
    # softmax of an all -inf row would be NaN, in the values and the gradients.
    empty = ~attention_mask(len_q, len_k, window_size, q.device).any(-1)
    scores = scores.masked_fill(empty[:, None], 0.0)
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse[..., None])
    out = (p.to(q.dtype) @ vb).transpose(0, 1)
    out = torch.where(empty[:, None, None], 0.0, out).to(q.dtype)
    return out, torch.where(empty, float("-inf"), lse)


def _window(causal, window_size):
    # FlashAttention: causal is the window (left, 0).
    return (window_size[0], 0) if causal else tuple(window_size)


def uses_score_mods(causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None) -> bool:
    """Whether an attention call needs the explicit-score path (anything but
    plain softmax attention)."""
    return causal or tuple(window_size) != (-1, -1) or softcap > 0 or alibi_slopes is not None


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k=None, *, softmax_scale=None, causal=False,
                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None):
    """Softmax attention within each packed sequence.

    ``q [total_q, H, Dh]``, ``k, v [total_k, H_kv, Dh]`` (query head ``h``
    reads kv head ``h // (H / H_kv)``), int32 offsets ``[B+1]``;
    ``cu_seqlens_k=None`` means q's offsets. Returns ``(out, lse)``: ``out``
    like ``q`` (zeros for a query whose key sequence is empty) and ``lse [H,
    total_q]``, the natural-log sum-exp of the scaled scores (float32, float64
    for float64 inputs, ``-inf`` without keys). ``out`` is differentiable; on
    CPU ``lse`` is not (see :func:`_attend`).

    One batched call when all sequences share their lengths, one per sequence
    otherwise.

    ``causal``, ``window_size``, ``softcap`` and ``alibi_slopes`` (``[H]`` or
    ``[B, H]``) as in FlashAttention (see :func:`attention_mask`); with any of
    them every sequence is computed with an explicit score matrix, and ``lse``
    is differentiable too.
    """
    if cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens_q
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    heads, head_dim = q.shape[1], q.shape[2]
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    segments, uniform = _attention_segments(cu_seqlens_q, cu_seqlens_k)
    if uses_score_mods(causal, window_size, softcap, alibi_slopes):
        window = _window(causal, window_size)
        results = [
            _attend_explicit(q[rows_q], k[rows_k], v[rows_k], scale, window, softcap,
                             None if alibi_slopes is None else alibi_slopes.expand(len(segments), heads)[b])
            for b, (rows_q, rows_k) in enumerate(segments)
        ]
        if not results:
            return q.new_zeros(q.shape), torch.empty((heads, 0), dtype=lse_dtype, device=q.device)
        return torch.cat([r[0] for r in results]), torch.cat([r[1] for r in results], dim=1)
    if uniform is not None:
        batched = [t.unflatten(0, (len(segments), -1)).transpose(1, 2) for t in (q, k, v)]
        out, lse = _attend(*batched, scale)
        return out.transpose(1, 2).reshape(q.shape), lse.transpose(0, 1).reshape(heads, -1)
    outs, lses = [], []
    for rows_q, rows_k in segments:
        len_q, len_k = rows_q.stop - rows_q.start, rows_k.stop - rows_k.start
        if len_q == 0:
            continue
        if len_k == 0:
            outs.append(q.new_zeros((len_q, heads, head_dim)))
            lses.append(torch.full((heads, len_q), float("-inf"), dtype=lse_dtype, device=q.device))
            continue
        out, lse = _attend(*(t[rows].transpose(0, 1)[None] for t, rows in ((q, rows_q), (k, rows_k), (v, rows_k))),
                           scale)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    if not outs:
        return q.new_zeros(q.shape), torch.empty((heads, 0), dtype=lse_dtype, device=q.device)
    return torch.cat(outs), torch.cat(lses, dim=1)


def varlen_attention_backward(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k=None, *, softmax_scale=None,
                              grad_lse=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None):
    """Gradients of :func:`varlen_attention` for ``q, k, v`` from its ``out``
    and ``lse``; ``grad_lse`` (``[H, total_q]`` or ``None``) is the gradient
    reaching ``lse``.

    On CPU without ``grad_lse``: ATen's fused CPU flash-attention backward.
    Otherwise the closed form, per sequence in at least float32: ``P =
    exp(scale * q k^T - lse)``, ``dV = P^T dO``, ``dS = P * (dO V^T -
    rowsum(dO * O) + grad_lse)``, ``dQ = scale * dS K``, ``dK = scale * dS^T
    Q``, a kv head summing over its query heads; scores are built for a few kv
    heads at a time, so a long sequence stays within a few hundred MB. The
    score modifiers of :func:`varlen_attention` enter ``P`` (and the soft cap
    multiplies ``dS`` by its derivative).
    """
    if cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens_q
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    segments, uniform = _attention_segments(cu_seqlens_q, cu_seqlens_k)
    mods = uses_score_mods(causal, window_size, softcap, alibi_slopes)
    window = _window(causal, window_size)
    if q.device.type == "cpu" and grad_lse is None and not mods:
        fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        if uniform is not None:
            batch = len(segments)
            views = [t.unflatten(0, (batch, -1)).transpose(1, 2) for t in (grad_out, q, k, v, out)]
            grads = fused(*views, lse.unflatten(1, (batch, -1)).transpose(0, 1), 0.0, False, scale=scale)
            return tuple(g.transpose(1, 2).reshape(t.shape) for g, t in zip(grads, (q, k, v)))
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for rows_q, rows_k in segments:
            if rows_q.stop == rows_q.start or rows_k.stop == rows_k.start:
                continue
            views = [t[rows].transpose(0, 1)[None] for t, rows in
                     ((grad_out, rows_q), (q, rows_q), (k, rows_k), (v, rows_k), (out, rows_q))]
            grads = fused(*views, lse[None, :, rows_q], 0.0, False, scale=scale)
            for full, grad, rows in zip((dq, dk, dv), grads, (rows_q, rows_k, rows_k)):
                full[rows] = grad[0].transpose(0, 1)
        return dq, dk, dv

    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads // kv_heads
    dq = torch.zeros(q.shape, dtype=work, device=q.device)
    dk = torch.zeros(k.shape, dtype=work, device=q.device)
    dv = torch.zeros(v.shape, dtype=work, device=q.device)
    for b, (rows_q, rows_k) in enumerate(segments):
        len_q, len_k = rows_q.stop - rows_q.start, rows_k.stop - rows_k.start
        if len_q == 0 or len_k == 0:
            continue
        # [H_kv, G, L, Dh] for the query side, [H_kv, 1, L, Dh] for keys and values.
        qb, gb, ob = (t[rows_q].to(work).transpose(0, 1).unflatten(0, (kv_heads, group)) for t in (q, grad_out, out))
        kb, vb = (t[rows_k].to(work).transpose(0, 1).unsqueeze(1) for t in (k, v))
        stats = lse[:, rows_q].to(work).unflatten(0, (kv_heads, group)).unsqueeze(-1)
        # A query that sees no key (lse = -inf) gets P = 0, not exp(-inf + inf).
        stats = stats.masked_fill(torch.isneginf(stats), float("inf"))
        slopes = None if alibi_slopes is None else \
            alibi_slopes.expand(len(segments), heads)[b].to(work).unflatten(0, (kv_heads, group))
        delta = (gb * ob).sum(-1, keepdim=True)
        if grad_lse is not None:
            delta = delta - grad_lse[:, rows_q].to(work).unflatten(0, (kv_heads, group)).unsqueeze(-1)
        chunk = max(1, (1 << 24) // (group * len_q * len_k))
        for first in range(0, kv_heads, chunk):
            h = slice(first, first + chunk)
            scores, derivative = qb[h] @ kb[h].transpose(-1, -2) * scale, None
            if mods:
                scores, derivative = _score_mods(scores, window, softcap, None if slopes is None else slopes[h])
            p = torch.exp(scores - stats[h])
            ds = p * (gb[h] @ vb[h].transpose(-1, -2) - delta[h])
            if derivative is not None:
                ds = ds * derivative
            dv[rows_k, h] = (p.transpose(-1, -2) @ gb[h]).sum(1).transpose(0, 1)
            dk[rows_k, h] = (ds.transpose(-1, -2) @ qb[h]).sum(1).transpose(0, 1) * scale
            dq[rows_q, h.start * group:h.stop * group] = (ds @ kb[h]).flatten(0, 1).transpose(0, 1) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
