"""Plain-PyTorch implementation of every op.

Two jobs: the test oracle (called on float64 inputs) and the CPU path (called
on the caller's dtype when Triton is not in play). Written for clarity, not
speed: each function is the contract of its op, stated in code.
"""
from __future__ import annotations

import torch


def frame_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x [B, T, n, D]``: standardise each channel over the frame's n tokens
    (population variance), computed in at least float32."""
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    mean = work.mean(dim=2, keepdim=True)
    var = work.var(dim=2, unbiased=False, keepdim=True)
    return ((work - mean) * torch.rsqrt(var + eps)).to(x.dtype)


def frame_normalize_backward(grad: torch.Tensor, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Closed-form gradient of :func:`frame_normalize` with respect to ``x``:
    ``rstd * (g - mean(g) - xhat * mean(g * xhat))``, means over the frame."""
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    g = grad.to(work.dtype)
    mean = work.mean(dim=2, keepdim=True)
    rstd = torch.rsqrt(work.var(dim=2, unbiased=False, keepdim=True) + eps)
    xhat = (work - mean) * rstd
    dx = rstd * (g - g.mean(dim=2, keepdim=True) - xhat * (g * xhat).mean(dim=2, keepdim=True))
    return dx.to(x.dtype)
