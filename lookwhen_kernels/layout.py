"""The packed-token layout (FlashAttention's varlen layout).

``x [total, D]`` holds the tokens of every clip back to back;
``cu_seqlens int32 [B+1]`` holds the offsets ``0, K_0, K_0+K_1, ...``.
These helpers convert between that layout and padded ``[B, L, D]`` tensors
(for references, baselines and user code), and the rows of a selection.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch


def cu_seqlens_from_lengths(lengths, device=None) -> torch.Tensor:
    """Offsets ``[B+1]`` (int32) from per-sequence lengths (list or tensor)."""
    if isinstance(lengths, torch.Tensor):
        # Cast in place of residence (as_tensor spells every call as a copy to a device).
        lengths = lengths.to(torch.int64) if device is None else lengths.to(device, torch.int64)
    else:
        lengths = torch.as_tensor(lengths, dtype=torch.int64, device=device)
    out = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
    if lengths.numel():
        out[1:] = torch.cumsum(lengths, 0).to(torch.int32)
    return out


def lengths_from_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    return (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)


def max_seqlen(cu_seqlens: torch.Tensor) -> int:
    """Longest sequence (reads the offsets back to the host)."""
    lengths = lengths_from_cu_seqlens(cu_seqlens)
    return int(lengths.max()) if lengths.numel() else 0


def packed_batch_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """For every packed row, the index of the sequence it belongs to."""
    lengths = lengths_from_cu_seqlens(cu_seqlens)
    return torch.repeat_interleave(
        torch.arange(lengths.numel(), device=cu_seqlens.device), lengths, output_size=total
    )


def patch_rows(indices, cu_seqlens, batch: int, n_tokens: int, device=None):
    """``(clip index, token id)`` of every packed row of a selection (the
    rows ``gather_patch_embed`` and ``gather_tokens`` write), as int64
    ``[total]`` tensors. ``indices`` is
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


def segment_sum(values: torch.Tensor, segment_ids: torch.Tensor, n_segments: int) -> torch.Tensor:
    """``out[s] = sum of values[r] with segment_ids[r] == s``, ``[n_segments,
    ...]`` in float32 or wider, as a one-hot GEMM: a fixed summation order,
    so bitwise reproducible, where ``index_add_`` on a GPU adds atomically in
    whatever order threads arrive."""
    dtype = torch.promote_types(values.dtype, torch.float32)
    flat = values.reshape(values.shape[0], math.prod(values.shape[1:])).to(dtype)
    segments = torch.arange(n_segments, device=values.device, dtype=segment_ids.dtype)
    one_hot = (segments[:, None] == segment_ids[None, :]).to(dtype)
    return (one_hot @ flat).reshape(n_segments, *values.shape[1:])


def unpad(padded: torch.Tensor, lengths: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Padded ``[B, L, ...]`` -> packed ``[total, ...]`` and its ``cu_seqlens``."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64, device=padded.device)
    mask = torch.arange(padded.shape[1], device=padded.device)[None, :] < lengths[:, None]
    return padded[mask], cu_seqlens_from_lengths(lengths)


def pad(packed: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int = None, value=0.0):
    """Packed ``[total, ...]`` -> padded ``[B, L, ...]`` and a ``[B, L]`` validity mask."""
    lengths = lengths_from_cu_seqlens(cu_seqlens)
    batch = lengths.numel()
    if max_len is None:
        max_len = int(lengths.max()) if batch else 0
    mask = torch.arange(max_len, device=packed.device)[None, :] < lengths[:, None].to(packed.device)
    out = packed.new_full((batch, max_len) + tuple(packed.shape[1:]), value)
    out[mask] = packed
    return out, mask
