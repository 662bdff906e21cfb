"""``static_tokens``: RLT's run-length tokenisation. A token is dropped when
its patch did not change since the previous tubelet; the kept ids come out in
the packed selection contract, each with its run length.

Two kernels. The first is the only one that reads the clip: one program per
(clip, tubelet, row of patches, block of patch columns) streams the patch row
of the two frames it compares straight from the uint8 clip, one pixel row at a
time, sums the absolute byte differences exactly in int32 per channel, weights
the channels, and writes one keep byte per token. The output is packed, so its
size is the number of kept tokens: the per-clip counts are summed by PyTorch
and read back once. The second kernel, one program per (clip, chunk of a
frame's spatial positions), walks the clip's tubelets from last to first
holding the chunk's keep bytes in registers: each (tubelet, chunk)'s first
slot comes from PyTorch's count of the bytes before it, a prefix sum inside
the chunk gives every kept token its slot (ids come out ascending without a
sort), and the last kept tubelet seen at each spatial position gives the run
lengths.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from lookwhen_kernels import reference
from lookwhen_kernels.layout import cu_seqlens_from_lengths
from lookwhen_kernels.ops._common import (
    CompileSpec,
    check_int,
    check_int32,
    check_real,
    check_tensor,
    cpu_dispatch,
    next_power_of_2,
    use_triton,
    wrap_triton,
)
from lookwhen_kernels.ops.selection import clip_num_warps

# Patch columns per program of the mask kernel: 16 x 3p lanes (p <= 32 fills
# at most 16 x 128 int32 accumulators).
BLOCK_J = 16
# Spatial positions per program of the pack kernel: a whole frame of 16 x 16
# patches at 1024 px. Wider frames are split; a 16384-position program spills
# on sm_90 (Triton 3.9).
PACK_CHUNK = 4096


@triton.jit
def _static_mask_kernel(
    clip_ptr, keep_ptr,
    stride_b, stride_t, stride_h, stride_w, stride_c,
    tubelets, grid_h, grid_w,
    w0, w1, w2, bound,
    PATCH: tl.constexpr, TUBELET: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    row = pid % grid_h
    rest = pid // grid_h
    t = rest % tubelets
    clip = (rest // tubelets).to(tl.int64)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    # Lane c of a patch row is pixel c // 3, channel c % 3: channel-last
    # order, so one row of patches is one contiguous run of bytes.
    c = tl.arange(0, BLOCK_C)
    pixel = c // 3
    channel = c - pixel * 3
    col_ok = j < grid_w
    # Tubelet 0 is always kept: its loads are masked off, nothing is read.
    # (Broadcast from a vector compare: Triton 3.9's interpreter takes no
    # scalar condition inside a mask.)
    mask = (col_ok & (j * 0 + t > 0))[:, None] & (c < 3 * PATCH)[None, :]
    frame_later = t * TUBELET + TUBELET - 1
    frame_earlier = tl.maximum(t - 1, 0) * TUBELET
    offsets = clip * stride_b + (j[:, None] * PATCH + pixel[None, :]).to(tl.int64) * stride_w \
        + channel[None, :].to(tl.int64) * stride_c
    later_ptr = clip_ptr + offsets + frame_later.to(tl.int64) * stride_t
    earlier_ptr = clip_ptr + offsets + frame_earlier.to(tl.int64) * stride_t
    acc = tl.zeros([BLOCK_J, BLOCK_C], dtype=tl.int32)
    for r in range(PATCH):
        y = (row * PATCH + r).to(tl.int64) * stride_h
        a = tl.load(later_ptr + y, mask=mask, other=0).to(tl.int32)
        b = tl.load(earlier_ptr + y, mask=mask, other=0).to(tl.int32)
        acc += tl.abs(a - b)
    weight = tl.where(channel == 0, w0, tl.where(channel == 1, w1, w2))
    change = tl.sum(acc.to(tl.float32) * weight[None, :], axis=1)
    keep = (change >= bound) | (t == 0)
    out = keep_ptr + ((clip * tubelets + t) * grid_h + row) * grid_w + j
    tl.store(out, keep.to(tl.uint8), mask=col_ok)


@triton.jit
def _static_pack_kernel(
    keep_ptr, starts_ptr, ids_ptr, runs_ptr,
    tubelets, spatial, chunks,
    BLOCK_S: tl.constexpr,
):
    clip = tl.program_id(0)
    chunk = tl.program_id(1)
    s = chunk * BLOCK_S + tl.arange(0, BLOCK_S)
    valid = s < spatial
    next_kept = tl.full([BLOCK_S], 0, tl.int32) + tubelets
    clip_keep = keep_ptr + clip.to(tl.int64) * tubelets * spatial
    chunk_starts = starts_ptr + clip.to(tl.int64) * tubelets * chunks + chunk
    for i in range(tubelets):
        t = tubelets - 1 - i
        keep = tl.load(clip_keep + t * spatial + s, mask=valid, other=0) != 0
        slot = tl.load(chunk_starts + t * chunks) + tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.store(ids_ptr + slot, t * spatial + s, mask=keep)
        tl.store(runs_ptr + slot, next_kept - t, mask=keep)
        next_kept = tl.where(keep, t, next_kept)


def _pack_config(spatial: int) -> Tuple[int, int]:
    block = min(next_power_of_2(spatial), PACK_CHUNK)
    return block, clip_num_warps(block)


def _chunk_counts(keep: torch.Tensor, block: int) -> torch.Tensor:
    """int32 ``[B, T', chunks]``: the kept tokens of each (tubelet, chunk)."""
    chunks = triton.cdiv(keep.shape[2], block)
    padded = torch.nn.functional.pad(keep, (0, chunks * block - keep.shape[2]))
    return padded.view(*keep.shape[:2], chunks, block).sum(-1, dtype=torch.int32)


def _reference_mask(clip, patch_size, tubelet, threshold, std):
    mask = reference.static_token_mask(clip, patch_size=patch_size, threshold=threshold, tubelet=tubelet, std=std)
    return mask.to(torch.uint8)


def _reference_pack(keep):
    indices, _, runs = reference.pack_static_tokens(keep.bool())
    return indices, runs


@triton_op("lookwhen::static_token_mask", mutates_args=())
def _static_token_mask(
    clip: torch.Tensor, patch_size: int, tubelet: int, threshold: float, std: List[float],
) -> torch.Tensor:
    """uint8 ``[B, T', S]``, one keep byte per token."""
    if not use_triton(clip):
        return cpu_dispatch(None, (clip, patch_size, tubelet, threshold, std), _reference_mask)
    batch, frames, height, width, _ = clip.shape
    tubelets, grid_h, grid_w = frames // tubelet, height // patch_size, width // patch_size
    keep = torch.empty((batch, tubelets, grid_h * grid_w), device=clip.device, dtype=torch.uint8)
    if keep.numel():
        # The kernel compares the weighted byte-difference sum, not its mean.
        bound = threshold * 255 * 3 * patch_size * patch_size
        grid = (batch * tubelets * grid_h, triton.cdiv(grid_w, BLOCK_J))
        wrap_triton(_static_mask_kernel)[grid](
            clip, keep, *clip.stride(), tubelets, grid_h, grid_w, *(1.0 / v for v in std), bound,
            PATCH=patch_size, TUBELET=tubelet, BLOCK_J=BLOCK_J, BLOCK_C=next_power_of_2(3 * patch_size),
        )
    return keep


@triton_op("lookwhen::static_tokens_pack", mutates_args=())
def _static_tokens_pack(keep: torch.Tensor, chunk_starts: torch.Tensor, total: int) -> Tuple[torch.Tensor, torch.Tensor]:
    if not use_triton(keep):
        return cpu_dispatch(None, (keep,), _reference_pack)
    batch, tubelets, spatial = keep.shape
    ids = torch.empty((total,), device=keep.device, dtype=torch.int32)
    runs = torch.empty((total,), device=keep.device, dtype=torch.int32)
    if total:
        block, num_warps = _pack_config(spatial)
        chunks = chunk_starts.shape[2]
        wrap_triton(_static_pack_kernel)[(batch, chunks)](
            keep, chunk_starts, ids, runs, tubelets, spatial, chunks, BLOCK_S=block, num_warps=num_warps,
        )
    return ids, runs


def _channel_std(std: Optional[Sequence[float]]) -> List[float]:
    if std is None:
        return [1.0, 1.0, 1.0]
    try:
        values = [float(v) for v in std]
    except (TypeError, ValueError):
        raise ValueError(f"std: expected a sequence of 3 positive floats, got {std!r}") from None
    if len(values) != 3 or not all(v > 0 and math.isfinite(v) for v in values):
        raise ValueError(f"std: expected 3 positive finite floats (one per channel), got {std!r}")
    return values


def static_tokens(
    clip: torch.Tensor,
    *,
    patch_size: int,
    threshold: float,
    tubelet: int = 1,
    std: Optional[Sequence[float]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run-length tokenisation (RLT): keep the tokens that changed.

    ``clip`` is uint8 ``[B, T, H, W, 3]`` (any strides); the token grid is
    ``T' x Hp x Wp`` with ``T' = T / tubelet``, ``Hp = H / p``, ``Wp = W / p``
    (``p = patch_size``), token id ``n = t*Hp*Wp + i*Wp + j``. Every token of
    tubelet 0 is kept; a later token is kept when the mean over its patch's
    pixels and channels of ``|x - x_prev| / 255`` is at least ``threshold``
    (``x`` the tubelet's last frame, ``x_prev`` the previous tubelet's first,
    as RLT compares them). With ``std`` each channel's difference is divided
    by ``std[c]``: the difference of normalised pixels, RLT's own scale (its
    default threshold 0.1 applies there). Threshold 0 keeps every token; a
    token exactly at the threshold may fall either way by float rounding.

    Returns int32 ``(indices [total], cu_seqlens [B+1], run_lengths
    [total])``: the kept ids of each clip in ascending order (the packed
    selection contract, ready for ``gather_patch_embed``) and, for each, the
    number of tubelets its content lasts: until the next kept token at the
    same spatial position, or the clip's end. Sizing the output reads the
    number of kept tokens back to the host (one device sync).
    """
    check_tensor("clip", clip, ndim=5, dtypes=(torch.uint8,))
    batch, frames, height, width, channels = clip.shape
    if channels != 3:
        raise ValueError(f"clip: expected 3 channels in the last dimension, got shape {list(clip.shape)}")
    patch_size = check_int("patch_size", patch_size, 1, types=(int,))
    tubelet = check_int("tubelet", tubelet, 1, types=(int,))
    if frames == 0 or frames % tubelet:
        raise ValueError(f"clip: T must be a positive multiple of tubelet = {tubelet}, got {frames} frames")
    if height % patch_size or width % patch_size or height == 0 or width == 0:
        raise ValueError(f"clip: H and W must be positive multiples of patch_size = {patch_size}, "
                         f"got {height}x{width}")
    threshold = check_real("threshold", threshold, "[0, inf)")
    std = _channel_std(std)
    spatial = (height // patch_size) * (width // patch_size)
    check_int32("clip", batch * (frames // tubelet) * spatial, "the number of tokens")
    keep = _static_token_mask(clip, patch_size, tubelet, threshold, std)
    # Ids ascend in (tubelet, chunk) order: each chunk's first slot is the
    # clip's start plus the kept tokens of the chunks before it.
    counts = _chunk_counts(keep, _pack_config(spatial)[0])
    cu_seqlens = cu_seqlens_from_lengths(counts.sum((1, 2)))
    flat = counts.flatten(1)
    chunk_starts = (cu_seqlens[:-1, None] + flat.cumsum(1, dtype=torch.int32) - flat).view_as(counts)
    total = int(cu_seqlens[-1])
    indices, runs = _static_tokens_pack(keep, chunk_starts, total)
    return indices, cu_seqlens, runs


# InternVideo2-B/14 at 224 (the RLT baseline: 8 frames of 16 x 16 patches) and
# ViT-B/16 at 224 over 16 frames of 14 x 14 with tubelet 2 (RLT's own setting).
COMPILE_CONFIGS = ((14, 1, 256), (16, 2, 196))


def compile_specs():
    specs = []
    mask_sig = {"clip_ptr": "*u8", "keep_ptr": "*u8"} | {
        name: "i32" for name in ("stride_b", "stride_t", "stride_h", "stride_w", "stride_c",
                                 "tubelets", "grid_h", "grid_w")
    } | {name: "fp32" for name in ("w0", "w1", "w2", "bound")} | {
        name: "constexpr" for name in ("PATCH", "TUBELET", "BLOCK_J", "BLOCK_C")
    }
    pack_sig = {"keep_ptr": "*u8", "starts_ptr": "*i32", "ids_ptr": "*i32", "runs_ptr": "*i32",
                "tubelets": "i32", "spatial": "i32", "chunks": "i32", "BLOCK_S": "constexpr"}
    for patch, tubelet, _ in COMPILE_CONFIGS:
        grid_w = 224 // patch
        specs.append(CompileSpec(
            f"static_tokens_mask[p={patch},tubelet={tubelet}]", _static_mask_kernel, mask_sig,
            {"PATCH": patch, "TUBELET": tubelet, "BLOCK_J": BLOCK_J, "BLOCK_C": next_power_of_2(3 * patch)},
            divisible_by_16=("stride_b", "stride_t", "stride_h") + (("grid_w",) if grid_w % 16 == 0 else ()),
        ))
    # 16384 positions (2048 px at p = 16) run split into PACK_CHUNK programs.
    for spatial in sorted({spatial for _, _, spatial in COMPILE_CONFIGS} | {16384}):
        block, num_warps = _pack_config(spatial)
        specs.append(CompileSpec(
            f"static_tokens_pack[S={spatial}]", _static_pack_kernel, pack_sig, {"BLOCK_S": block},
            num_warps=num_warps,
        ))
    return specs
