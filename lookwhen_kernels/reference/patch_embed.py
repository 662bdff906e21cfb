"""References of the patch embedding: the normalised patches of selected
tokens, ``gather_patch_embed`` and its gradients."""
from __future__ import annotations

import functools
import operator

import torch

from lookwhen_kernels.layout import patch_rows
from lookwhen_kernels.ops._common import work_dtype


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
    work = work_dtype(weight.dtype)
    patches = gather_patches(
        clip, indices, patch_size=patch_size, mean=mean, std=std,
        cu_seqlens=cu_seqlens, downsample=downsample, dtype=work,
    ).to(weight.dtype).to(work)
    _, tokens = patch_rows(indices, cu_seqlens, clip.shape[0], pos_embed.shape[0], clip.device)
    out = torch.nn.functional.linear(patches, weight.flatten(1).to(work), bias.to(work))
    return (out + pos_embed.to(work)[tokens]).to(weight.dtype)


def gather_patch_embed_backward(
    grad, clip, indices, *, patch_size, mean, std, cu_seqlens=None, downsample=1
):
    """Gradients of :func:`gather_patch_embed` with respect to
    ``(weight, bias, pos_embed)``, in ``grad``'s dtype: ``grad^T @ patches``,
    the column sums of ``grad``, and ``grad``'s rows added into ``[N, D]`` at
    their token ids."""
    work = work_dtype(grad.dtype)
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
