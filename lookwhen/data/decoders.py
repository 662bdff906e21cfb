"""Video decoders behind one call: PyAV (the default), decord and torchcodec.

Every decoder returns the same frames for the same indices: frame ``i`` is
the ``i``-th frame in presentation order, counted as decord counts (one per
packet of the video stream), at the video's own size, uint8 RGB.

What a sampled clip costs is mostly decoding, and an H.264/HEVC frame can
only be decoded after the frames it refers to, back to the last keyframe: no
decoder can decode a frame alone, or at a smaller size. The PyAV decoder
therefore does only what the sampling needs:

- **an index first**: the stream's packets are read once without decoding
  (their timestamps and keyframe flags; as decord does on open);
- **seeks by keyframes**: when a keyframe lies between the last decoded frame
  and the next wanted one, it jumps there instead of decoding the gap;
- **stops** after the last wanted frame;
- **converts only the wanted frames** to RGB (decord converts every frame it
  decodes);
- decodes with ``threads`` threads (default 0: the decoder's own choice,
  for FFmpeg slice threads over the cores; 1: strictly one, for a loader
  that runs one decoding process per core).

The resize to the model's size happens after decoding, on uint8 frames
(:func:`lookwhen.data.video.resize_square`): the decoders' own scalers use
other filters, and every decoder must give the model the same pixels.

``stats``: pass a :class:`DecodeStats` to have each phase's seconds (and the
frames decoded) added to it: the pipeline benchmark's split of a clip's time.
"""
from __future__ import annotations

import bisect
import functools
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

DECODERS = ("pyav", "decord", "torchcodec")


class VideoError(ValueError):
    """A file that cannot be read as a video. The message starts with the path."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass
class DecodeStats:
    """Seconds spent per phase and frames decoded, summed over the calls
    that were given it. ``frames_decoded`` counts the frames the decoder
    produced on the way (the PyAV decoder's; ``None`` once a decoder that
    does not say was used)."""

    open: float = 0.0    # opening the file and reading its index
    seek: float = 0.0
    decode: float = 0.0  # decoding, and converting the wanted frames to RGB
    resize: float = 0.0  # crop and resize to the model's size
    frames_decoded: Optional[int] = 0

    PHASES = ("open", "seek", "decode", "resize")

    def add(self, phase: str, seconds: float) -> None:
        setattr(self, phase, getattr(self, phase) + seconds)

    def as_dict(self) -> Dict[str, float]:
        return {**{phase: getattr(self, phase) for phase in self.PHASES}, "frames_decoded": self.frames_decoded}


class _Clock:
    """Adds the time since the last ``lap`` to a phase of ``stats`` (if any)."""

    def __init__(self, stats: Optional[DecodeStats]):
        self.stats, self.last = stats, time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        if self.stats is not None:
            self.stats.add(phase, now - self.last)
        self.last = now

    def count(self, frames: Optional[int]) -> None:
        """``frames`` more decoded; ``None``: the decoder does not say."""
        if self.stats is not None:
            known = self.stats.frames_decoded
            self.stats.frames_decoded = None if frames is None or known is None else known + frames


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def available_decoders() -> List[str]:
    """The decoders this environment can load, in order of preference."""
    found = [name for name, module in (("pyav", "av"), ("decord", "decord")) if _importable(module)]
    if _torchcodec_loads():
        found.append("torchcodec")
    return found


@functools.lru_cache(maxsize=None)
def _torchcodec_loads() -> bool:
    # torchcodec imports without FFmpeg's shared libraries (it needs the
    # system's, releases 4 to 8) and fails when its decoder is first made.
    if not _importable("torchcodec"):
        return False
    try:
        from torchcodec._core import ops

        ops.load_core_libraries()
    except (ImportError, AttributeError, OSError, RuntimeError):
        return False
    return True


def resolve_decoder(name: str = "auto") -> str:
    """``name`` checked against :data:`DECODERS`; ``"auto"``: PyAV where it
    is installed (the fastest on CPU here, see docs/pipeline.md), else decord,
    else torchcodec."""
    if name == "auto":
        for candidate in ("pyav", "decord"):
            if _importable("av" if candidate == "pyav" else candidate):
                return candidate
        if _torchcodec_loads():
            return "torchcodec"
        raise ImportError("reading video files needs PyAV or decord: pip install 'lookwhen-kernels[video]'")
    if name not in DECODERS:
        raise ValueError(f"decoder must be 'auto' or one of {DECODERS}, got {name!r}")
    return name


def loader_threads() -> int:
    """Decoder threads for a clip read in a DataLoader: one in a worker
    process (the workers are the parallelism, one per core), the decoder's
    own choice (0) in the main process."""
    return 1 if torch.utils.data.get_worker_info() is not None else 0


def check_file(path) -> str:
    """``path`` as a string, or a :class:`VideoError` saying why it cannot be a video file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VideoError(path, "no such file")
    if os.path.isdir(path):
        raise VideoError(path, "is a directory, not a video file")
    if os.path.getsize(path) == 0:
        raise VideoError(path, "the file is empty")
    return path


