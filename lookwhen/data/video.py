"""Video input: decode (:mod:`lookwhen.data.decoders`: PyAV, decord or
torchcodec), sample T frames, crop and resize, into the uint8 ``[T, S, S, 3]``
clips the models take.

Sampling rule (:func:`sample_indices`): the video (or the requested time
window) is split into T equal segments and the frame under the centre of each
segment is taken, ``index_i = first + floor((i + 0.5) * n / T)``. A video with
fewer than T frames therefore repeats frames, in order and as evenly as
possible (each frame about T / n times), instead of padding with black.

Geometry: the centred square of side ``min(H, W)`` is cut out and resized to
``S x S`` (bilinear with antialiasing), which is a short-side resize to S
followed by a centre crop, done in one step.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from lookwhen.data import decoders
from lookwhen.data.decoders import DecodeStats, VideoError


def sample_indices(n_frames: int, frames: int, first: int = 0) -> List[int]:
    """Indices of ``frames`` frames sampled uniformly from ``n_frames``
    frames starting at ``first`` (see the module docstring for the rule)."""
    if n_frames < 1 or frames < 1:
        raise ValueError(f"need at least one frame to sample from and to take, got {n_frames} and {frames}")
    return [first + min(n_frames - 1, math.floor((i + 0.5) * n_frames / frames)) for i in range(frames)]


@contextlib.contextmanager
def native_stderr_silenced():
    """File descriptor 2 pointed at /dev/null for the duration: native
    libraries that log there regardless of any setting (decord's C++ logger
    on open errors, FFmpeg, the profiler's backend) stay quiet. Python's own
    buffered stderr is flushed first so nothing of ours is lost."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _resample(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 ``[F, H, W, 3]`` -> uint8 ``[F, height, width, 3]`` (bilinear, antialiased)."""
    x = frames.permute(0, 3, 1, 2)
    if x.device.type == "cpu":
        # PyTorch's uint8 kernel for channels-last images: ten times faster
        # than a float round trip, and within 1 of it.
        return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False,
                             antialias=True).permute(0, 2, 3, 1).contiguous()
    x = F.interpolate(x.float(), size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def resize_square(frames: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` -> centre square resized to uint8 ``[T, size, size, 3]``."""
    _, height, width, _ = frames.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = frames[:, top: top + side, left: left + side]
    if side == size:
        return square.contiguous()
    return _resample(square, size, size)


def resize_short_side(frames: torch.Tensor, short: int) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` with its short side resized to ``short``, the
    aspect ratio kept (the long side rounded, never below ``short``)."""
    _, height, width, _ = frames.shape
    scale = short / min(height, width)
    new_h, new_w = max(short, round(height * scale)), max(short, round(width * scale))
    if (new_h, new_w) == (height, width):
        return frames
    return _resample(frames, new_h, new_w)


def decode_frames(path, choose_indices: Callable[[int], Sequence[int]], *, start: Optional[float] = None,
                  end: Optional[float] = None, decoder: str = "auto", threads: int = 0,
                  stats: Optional[DecodeStats] = None) -> torch.Tensor:
    """Open ``path``, ask ``choose_indices(n_frames)`` which frames to take,
    and decode them: uint8 ``[len(indices), H, W, 3]`` at the video's own
    size. With a time window ``[start, end)`` s, ``n_frames`` counts the
    window's frames and the indices count from its first. Raises
    :class:`VideoError` (naming the file) when it cannot be read. Decoders:
    :mod:`lookwhen.data.decoders`."""
    return decoders.decode(path, choose_indices, start=start, end=end, decoder=decoder, threads=threads,
                           stats=stats)


def read_clip(
    path,
    frames: int = 16,
    size: int = 224,
    *,
    start: Optional[float] = None,
    end: Optional[float] = None,
    decoder: str = "auto",
    threads: int = 0,
    stats: Optional[DecodeStats] = None,
) -> torch.Tensor:
    """One clip, uint8 ``[frames, size, size, 3]``, sampled over the whole
    video or over the window ``[start, end)`` in seconds. Raises
    :class:`VideoError` (naming the file) when it cannot be read. ``stats``
    collects the seconds of each phase (open, seek, decode, resize)."""
    decoded = decode_frames(path, lambda n: sample_indices(n, frames), start=start, end=end, decoder=decoder,
                            threads=threads, stats=stats)
    began = time.perf_counter()
    clip = resize_square(decoded, size)
    if stats is not None:
        stats.add("resize", time.perf_counter() - began)
    return clip


@dataclass
class ClipBatch:
    """The clips of the files that could be read, stacked ``[B, T, S, S, 3]``
    (``None`` when none could), their paths in input order, and the
    ``(path, message)`` of every file that could not."""

    clips: Optional[torch.Tensor]
    paths: List[str] = field(default_factory=list)
    failures: List[Tuple[str, str]] = field(default_factory=list)


def read_clips(paths: Sequence, frames: int = 16, size: int = 224, **window) -> ClipBatch:
    """Read many files; a bad file is recorded in ``failures`` and the rest
    are still read."""
    clips, good, failures = [], [], []
    for path in paths:
        try:
            clips.append(read_clip(path, frames, size, **window))
            good.append(os.fspath(path))
        except VideoError as error:
            failures.append((error.path, str(error)))
    return ClipBatch(torch.stack(clips) if clips else None, good, failures)


def iter_clip_batches(
    paths: Sequence, batch_size: int, frames: int = 16, size: int = 224, **window
) -> Iterator[ClipBatch]:
    """:func:`read_clips` over consecutive groups of ``batch_size`` files."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, len(paths), batch_size):
        yield read_clips(paths[start: start + batch_size], frames, size, **window)


def fit_clips(clips: torch.Tensor, frames: Optional[int], size: Optional[int]) -> torch.Tensor:
    """uint8 clips ``[B, T, H, W, 3]`` resampled to ``frames`` frames (the
    uniform rule) and resized to ``size x size`` (antialiased); ``None``
    keeps that dimension."""
    if frames is not None and clips.shape[1] != frames:
        clips = clips[:, sample_indices(clips.shape[1], frames)]
    if size is None or tuple(clips.shape[2:4]) == (size, size):
        return clips
    batch, count = clips.shape[:2]
    flat = _resample(clips.reshape(batch * count, *clips.shape[2:]), size, size)
    return flat.view(batch, count, size, size, 3)
