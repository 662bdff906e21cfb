"""gather_patch_embed's registered ops (forward, backward, autograd, FLOP
formulas) and the public function."""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch.library import triton_op
from torch.utils.flop_counter import register_flop_formula

from lookwhen_kernels import reference
from lookwhen_kernels.ops._common import (
    FLOAT_DTYPES,
    check_cu_seqlens,
    check_indices,
    check_int,
    check_int32,
    check_offsets,
    check_shape,
    check_tensor,
    checks_values,
    cpu_dispatch,
    use_triton,
)
from lookwhen_kernels.ops.gather_patch_embed.launch import backward, forward_into, n_tokens_of, output_rows


def _reference_forward(clip, indices, weight, bias, pos_embed, mean, std, cu_seqlens, patch_size, downsample):
    return reference.gather_patch_embed(clip, indices, weight, bias, pos_embed, patch_size=patch_size, mean=mean,
                                        std=std, cu_seqlens=cu_seqlens, downsample=downsample)


def _reference_backward(grad, clip, indices, mean, std, cu_seqlens, patch_size, downsample):
    return list(reference.gather_patch_embed_backward(grad, clip, indices, patch_size=patch_size, mean=mean, std=std,
                                                      cu_seqlens=cu_seqlens, downsample=downsample))


@triton_op("lookwhen::gather_patch_embed", mutates_args=())
def _gather_patch_embed(
    clip: torch.Tensor,
    indices: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor,
    pos_embed: torch.Tensor,
    mean: List[float],
    std: List[float],
    cu_seqlens: Optional[torch.Tensor],
    patch_size: int,
    downsample: int,
) -> torch.Tensor:
    if not use_triton(clip):
        args = (clip, indices, weight, bias, pos_embed, mean, std, cu_seqlens, patch_size, downsample)
        return cpu_dispatch("gather_patch_embed", args, _reference_forward)
    total = output_rows(clip, indices, patch_size, downsample)
    out = torch.empty((total, weight.shape[0]), device=clip.device, dtype=weight.dtype)
    return forward_into(out, clip, indices, weight, bias, pos_embed, mean, std, cu_seqlens, patch_size, downsample)


@triton_op("lookwhen::gather_patch_embed_backward", mutates_args=())
def _gather_patch_embed_backward(
    grad: torch.Tensor,
    clip: torch.Tensor,
    indices: Optional[torch.Tensor],
    mean: List[float],
    std: List[float],
    cu_seqlens: Optional[torch.Tensor],
    patch_size: int,
    downsample: int,
) -> List[torch.Tensor]:
    if not use_triton(clip):
        args = (grad, clip, indices, mean, std, cu_seqlens, patch_size, downsample)
        return cpu_dispatch("gather_patch_embed_backward", args, _reference_backward)
    return backward(grad, clip, indices, mean, std, cu_seqlens, patch_size, downsample)


def _setup_context(ctx, inputs, output):
    clip, indices, _, _, _, mean, std, cu_seqlens, patch_size, downsample = inputs
    ctx.save_for_backward(clip, indices, cu_seqlens)
    ctx.static = (mean, std, patch_size, downsample)


def _backward(ctx, grad):
    clip, indices, cu_seqlens = ctx.saved_tensors
    mean, std, patch_size, downsample = ctx.static
    d_weight, d_bias, d_pos = _gather_patch_embed_backward(
        grad, clip, indices, mean, std, cu_seqlens, patch_size, downsample
    )
    return None, None, d_weight, d_bias, d_pos, None, None, None, None, None


_gather_patch_embed.register_autograd(_backward, setup_context=_setup_context)


def _gemm_flops(rows: int, weight_shape) -> int:
    dim, channels, ph, pw = weight_shape
    return 2 * rows * dim * channels * ph * pw


