"""From tensors to gather_patch_embed's kernel launches: the normalisation
folded into the GEMM operands, the window layout of the weight, tile sizes,
and the host side of the backward."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton

from lookwhen_kernels.layout import segment_sum
from lookwhen_kernels.ops._common import deterministic, dot_precision, wrap_triton
from lookwhen_kernels.ops.gather_patch_embed.kernels import (
    PIXEL_SCALE,
    gather_patch_embed_bwd_weight,
    gather_patch_embed_fwd,
)


def folding(mean: Sequence[float], std: Sequence[float], device):
    """Per channel: the weight scale ``s`` and offset ``o`` with
    ``(x / 255 - mean) / std = (x - 128) * PIXEL_SCALE * s + o``."""
    scale = [1.0 / (255.0 * PIXEL_SCALE.value * sd) for sd in std]
    offset = [(128.0 / 255.0 - m) / sd for m, sd in zip(mean, std)]
    return device_vector(scale, device), device_vector(offset, device)


def device_vector(values: Sequence[float], device) -> torch.Tensor:
    """float32 ``[len(values)]`` written on the device by fill kernels: a
    host-built tensor's copy to a GPU would block the host on every call."""
    return torch.stack([torch.full((), v, dtype=torch.float32, device=device) for v in values])


def window_weight(weight: torch.Tensor, scale: torch.Tensor, downsample: int) -> torch.Tensor:
    """The kernel's B operand ``[p * downsample*p * 3, D]`` in the weight's
    dtype: scaled by ``s``, in the window's (py, clip column, c) order; each
    weight appears once per clip column it averages, divided by downsample^2."""
    dim = weight.shape[0]
    w = weight.permute(0, 2, 3, 1).float() * (scale / downsample**2)
    w = w.repeat_interleave(downsample, dim=2)
    return w.reshape(dim, -1).to(weight.dtype).t().contiguous()


def forward_blocks(dtype: torch.dtype, dim: int) -> dict:
    # 16-bit tiles fit one Hopper warpgroup MMA (64 x 128 x 64). fp32 runs
    # tl.dot as exact FMAs, which need smaller tiles to stay out of spills.
    half = dtype != torch.float32
    return {"BLOCK_M": 64, "BLOCK_N": min(128 if half else 64, max(16, triton.next_power_of_2(dim))),
            "BLOCK_K": 64 if half else 32}


def backward_blocks(dtype: torch.dtype, dim: int) -> dict:
    half = dtype != torch.float32
    return {"BLOCK_ROWS": 64 if half else 32, "BLOCK_K": 64,
            "BLOCK_D": min(128 if half else 64, max(16, triton.next_power_of_2(dim)))}


