"""``gather_patch_embed``: patch embedding of selected tokens, straight from the
uint8 clip.

A forward program owns ``BLOCK_M`` packed output rows x ``BLOCK_N`` channels.
It turns each row's token id into the clip offset of its patch once, then walks
the reduction dimension in ``BLOCK_K`` chunks: uint8 pixels are loaded from the
clip, cast to the weight's dtype and fed to ``tl.dot`` (tensor cores) with a
chunk of the weight, accumulating in float32. No patch tensor exists in memory.

Normalisation is folded into the GEMM operands on the host, once per call (a
``D x 3*p*p`` elementwise op, tiny next to the GEMM). With ``s_c = 1 / (255
std_c)`` and ``o_c = (128/255 - mean_c) / std_c`` the normalised pixel is
``(x - 128) * s_c + o_c``, so

    out[d] = sum_k (W[d,k] s_k) (x_k - 128) + (bias[d] + sum_k W[d,k] o_k) + pos[n, d].

The kernel's A operand is the centred raw pixel ``(x - 128) / 256``, an
integer over a power of two that fp16 and bf16 hold exactly; the weight is
pre-scaled by ``256 s`` (about ``W / std``: the power of two keeps it out of
fp16's subnormal range) and the mean term lives in a float32 effective bias.
The inner loop does no normalisation arithmetic at all, and centring at 128
(rather than feeding ``x`` in ``[0, 255]``) keeps the products as small as in
the normalised formulation, so rounding the scaled weight costs no more
accuracy than rounding normalised pixels would.

The reduction runs over the patch's *window* in the clip, in the clip's own
byte order: ``py`` (patch row), then the ``3 * p * downsample`` contiguous bytes
of that clip row. With ``downsample=2`` the A operand sums the window's two
clip rows (``(a + b - 256) / 256``, still exact in fp16 and bf16) and the
weight holds each entry twice (once per clip column it averages) divided by 4,
so the 2x2 mean happens inside the GEMM. That doubles the selector's (small)
tensor-core work but keeps every pixel load a contiguous run that the compiler
turns into vector ``cp.async`` copies (for ViT-B/16 at 224: 8 bytes per
thread, pipelined like the weight), instead of four scalar byte loads per
element held in registers.

Backward (a Triton kernel too, no patch tensor either): the kernel computes
``G = A^T @ grad`` over the same window layout (float32, tensor cores) and the
host folds it back: ``d_weight = 256 s * G + o * colsum(grad)``, with ``G``
summed over the clip columns a downsampled pixel averages and divided by
``downsample^2``. ``d_bias`` is the
column sum of ``grad``; ``d_pos_embed`` adds every row of ``grad`` into
``[N, D]`` at its token id (``index_add``; a one-hot GEMM in deterministic
mode, where the atomic adds' order must not vary).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton
from torch.utils.flop_counter import register_flop_formula

from lookwhen_kernels import reference
from lookwhen_kernels.layout import segment_sum
from lookwhen_kernels.ops._common import (
    FLOAT_DTYPES,
    TRITON_DTYPE,
    CompileSpec,
    check_cu_seqlens,
    check_indices,
    check_int32,
    check_offsets,
    check_shape,
    check_tensor,
    checks_values,
    deterministic,
    dot_precision,
    native_kernel,
    use_triton,
)

# A power of two: scaling the integer pixels by it is exact, and it lifts the
# pre-scaled weight (~ W / std) out of fp16's subnormal range, where W / (255
# std) of a typical |W| ~ 0.01 would land.
PIXEL_SCALE = tl.constexpr(1.0 / 256)


@triton.jit
def _row_tokens(rows, row_ok, ids_ptr, cu_ptr, n_clips, rows_per_clip, HAS_IDS: tl.constexpr, HAS_CU: tl.constexpr):
    """Clip index and token id of each packed row."""
    if HAS_CU:
        # Row r belongs to clip b when cu[b] <= r < cu[b+1]; counting the
        # offsets <= r also steps over empty clips. B is small.
        clip = tl.zeros_like(rows)
        for b in range(1, n_clips):
            clip += (rows >= tl.load(cu_ptr + b)).to(tl.int32)
    else:
        clip = rows // rows_per_clip
    if HAS_IDS:
        token = tl.load(ids_ptr + rows, mask=row_ok, other=0)
    else:
        token = rows - clip * rows_per_clip
    return clip, token


@triton.jit
def _patch_origin(clip, token, frames, height, width, grid_w, grid_hw, WINDOW: tl.constexpr):
    """Byte offset of each token's top-left pixel in the clip (int64)."""
    t = token // grid_hw
    rest = token - t * grid_hw
    i = rest // grid_w
    j = rest - i * grid_w
    frame = clip.to(tl.int64) * frames + t
    return ((frame * height + i * WINDOW) * width + j * WINDOW) * 3