UNREADABLE = "not a readable video (unknown format, or the file is truncated or corrupt)"


def decode(path, choose_indices: Callable[[int], Sequence[int]], *, start: Optional[float] = None,
           end: Optional[float] = None, decoder: str = "auto", threads: int = 0,
           stats: Optional[DecodeStats] = None) -> torch.Tensor:
    """Open ``path``, ask ``choose_indices(n_frames)`` which frames to take
    (any order, repeats allowed) and decode them: uint8 ``[len(indices), H,
    W, 3]`` at the video's own size. With a time window ``[start, end)`` (in
    seconds; frame ``i`` is at ``i / fps``), ``n_frames`` is the window's
    frame count and the indices count from its first frame. Raises
    :class:`VideoError` (naming the file) when it cannot be read."""
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
        raise ValueError(f"threads must be an int >= 0 (0: the decoder's choice), got {threads!r}")
    path = check_file(path)
    read = {"pyav": _pyav, "decord": _decord, "torchcodec": _torchcodec}[resolve_decoder(decoder)]

    def choose(n_frames: int, fps: Optional[float]) -> List[int]:
        if n_frames == 0:
            raise VideoError(path, "the video has no frames")
        first, stop = frame_window(path, n_frames, fps, start, end)
        indices = [first + int(i) for i in choose_indices(stop - first)]
        if not indices:
            raise ValueError(f"{path}: no frames were asked for")
        bad = [i for i in indices if not first <= i < stop]
        if bad:
            raise ValueError(f"{path}: frame indices {[i - first for i in bad[:4]]} are outside the "
                             f"{stop - first} frames to choose from")
        return indices

    pixels = read(path, choose, threads, _Clock(stats))
    if pixels.ndim != 4 or pixels.shape[-1] != 3 or 0 in pixels.shape:
        raise VideoError(path, f"decoded frames have an unexpected shape {list(pixels.shape)}")
    return torch.from_numpy(np.ascontiguousarray(pixels)) if isinstance(pixels, np.ndarray) else pixels


def frame_window(path, n_frames: int, fps: Optional[float], start: Optional[float],
                 end: Optional[float]) -> Tuple[int, int]:
    """``[first, stop)`` frame range of the time window ``[start, end)`` s."""
    if start is None and end is None:
        return 0, n_frames
    if not fps or fps <= 0:
        raise VideoError(path, "the video reports no frame rate, so a time window cannot be mapped to frames")
    lo = 0 if start is None else max(0, math.ceil(start * fps - 1e-6))
    hi = n_frames if end is None else min(n_frames, math.ceil(end * fps - 1e-6))
    if hi <= lo:
        raise VideoError(path, f"the window [{start}, {end}) s holds no frames (the video has {n_frames} frames "
                               f"at {fps:.3g} fps)")
    return lo, hi


# -- PyAV --------------------------------------------------------------------


def _pyav(path: str, choose, threads: int, clock: _Clock) -> np.ndarray:
    import av

    container = _open_pyav(path)
    with container:
        stream = container.streams.video[0]
        try:
            timestamps, keyframes = _packet_index(container, stream)
        except av.FFmpegError:
            raise VideoError(path, UNREADABLE) from None
        clock.lap("open")
        rate = stream.average_rate or stream.guessed_rate
        indices = choose(len(timestamps), float(rate) if rate else None)
        if threads == 1:
            stream.thread_count = 1  # PyAV's default is FFmpeg's: slice threads over every core
        elif threads > 1:
            stream.thread_type, stream.thread_count = "AUTO", threads
        try:
            frames = _decode_wanted(container, stream, timestamps, keyframes, sorted(set(indices)), clock)
        except av.FFmpegError:
            frames = {}
        missing = sorted(set(indices) - frames.keys())
        if missing:
            raise VideoError(path, f"cannot decode frame {missing[0]} (the file is truncated or corrupt)")
        out = np.stack([frames[i] for i in indices])
        clock.lap("decode")
        return out


def _open_pyav(path: str):
    """The container, probed without decoding. FFmpeg's probe decodes the
    first frames to learn what most containers already state (a 720p H.264
    keyframe: 11 of the 13 ms an open takes); it runs in full only where the
    quick probe leaves the frame size unknown. The pixels are the same."""
    import av

    for probe in ({"skip_frame": "all"}, None):
        try:
            container = av.open(path, options=probe)
        except (av.FFmpegError, UnicodeDecodeError):
            raise VideoError(path, UNREADABLE) from None
        if not container.streams.video:
            container.close()
            raise VideoError(path, "has no video stream")
        if probe is None or container.streams.video[0].codec_context.width > 0:
            return container
        container.close()


def _packet_index(container, stream):
    """Presentation timestamps of the stream's frames in order, and the
    presentation indices of its keyframes, from its packets alone."""
    entries, untimed = [], 0
    for packet in container.demux(stream):
        if packet.size and packet.pts is not None:
            entries.append((packet.pts, packet.is_keyframe))
        elif packet.size:
            untimed += 1
    if untimed and not entries:
        raise VideoError(container.name, "its packets carry no timestamps (a raw elementary stream?): remux it into "
                                         "a container (ffmpeg -i IN -c copy OUT.mp4) or use decoder='decord'")
    entries.sort()
    timestamps = [pts for pts, _ in entries]
    keyframes = [i for i, (_, key) in enumerate(entries) if key] or [0]
    container.seek(timestamps[0] if timestamps else 0, stream=stream, backward=True)
    return timestamps, keyframes