def n_tokens_of(clip: torch.Tensor, patch_size: int, downsample: int) -> int:
    _, frames, height, width, _ = clip.shape
    window = patch_size * downsample
    return frames * (height // window) * (width // window)


def output_rows(clip: torch.Tensor, indices: Optional[torch.Tensor], patch_size: int, downsample: int) -> int:
    """Packed output rows: every token of every clip, or one per index."""
    return clip.shape[0] * n_tokens_of(clip, patch_size, downsample) if indices is None else indices.numel()


def geometry(clip: torch.Tensor, indices: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
              patch_size: int, downsample: int):
    """Launch arguments shared by both kernels: ids and offsets pointers (a
    dummy when absent), row counts and the token grid."""
    batch, frames, height, width, _ = clip.shape
    window = patch_size * downsample
    grid_w = width // window
    grid_hw = (height // window) * grid_w
    total = output_rows(clip, indices, patch_size, downsample)
    if indices is None:
        ids, rows_per_clip = clip, frames * grid_hw
    else:
        ids, rows_per_clip = indices, indices.shape[1] if indices.dim() == 2 else 1
    cu = clip if cu_seqlens is None else cu_seqlens
    args = (total, batch, max(rows_per_clip, 1), frames, height, width, grid_w, grid_hw)
    flags = {
        "PATCH": patch_size, "DOWNSAMPLE": downsample,
        "HAS_IDS": indices is not None, "HAS_CU": cu_seqlens is not None,
    }
    return ids, cu, args, flags


def forward_into(out, clip, indices, weight, bias, pos_embed, mean, std, cu_seqlens, patch_size, downsample):
    """Launch the forward kernel, writing every element of ``out [total, D]``."""
    dim = weight.shape[0]
    ids, cu, args, flags = geometry(clip, indices, cu_seqlens, patch_size, downsample)
    total = args[0]
    if total == 0 or dim == 0:
        return out
    scale, offset = folding(mean, std, clip.device)
    w_window = window_weight(weight, scale, downsample)
    b_eff = bias.float() + (weight.float() * offset[:, None, None]).sum((1, 2, 3))
    blocks = forward_blocks(weight.dtype, dim)
    grid = (triton.cdiv(total, blocks["BLOCK_M"]), triton.cdiv(dim, blocks["BLOCK_N"]))
    wrap_triton(gather_patch_embed_fwd)[grid](
        clip, ids, cu, w_window, b_eff, pos_embed.contiguous(), out, *args, dim,
        **flags, DOT_PRECISION=dot_precision(weight.dtype), **blocks,
    )
    return out


def window_grad_into(g, grad, clip, indices, cu_seqlens, patch_size, downsample):
    """Launch the backward kernel: ``g [p * downsample*p * 3, D]`` (float32)
    receives ``A^T @ grad``, every element written (zeros when no rows)."""
    dim = grad.shape[1]
    if dim == 0:
        return g
    ids, cu, args, flags = geometry(clip, indices, cu_seqlens, patch_size, downsample)
    blocks = backward_blocks(grad.dtype, dim)
    grid = (triton.cdiv(g.shape[0], blocks["BLOCK_K"]), triton.cdiv(dim, blocks["BLOCK_D"]))
    wrap_triton(gather_patch_embed_bwd_weight)[grid](
        clip, ids, cu, grad, g, *args, dim, **flags, DOT_PRECISION=dot_precision(grad.dtype), **blocks,
    )
    return g


def backward(grad, clip, indices, mean, std, cu_seqlens, patch_size, downsample):
    """``[d_weight, d_bias, d_pos_embed]`` from the backward kernel's
    ``A^T @ grad`` and the folding of the normalisation."""
    grad = grad.contiguous()
    dim = grad.shape[1]
    g = torch.empty((3 * patch_size * patch_size * downsample, dim), device=clip.device, dtype=torch.float32)
    window_grad_into(g, grad, clip, indices, cu_seqlens, patch_size, downsample)
    grad_sum = grad.float().sum(0)
    scale, offset = folding(mean, std, clip.device)
    # Undo the window layout (a weight was used once per clip column it
    # averages, scaled by 1/downsample^2), then the chain rule through the
    # folding.
    g = g.t().reshape(dim, patch_size, patch_size, downsample, 3).sum(3) / downsample**2
    d_weight = (g * scale + offset * grad_sum[:, None, None, None]).permute(0, 3, 1, 2).contiguous()
    n_tokens = n_tokens_of(clip, patch_size, downsample)
    if indices is None:
        d_pos = grad.float().reshape(clip.shape[0], n_tokens, dim).sum(0)
    else:
        d_pos = token_sum(grad.float(), indices.reshape(-1), n_tokens)
    return [d_weight.to(grad.dtype), grad_sum.to(grad.dtype), d_pos.to(grad.dtype)]


def token_sum(rows: torch.Tensor, tokens: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Rows added up per token id: atomic ``index_add_`` (fast; the order of
    the adds varies), or in deterministic mode a fixed-order GEMM."""
    if deterministic():
        return segment_sum(rows, tokens, n_tokens)
    return rows.new_zeros((n_tokens, rows.shape[1])).index_add_(0, tokens, rows)