@register_flop_formula(torch.ops.lookwhen.gather_patch_embed)
def _gather_patch_embed_flops(clip_shape, indices_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return _gemm_flops(out_shape[0], weight_shape)


@register_flop_formula(torch.ops.lookwhen.gather_patch_embed_backward)
def _gather_patch_embed_backward_flops(grad_shape, *args, out_shape=None, **kwargs) -> int:
    return _gemm_flops(grad_shape[0], out_shape[0])


def _channel_stats(name: str, values) -> List[float]:
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise ValueError(f"{name}: expected 3 values (one per channel), got shape {tuple(values.shape)}")
        values = values.detach().cpu().tolist()
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a sequence of 3 floats or a [3] tensor, got {values!r}") from None
    if len(values) != 3:
        raise ValueError(f"{name}: expected 3 values (one per channel), got {len(values)}")
    return values


def gather_patch_embed(
    clip: torch.Tensor,
    indices: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor,
    pos_embed: torch.Tensor,
    *,
    patch_size: int,
    mean: Union[Sequence[float], torch.Tensor],
    std: Union[Sequence[float], torch.Tensor],
    cu_seqlens: Optional[torch.Tensor] = None,
    downsample: int = 1,
    validate: bool = True,
) -> torch.Tensor:
    """Embed the selected patches of a uint8 clip into packed tokens.

    ``clip`` is uint8 ``[B, T, H, W, 3]``. With ``p = patch_size`` the token
    grid is ``T x Hp x Wp``, ``Hp = H / (downsample*p)``, ``Wp = W /
    (downsample*p)``, token id ``n = t*Hp*Wp + i*Wp + j``, ``N = T*Hp*Wp``; with
    ``downsample=2`` each patch pixel is the mean of a 2x2 block of the clip.
    Each selected patch is scaled to ``[0, 1]``, normalised with the
    per-channel ``(x / 255 - mean) / std`` (timm's convention), projected with
    ``weight [D, 3, p, p]`` (timm's PatchEmbed conv layout), and ``bias [D]`` and
    the token's row of ``pos_embed [N, D]`` are added.

    ``indices`` selects the tokens: int32 ``[B, K]`` (output ``[B*K, D]``),
    packed int32 ``[total]`` with ``cu_seqlens [B+1]`` (per-clip budgets), or
    ``None`` for every token in order (output ``[B*N, D]``). The output is
    packed ``[total, D]`` in the weight's dtype (fp16, bf16 or fp32; ``bias``
    and ``pos_embed`` share it). Differentiable with respect to ``weight``,
    ``bias`` and ``pos_embed``; the backward recomputes the patches blockwise
    inside a Triton kernel. With ``validate=True`` (the default) the value
    checks read ``indices`` and ``cu_seqlens`` back to the host (a device
    sync; never while torch.compile traces); ``validate=False`` reads nothing.
    ``mean`` and ``std`` given as tensors are read back too: hot paths (and
    torch.compile) pass floats.
    """
    check_tensor("clip", clip, ndim=5, dtypes=(torch.uint8,), contiguous=True)
    batch, frames, height, width, channels = clip.shape
    if channels != 3:
        raise ValueError(f"clip: expected 3 channels in the last dimension, got shape {list(clip.shape)}")
    if downsample not in (1, 2) or isinstance(downsample, bool):
        raise ValueError(f"downsample: expected 1 or 2, got {downsample!r}")
    patch_size = check_int("patch_size", patch_size, 1, types=(int,))
    window = downsample * patch_size
    if height % window or width % window:
        raise ValueError(
            f"clip: H and W must be divisible by downsample*patch_size = {window}, got {height}x{width}"
        )
    n_tokens = n_tokens_of(clip, patch_size, downsample)
    device = clip.device
    check_tensor("weight", weight, ndim=4, dtypes=FLOAT_DTYPES, device=device)
    dim = weight.shape[0]
    check_shape("weight", weight, [dim, 3, patch_size, patch_size])
    check_tensor("bias", bias, dtypes=(weight.dtype,), device=device)
    check_shape("bias", bias, [dim])
    check_tensor("pos_embed", pos_embed, dtypes=(weight.dtype,), device=device)
    check_shape("pos_embed", pos_embed, [n_tokens, dim])
    if indices is None:
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens: only meaningful with packed 1-d indices, but indices is None")
    else:
        check_tensor("indices", indices, dtypes=(torch.int32,), device=device, contiguous=True)
        if indices.dim() == 2:
            check_shape("indices", indices, [batch, None])
            if cu_seqlens is not None:
                raise ValueError("cu_seqlens: only meaningful with packed 1-d indices, got 2-d indices")
        elif indices.dim() == 1:
            if cu_seqlens is None:
                raise ValueError("cu_seqlens: required with packed 1-d indices (per-clip budgets)")
            check_offsets("cu_seqlens", cu_seqlens, batch=batch, device=device)
        else:
            raise ValueError(
                f"indices: expected [B, K] or packed [total] (with cu_seqlens), got shape {list(indices.shape)}"
            )
        if checks_values(validate, indices):
            check_indices("indices", indices, n_tokens, device=device)
            if cu_seqlens is not None:
                check_cu_seqlens("cu_seqlens", cu_seqlens, batch=batch, total=indices.numel(), device=device)
    check_int32("indices" if indices is not None else "clip", output_rows(clip, indices, patch_size, downsample),
                "the number of output rows")
    mean = _channel_stats("mean", mean)
    std = _channel_stats("std", std)
    if not all(s > 0 for s in std):
        raise ValueError(f"std: every value must be positive, got {std}")
    return _gather_patch_embed(clip, indices, weight, bias, pos_embed, mean, std, cu_seqlens, patch_size, downsample)