@triton.jit
def _window_offsets(origin, kk, width, RUN: tl.constexpr, DOWNSAMPLE: tl.constexpr):
    """Byte offsets ``[rows, k]`` of reduction index ``kk``: patch row ``py``
    starts ``DOWNSAMPLE * py`` clip rows below the origin, and the rest of ``kk``
    runs through the row's ``RUN`` contiguous bytes."""
    py = kk // RUN
    return origin[:, None] + (py * (DOWNSAMPLE * 3) * width + (kk - py * RUN))[None, :]


@triton.jit
def _window_pixels(clip_ptr, offsets, mask, width, DOWNSAMPLE: tl.constexpr):
    """The GEMM's A operand in float32: the sum over the window's
    ``DOWNSAMPLE`` clip rows, centred (``- 128 * DOWNSAMPLE``) and times
    ``PIXEL_SCALE``; masked elements are 0."""
    x = tl.load(clip_ptr + offsets, mask=mask, other=128).to(tl.int32)
    for dy in tl.static_range(1, DOWNSAMPLE):
        x += tl.load(clip_ptr + offsets + dy * 3 * width, mask=mask, other=128).to(tl.int32)
    return (x - 128 * DOWNSAMPLE).to(tl.float32) * PIXEL_SCALE


@triton.jit
def _gather_patch_embed_fwd(
    clip_ptr, ids_ptr, cu_ptr, w_ptr, b_ptr, pos_ptr, out_ptr,
    total, n_clips, rows_per_clip, frames, height, width, grid_w, grid_hw, dim,
    PATCH: tl.constexpr, DOWNSAMPLE: tl.constexpr, HAS_IDS: tl.constexpr, HAS_CU: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    RUN: tl.constexpr = 3 * PATCH * DOWNSAMPLE
    KDIM: tl.constexpr = RUN * PATCH
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < total
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < dim
    clip, token = _row_tokens(rows, row_ok, ids_ptr, cu_ptr, n_clips, rows_per_clip, HAS_IDS, HAS_CU)
    origin = _patch_origin(clip, token, frames, height, width, grid_w, grid_hw, DOWNSAMPLE * PATCH)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, KDIM, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < KDIM
        offsets = _window_offsets(origin, kk, width, RUN, DOWNSAMPLE)
        x = _window_pixels(clip_ptr, offsets, row_ok[:, None] & k_ok[None, :], width, DOWNSAMPLE)
        w = tl.load(w_ptr + kk[:, None] * dim + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(x.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
    bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0)
    mask = row_ok[:, None] & col_ok[None, :]
    pos = tl.load(pos_ptr + token[:, None].to(tl.int64) * dim + cols[None, :], mask=mask, other=0.0)
    out = acc + bias[None, :] + pos.to(tl.float32)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * dim + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gather_patch_embed_bwd_weight(
    clip_ptr, ids_ptr, cu_ptr, grad_ptr, g_ptr,
    total, n_clips, rows_per_clip, frames, height, width, grid_w, grid_hw, dim,
    PATCH: tl.constexpr, DOWNSAMPLE: tl.constexpr, HAS_IDS: tl.constexpr, HAS_CU: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # G[k, d] = sum over rows of A[row, k] * grad[row, d] (A: the forward's
    # centred window pixels); a program owns a [BLOCK_K, BLOCK_D] tile of G
    # and streams every row.
    RUN: tl.constexpr = 3 * PATCH * DOWNSAMPLE
    KDIM: tl.constexpr = RUN * PATCH
    kk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = kk < KDIM
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for r0 in range(0, total, BLOCK_ROWS):
        rows = r0 + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < total
        clip, token = _row_tokens(rows, row_ok, ids_ptr, cu_ptr, n_clips, rows_per_clip, HAS_IDS, HAS_CU)
        origin = _patch_origin(clip, token, frames, height, width, grid_w, grid_hw, DOWNSAMPLE * PATCH)
        offsets = _window_offsets(origin, kk, width, RUN, DOWNSAMPLE)
        x = _window_pixels(clip_ptr, offsets, row_ok[:, None] & k_ok[None, :], width, DOWNSAMPLE)
        g = tl.load(
            grad_ptr + rows[:, None].to(tl.int64) * dim + cols[None, :],
            mask=row_ok[:, None] & col_ok[None, :], other=0.0,
        )
        acc = tl.dot(tl.trans(x.to(g.dtype)), g, acc, input_precision=DOT_PRECISION)
    tl.store(g_ptr + kk[:, None] * dim + cols[None, :], acc, mask=k_ok[:, None] & col_ok[None, :])


def _folding(mean: Sequence[float], std: Sequence[float], device):
    """Per channel: the weight scale ``s`` and offset ``o`` with
    ``(x / 255 - mean) / std = (x - 128) * PIXEL_SCALE * s + o``."""
    scale = [1.0 / (255.0 * PIXEL_SCALE.value * sd) for sd in std]
    offset = [(128.0 / 255.0 - m) / sd for m, sd in zip(mean, std)]
    return _device_vector(scale, device), _device_vector(offset, device)


def _device_vector(values: Sequence[float], device) -> torch.Tensor:
    """float32 ``[len(values)]`` written on the device by fill kernels: a
    host-built tensor's copy to a GPU would block the host on every call."""
    return torch.stack([torch.full((), v, dtype=torch.float32, device=device) for v in values])


def _window_weight(weight: torch.Tensor, scale: torch.Tensor, downsample: int) -> torch.Tensor:
    """The kernel's B operand ``[p * downsample*p * 3, D]`` in the weight's
    dtype: scaled by ``s``, in the window's (py, clip column, c) order; each
    weight appears once per clip column it averages, divided by downsample^2."""
    dim = weight.shape[0]
    w = weight.permute(0, 2, 3, 1).float() * (scale / downsample**2)
    w = w.repeat_interleave(downsample, dim=2)
    return w.reshape(dim, -1).to(weight.dtype).t().contiguous()


def _forward_blocks(dtype: torch.dtype, dim: int) -> dict:
    # 16-bit tiles fit one Hopper warpgroup MMA (64 x 128 x 64). fp32 runs
    # tl.dot as exact FMAs, which need smaller tiles to stay out of spills.
    half = dtype != torch.float32
    return {"BLOCK_M": 64, "BLOCK_N": min(128 if half else 64, max(16, triton.next_power_of_2(dim))),
            "BLOCK_K": 64 if half else 32}


def _backward_blocks(dtype: torch.dtype, dim: int) -> dict:
    half = dtype != torch.float32
    return {"BLOCK_ROWS": 64 if half else 32, "BLOCK_K": 64,
            "BLOCK_D": min(128 if half else 64, max(16, triton.next_power_of_2(dim)))}


def _n_tokens(clip: torch.Tensor, patch_size: int, downsample: int) -> int:
    _, frames, height, width, _ = clip.shape
    window = patch_size * downsample
    return frames * (height // window) * (width // window)


def _rows(clip: torch.Tensor, indices: Optional[torch.Tensor], patch_size: int, downsample: int) -> int:
    """Packed output rows: every token of every clip, or one per index."""
    return clip.shape[0] * _n_tokens(clip, patch_size, downsample) if indices is None else indices.numel()


def _geometry(clip: torch.Tensor, indices: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
              patch_size: int, downsample: int):
    """Launch arguments shared by both kernels: ids and offsets pointers (a
    dummy when absent), row counts and the token grid."""
    batch, frames, height, width, _ = clip.shape
    window = patch_size * downsample
    grid_w = width // window
    grid_hw = (height // window) * grid_w
    total = _rows(clip, indices, patch_size, downsample)
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


def _forward_into(out, clip, indices, weight, bias, pos_embed, mean, std, cu_seqlens, patch_size, downsample):
    """Launch the forward kernel, writing every element of ``out [total, D]``."""
    dim = weight.shape[0]
    ids, cu, args, flags = _geometry(clip, indices, cu_seqlens, patch_size, downsample)
    total = args[0]
    if total == 0 or dim == 0:
        return out
    scale, offset = _folding(mean, std, clip.device)
    w_window = _window_weight(weight, scale, downsample)
    b_eff = bias.float() + (weight.float() * offset[:, None, None]).sum((1, 2, 3))
    blocks = _forward_blocks(weight.dtype, dim)
    grid = (triton.cdiv(total, blocks["BLOCK_M"]), triton.cdiv(dim, blocks["BLOCK_N"]))
    wrap_triton(_gather_patch_embed_fwd)[grid](
        clip, ids, cu, w_window, b_eff, pos_embed.contiguous(), out, *args, dim,
        **flags, DOT_PRECISION=dot_precision(weight.dtype), **blocks,
    )
    return out


def _window_grad_into(g, grad, clip, indices, cu_seqlens, patch_size, downsample):
    """Launch the backward kernel: ``g [p * downsample*p * 3, D]`` (float32)
    receives ``A^T @ grad``, every element written (zeros when no rows)."""
    dim = grad.shape[1]
    if dim == 0:
        return g
    ids, cu, args, flags = _geometry(clip, indices, cu_seqlens, patch_size, downsample)
    blocks = _backward_blocks(grad.dtype, dim)
    grid = (triton.cdiv(g.shape[0], blocks["BLOCK_K"]), triton.cdiv(dim, blocks["BLOCK_D"]))
    wrap_triton(_gather_patch_embed_bwd_weight)[grid](
        clip, ids, cu, grad, g, *args, dim, **flags, DOT_PRECISION=dot_precision(grad.dtype), **blocks,
    )
    return g


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
        native = native_kernel("gather_patch_embed", clip)
        if native is not None:
            return native(clip, indices, weight, bias, pos_embed, mean, std, cu_seqlens, patch_size, downsample)
        return reference.gather_patch_embed(
            clip, indices, weight, bias, pos_embed, patch_size=patch_size, mean=mean, std=std,
            cu_seqlens=cu_seqlens, downsample=downsample,
        )
    total = _rows(clip, indices, patch_size, downsample)
    out = torch.empty((total, weight.shape[0]), device=clip.device, dtype=weight.dtype)
    return _forward_into(out, clip, indices, weight, bias, pos_embed, mean, std, cu_seqlens, patch_size, downsample)


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
        native = native_kernel("gather_patch_embed_backward", clip)
        if native is not None:
            return native(grad, clip, indices, mean, std, cu_seqlens, patch_size, downsample)
        return list(reference.gather_patch_embed_backward(
            grad, clip, indices, patch_size=patch_size, mean=mean, std=std,
            cu_seqlens=cu_seqlens, downsample=downsample,
        ))
    grad = grad.contiguous()
    dim = grad.shape[1]
    g = torch.empty((3 * patch_size * patch_size * downsample, dim), device=clip.device, dtype=torch.float32)
    _window_grad_into(g, grad, clip, indices, cu_seqlens, patch_size, downsample)
    grad_sum = grad.float().sum(0)
    scale, offset = _folding(mean, std, clip.device)
    # Undo the window layout (a weight was used once per clip column it
    # averages, scaled by 1/downsample^2), then the chain rule through the
    # folding.
    g = g.t().reshape(dim, patch_size, patch_size, downsample, 3).sum(3) / downsample**2
    d_weight = (g * scale + offset * grad_sum[:, None, None, None]).permute(0, 3, 1, 2).contiguous()
    n_tokens = _n_tokens(clip, patch_size, downsample)
    if indices is None:
        d_pos = grad.float().reshape(clip.shape[0], n_tokens, dim).sum(0)
    else:
        d_pos = _token_sum(grad.float(), indices.reshape(-1), n_tokens)
    return [d_weight.to(grad.dtype), grad_sum.to(grad.dtype), d_pos.to(grad.dtype)]


def _token_sum(rows: torch.Tensor, tokens: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Rows added up per token id: atomic ``index_add_`` (fast; the order of
    the adds varies), or in deterministic mode a fixed-order GEMM."""
    if deterministic():
        return segment_sum(rows, tokens, n_tokens)
    return rows.new_zeros((n_tokens, rows.shape[1])).index_add_(0, tokens, rows)


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
    if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1:
        raise ValueError(f"patch_size: expected a positive int, got {patch_size!r}")
    window = downsample * patch_size
    if height % window or width % window:
        raise ValueError(
            f"clip: H and W must be divisible by downsample*patch_size = {window}, got {height}x{width}"
        )
    n_tokens = _n_tokens(clip, patch_size, downsample)
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
    check_int32("indices" if indices is not None else "clip", _rows(clip, indices, patch_size, downsample),
                "the number of output rows")
    mean = _channel_stats("mean", mean)
    std = _channel_stats("std", std)
    if not all(s > 0 for s in std):
        raise ValueError(f"std: every value must be positive, got {std}")
    return _gather_patch_embed(clip, indices, weight, bias, pos_embed, mean, std, cu_seqlens, patch_size, downsample)


def _spec_signature(ty: str, forward: bool) -> dict:
    ptrs = {"clip_ptr": "*u8", "ids_ptr": "*i32", "cu_ptr": "*i32"}
    if forward:
        ptrs |= {"w_ptr": f"*{ty}", "b_ptr": "*fp32", "pos_ptr": f"*{ty}", "out_ptr": f"*{ty}"}
    else:
        ptrs |= {"grad_ptr": f"*{ty}", "g_ptr": "*fp32"}
    ints = ("total", "n_clips", "rows_per_clip", "frames", "height", "width", "grid_w", "grid_hw", "dim")
    consts = ("PATCH", "DOWNSAMPLE", "HAS_IDS", "HAS_CU", "DOT_PRECISION")
    blocks = ("BLOCK_M", "BLOCK_N", "BLOCK_K") if forward else ("BLOCK_ROWS", "BLOCK_K", "BLOCK_D")
    return ptrs | {k: "i32" for k in ints} | {k: "constexpr" for k in consts + blocks}


# The two real configurations, on 16-frame 224x224 clips: the extractor embeds
# a fixed budget of full-resolution ViT-B/16 tokens (D=768, K ~ 314 per clip),
# the selector every token of the half-resolution clip (D=384, 784 per clip).
FRAMES, SIZE, PATCH = 16, 224, 16
CONFIGS = (
    ("extractor", {"dim": 768, "downsample": 1, "rows_per_clip": 314, "has_ids": True}),
    ("selector", {"dim": 384, "downsample": 2, "rows_per_clip": 784, "has_ids": False}),
)


def compile_specs():
    specs = []
    for dtype in FLOAT_DTYPES:
        ty = TRITON_DTYPE[dtype]
        for name, cfg in CONFIGS:
            grid_w = SIZE // (PATCH * cfg["downsample"])
            ints = {"rows_per_clip": cfg["rows_per_clip"], "frames": FRAMES, "height": SIZE, "width": SIZE,
                    "grid_w": grid_w, "grid_hw": grid_w * grid_w, "dim": cfg["dim"]}
            common = {
                "PATCH": PATCH, "DOWNSAMPLE": cfg["downsample"], "HAS_IDS": cfg["has_ids"], "HAS_CU": False,
                "DOT_PRECISION": dot_precision(dtype),
            }
            options = {
                "tensor_cores": dtype != torch.float32,
                "divisible_by_16": tuple(k for k, v in ints.items() if v % 16 == 0),
            }
            specs.append(CompileSpec(
                f"gather_patch_embed_fwd[{name},{ty}]", _gather_patch_embed_fwd, _spec_signature(ty, True),
                common | _forward_blocks(dtype, cfg["dim"]), **options,
            ))
            specs.append(CompileSpec(
                f"gather_patch_embed_bwd[{name},{ty}]", _gather_patch_embed_bwd_weight, _spec_signature(ty, False),
                common | _backward_blocks(dtype, cfg["dim"]), **options,
            ))
    return specs
