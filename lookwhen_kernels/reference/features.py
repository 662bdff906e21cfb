"""References of the per-token ops: the score head, per-frame
normalisation, nearest-neighbour uniqueness, and the row gather/scatter of
the packed layout."""
from __future__ import annotations

import torch

from lookwhen_kernels.layout import patch_rows
from lookwhen_kernels.ops._common import work_dtype


def _inverse_std(work: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / sqrt(var + eps)`` over the frame's tokens; NaN where the variance
    overflows the dtype (inputs past ~1e19 in float32), as LayerNorm gives,
    not a silent 0."""
    var = work.var(dim=2, unbiased=False, keepdim=True)
    return torch.rsqrt(var + eps).masked_fill(var.isinf(), float("nan"))


def frame_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x [B, T, n, D]``: standardise each channel over the frame's n tokens
    (population variance), computed in at least float32; NaN for a channel
    whose variance overflows."""
    work = x.to(work_dtype(x.dtype))
    mean = work.mean(dim=2, keepdim=True)
    return ((work - mean) * _inverse_std(work, eps)).to(x.dtype)


def frame_normalize_backward(grad: torch.Tensor, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Closed-form gradient of :func:`frame_normalize` with respect to ``x``:
    ``rstd * (g - mean(g) - xhat * mean(g * xhat))``, means over the frame."""
    work = x.to(work_dtype(x.dtype))
    g = grad.to(work.dtype)
    mean = work.mean(dim=2, keepdim=True)
    rstd = _inverse_std(work, eps)
    xhat = (work - mean) * rstd
    dx = rstd * (g - g.mean(dim=2, keepdim=True) - xhat * (g * xhat).mean(dim=2, keepdim=True))
    return dx.to(x.dtype)


def score_tokens(x, norm_weight, norm_bias, w1, b1, w2, b2, eps: float = 1e-6) -> torch.Tensor:
    """The selector's score head, ``x [B, n, D]`` -> float32 ``[B, n]`` (one
    output: ``w2 [1, hidden]`` or ``[hidden]``) or ``[B, n, R]`` (``w2 [R,
    hidden]``, R > 1): ``linear(gelu(linear(layer_norm(x), w1, b1)), w2, b2)``
    with the exact GELU, each step in x's dtype as the ``nn.Module`` stack
    computes it (float64 in, float64 out: the oracle)."""
    y = torch.nn.functional.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)
    h = torch.nn.functional.gelu(torch.nn.functional.linear(y, w1, b1))
    out = torch.nn.functional.linear(h, w2.reshape(-1, w1.shape[0]), b2)
    return (out.squeeze(-1) if out.shape[-1] == 1 else out).to(work_dtype(x.dtype))


def score_tokens_backward(grad, x, norm_weight, norm_bias, w1, b1, w2, b2, eps: float = 1e-6):
    """Closed-form gradients of :func:`score_tokens` (computed in at least
    float32) with respect to ``(x, norm_weight, norm_bias, w1, b1, w2, b2)``,
    each in its input's dtype and shape."""
    work = work_dtype(x.dtype)
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
    work = x.to(work_dtype(x.dtype))
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
    # A NaN score (a token with a NaN feature, or squares past the dtype's
    # range) never makes a neighbour.
    score = score.masked_fill(self_mask | score.isnan(), float("inf"))
    nearest = score.argmin(dim=2)
    neighbour = torch.gather(feats, 1, nearest[:, :, None].expand_as(feats))
    d2 = (feats - neighbour).pow(2).sum(dim=-1)
    if metric == "cosine":
        # 1 - u.v = (|u - v|^2 + (1 - |u|^2) + (1 - |v|^2)) / 2; the last two
        # terms are exactly 0 unless |x| < eps.
        short = 1 - (sq / eps**2).clamp(max=1)
        distance = 0.5 * (d2 + short + torch.gather(short, 1, nearest))
    else:
        distance = d2.sqrt()
    no_neighbour = ~(score.amin(dim=2) < float("inf"))
    distance = distance.masked_fill(no_neighbour, float("inf"))
    return distance.masked_fill(sq.isnan(), float("nan"))


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
