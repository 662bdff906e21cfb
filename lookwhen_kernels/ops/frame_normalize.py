"""``frame_normalize``: per-frame, per-channel standardisation of teacher
features (the DINOv3 image-teacher target).

One program owns one frame and a block of channels. It streams the frame's
tokens once to get mean and M2 (chunk statistics merged with Chan's parallel
formula: exact, no E[x^2] - E[x]^2 cancellation) and once more to write, so a
frame of any length runs with a fixed register budget. The backward kernel
recomputes the same statistics, then makes one pass for the two reductions it
needs and one to write dx.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from lookwhen_kernels import reference
from lookwhen_kernels.ops._common import (
    CompileSpec,
    FLOAT_DTYPES,
    TRITON_DTYPE,
    check_int32,
    check_real,
    check_tensor,
    cpu_dispatch,
    use_triton,
    wrap_triton,
)
from lookwhen_kernels.ops.triton_versions import FRAME_NORMALIZE_FWD_WARPS

BLOCK_N = 32
BLOCK_D = 64


@triton.jit
def _frame_stats(x_ptr, base, cols, col_ok, n_tokens, channels, eps, BLOCK_N: tl.constexpr):
    """Mean and 1/sqrt(var + eps) of one frame's block of channels."""
    mean = tl.zeros(cols.shape, dtype=tl.float32)
    m2 = tl.zeros(cols.shape, dtype=tl.float32)
    for start in range(0, n_tokens, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < n_tokens) & col_ok[None, :]
        tile = tl.load(x_ptr + base + rows[:, None] * channels + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        count = tl.minimum(n_tokens - start, BLOCK_N).to(tl.float32)
        chunk_mean = tl.sum(tile, axis=0) / count
        centred = tl.where(mask, tile - chunk_mean[None, :], 0.0)
        chunk_m2 = tl.sum(centred * centred, axis=0)
        seen = start * 1.0
        total = seen + count
        delta = chunk_mean - mean
        mean = mean + delta * (count / total)
        m2 = m2 + chunk_m2 + delta * delta * (seen * count / total)
    return mean, 1.0 / tl.sqrt(m2 / n_tokens + eps)


@triton.jit
def _frame_normalize_fwd(
    x_ptr, out_ptr,
    n_tokens, channels, eps,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    frame = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < channels
    base = frame.to(tl.int64) * n_tokens * channels
    mean, rstd = _frame_stats(x_ptr, base, cols, col_ok, n_tokens, channels, eps, BLOCK_N)
    for start in range(0, n_tokens, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < n_tokens) & col_ok[None, :]
        offsets = base + rows[:, None] * channels + cols[None, :]
        tile = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        y = (tile - mean[None, :]) * rstd[None, :]
        tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _frame_normalize_bwd(
    x_ptr, grad_ptr, dx_ptr,
    n_tokens, channels, eps,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), means over the frame.
    # The statistics are recomputed (one more read of a cache-resident frame)
    # rather than saved, so the forward writes nothing but its output.
    frame = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < channels
    base = frame.to(tl.int64) * n_tokens * channels
    mean, rstd = _frame_stats(x_ptr, base, cols, col_ok, n_tokens, channels, eps, BLOCK_N)
    sum_g = tl.zeros([BLOCK_D], dtype=tl.float32)
    sum_gx = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, n_tokens, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < n_tokens) & col_ok[None, :]
        offsets = base + rows[:, None] * channels + cols[None, :]
        g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        xhat = (tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) - mean[None, :]) * rstd[None, :]
        sum_g += tl.sum(g, axis=0)
        sum_gx += tl.sum(tl.where(mask, g * xhat, 0.0), axis=0)
    mean_g = sum_g / n_tokens
    mean_gx = sum_gx / n_tokens
    for start in range(0, n_tokens, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < n_tokens) & col_ok[None, :]
        offsets = base + rows[:, None] * channels + cols[None, :]
        g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        xhat = (tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) - mean[None, :]) * rstd[None, :]
        dx = rstd[None, :] * (g - mean_g[None, :] - xhat * mean_gx[None, :])
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _grid(x: torch.Tensor):
    batch, frames, _, channels = x.shape
    return (batch * frames, triton.cdiv(channels, BLOCK_D))


@triton_op("lookwhen::frame_normalize", mutates_args=())
def _frame_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    if not use_triton(x):
        return cpu_dispatch("frame_normalize", (x, eps), reference.frame_normalize)
    out = torch.empty_like(x)
    if x.numel():
        _, _, n_tokens, channels = x.shape
        wrap_triton(_frame_normalize_fwd)[_grid(x)](
            x, out, n_tokens, channels, eps, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=FRAME_NORMALIZE_FWD_WARPS
        )
    return out


@triton_op("lookwhen::frame_normalize_backward", mutates_args=())
def _frame_normalize_backward(grad: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    if not use_triton(x):
        return cpu_dispatch("frame_normalize_backward", (grad, x, eps), reference.frame_normalize_backward)
    dx = torch.empty_like(x)
    if x.numel():
        _, _, n_tokens, channels = x.shape
        wrap_triton(_frame_normalize_bwd)[_grid(x)](
            x, grad.contiguous(), dx, n_tokens, channels, eps, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D
        )
    return dx


def _setup_context(ctx, inputs, output):
    x, eps = inputs
    ctx.save_for_backward(x)
    ctx.eps = eps


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return _frame_normalize_backward(grad, x, ctx.eps), None


_frame_normalize.register_autograd(_backward, setup_context=_setup_context)


def frame_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Standardise teacher token features per frame and channel.

    ``x [B, T, n, D]`` (fp16, bf16 or fp32): subtract the mean over the frame's
    ``n`` tokens and divide by ``sqrt(var + eps)`` with the population variance.
    Returns a tensor like ``x``. Differentiable.
    """
    check_tensor("x", x, ndim=4, dtypes=FLOAT_DTYPES, contiguous=True)
    check_int32("x", x.shape[2] * x.shape[3], "the element count of one frame")
    if x.shape[2] == 0:
        raise ValueError("x: a frame needs at least one token (dimension 2 is 0)")
    return _frame_normalize(x, check_real("eps", eps, "(0, inf]"))


def compile_specs():
    specs = []
    blocks = {"BLOCK_N": BLOCK_N, "BLOCK_D": BLOCK_D}
    scalars = {"n_tokens": "i32", "channels": "i32", "eps": "fp32", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"}
    for dtype in FLOAT_DTYPES:
        ty = TRITON_DTYPE[dtype]
        specs.append(CompileSpec(
            f"frame_normalize_fwd[{ty}]", _frame_normalize_fwd,
            {"x_ptr": f"*{ty}", "out_ptr": f"*{ty}", **scalars}, blocks, num_warps=FRAME_NORMALIZE_FWD_WARPS,
        ))
        specs.append(CompileSpec(
            f"frame_normalize_bwd[{ty}]", _frame_normalize_bwd,
            {"x_ptr": f"*{ty}", "grad_ptr": f"*{ty}", "dx_ptr": f"*{ty}", **scalars}, blocks,
        ))
    return specs