def _frames(container, stream, index_of: Dict[int, int], wanted: set):
    """The stream's decoded frames from where the container stands. A packet
    of a frame nobody wants is sent with ``skip_frame=NONREF``: the decoder
    drops it if no other frame refers to it (B-frames, mostly: up to half of
    an H.264 stream's frames), and decodes it as usual otherwise."""
    context = stream.codec_context
    for packet in container.demux(stream):
        if packet.size:
            context.skip_frame = "DEFAULT" if index_of.get(packet.pts, -1) in wanted else "NONREF"
        else:
            context.skip_frame = "DEFAULT"  # the end of the stream: drain what the decoder holds
        yield from context.decode(packet)


def _keyframe_before(keyframes: List[int], index: int) -> int:
    # Frames before a stream's first keyframe: from the start.
    position = bisect.bisect_right(keyframes, index) - 1
    return keyframes[position] if position >= 0 else 0


def _decode_wanted(container, stream, timestamps, keyframes, wanted: List[int], clock: _Clock) -> Dict[int, np.ndarray]:
    """The RGB frames at the ``wanted`` presentation indices (ascending,
    unique); fewer when the stream ends or breaks first."""
    index_of = {pts: i for i, pts in enumerate(timestamps)}
    wanted_set = set(wanted)
    frames: Dict[int, np.ndarray] = {}
    position = -1  # presentation index of the last frame decoded
    i = 0
    # A seek that lands past its frame (an index that does not match the
    # stream) turns seeking off: the rest is decoded from the start, in order.
    sequential = False
    while True:
        start = 0 if sequential else _keyframe_before(keyframes, wanted[i])
        if start > position + 1 or position >= wanted[i]:
            clock.lap("decode")
            container.seek(timestamps[start], stream=stream, backward=True)
            clock.lap("seek")
            position = start - 1
        missed = False
        for frame in _frames(container, stream, index_of, wanted_set):
            clock.count(1)
            index = index_of.get(frame.pts)
            position = position + 1 if index is None else index
            if position < wanted[i]:
                continue
            if position > wanted[i]:
                missed = True
                break
            frames[position] = frame.to_ndarray(format="rgb24")
            i += 1
            if i == len(wanted):
                return frames
            if not sequential and _keyframe_before(keyframes, wanted[i]) > position + 1:
                break  # a keyframe lies in the gap: jump to it
        else:
            return frames
        if missed:
            if sequential:
                return frames
            sequential, position = True, len(timestamps)


# -- decord ------------------------------------------------------------------


def _decord(path: str, choose, threads: int, clock: _Clock) -> np.ndarray:
    from lookwhen.data.video import native_stderr_silenced

    import decord
    from decord._ffi.base import DECORDError

    decord.logging.set_level(decord.logging.QUIET)
    with native_stderr_silenced():  # decord's C++ logger writes on open errors regardless of its level
        try:
            reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=threads)
        except (DECORDError, RuntimeError):
            raise VideoError(path, UNREADABLE) from None
        clock.lap("open")
        indices = choose(len(reader), reader.get_avg_fps())
        clock.count(None)
        try:
            out = reader.get_batch(indices).asnumpy()
            clock.lap("decode")
            return out
        except DECORDError:
            pass
        # decord2 returns frames of some widths (32, 48, 96, 144 px, ...) with
        # the decoder's padded row stride, which breaks get_batch; per frame,
        # the padding can be cut off each row.
        frames = []
        for index in indices:
            try:
                frame = reader[index].asnumpy()
            except DECORDError:
                raise VideoError(path, f"cannot decode frame {index} (the file is truncated or corrupt)") from None
            if frame.shape[-1] != 3:
                height, width = frame.shape[:2]
                frame = frame.reshape(height, -1)[:, : 3 * width].reshape(height, width, 3)
            frames.append(frame)
        clock.lap("decode")
        return np.stack(frames)


# -- torchcodec --------------------------------------------------------------


def _torchcodec(path: str, choose, threads: int, clock: _Clock) -> torch.Tensor:
    from torchcodec.decoders import VideoDecoder

    try:
        reader = VideoDecoder(path, seek_mode="exact", num_ffmpeg_threads=threads, dimension_order="NHWC")
        n_frames = reader.metadata.num_frames
    except (RuntimeError, ValueError):
        raise VideoError(path, UNREADABLE) from None
    clock.lap("open")
    indices = choose(n_frames or 0, reader.metadata.average_fps)
    clock.count(None)
    try:
        out = reader.get_frames_at(indices).data
    except (RuntimeError, IndexError):
        raise VideoError(path, "cannot decode the sampled frames (the file is truncated or corrupt)") from None
    clock.lap("decode")
    return out.contiguous()
