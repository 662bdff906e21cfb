"""Compressed-domain motion: token scores from the motion vectors the decoder
already has, and the ``motion`` selector that turns them into a selection.

FFmpeg exports a P- or B-frame's motion vectors as frame side data when the
decoder is opened with ``flags2=+export_mvs``; PyAV hands them over as a
structured array (block size ``w x h``, block centre ``dst_x, dst_y``,
displacement ``motion_x / motion_scale`` pixels). Decoding every frame is
needed anyway (each predicted frame depends on the previous ones), so the
vectors cost no more than the decode.

Scores follow the clip's geometry and sampling (:mod:`lookwhen.data.video`): the
video is cut into T equal segments (the frames around each sampled frame), a
frame's motion field (vector magnitude per pixel) is cropped to the centred
square and averaged onto the ``h x w`` token cells, and a token's score is
the mean over the segment's predicted frames. Blocks of a predicted frame that
carry no vector were intra-coded: content its reference frames could not
predict, which is change too, so they score as the frame's fastest block, and
at least :data:`INTRA_MOTION` pixels (a frame whose predicted blocks all
stand still still shows where something new appeared). A
segment whose frames are all intra-coded (I-frames) has no vectors; it is
marked in :attr:`MotionScores.has_vectors`.
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

import lookwhen_kernels as lk
from lookwhen.data.datasets import WithExtras
from lookwhen.data.synthetic import write_video
from lookwhen.data.video import VideoError, sample_indices

# FFmpeg's motion vectors sit on a grid of 4-pixel blocks (H.264's smallest
# partition); fields are rasterised at that resolution.
CELL = 4
# The score of an intra-coded block of a predicted frame, in pixels, when no
# predicted block of the frame moved faster: one macroblock.
INTRA_MOTION = 16.0


@dataclass
class MotionScores:
    """``scores float32 [T*h*w]`` in token order (``n = t*h*w + i*w + j``),
    in pixels of motion per frame; ``has_vectors bool [T]``: whether any frame
    of the segment carried motion vectors (False: its scores are 0, not a
    measurement); ``n_frames``: frames decoded."""

    scores: torch.Tensor
    has_vectors: torch.Tensor
    n_frames: int


def _open(path_or_reader):
    # PyAV (the video extra) only where motion vectors are read: the embedding
    # loops and the benchmark import this module without it.
    import av

    if not isinstance(path_or_reader, (str, os.PathLike)):
        return path_or_reader, getattr(path_or_reader, "name", "<container>"), False
    path = os.fspath(path_or_reader)
    if not os.path.isfile(path):
        raise VideoError(path, "no such file")
    try:
        return av.open(path), path, True
    except (av.FFmpegError, UnicodeDecodeError):
        raise VideoError(path, "not a readable video (unknown format, or the file is truncated or corrupt)") from None


def _frame_field(vectors: np.ndarray, height: int, width: int) -> np.ndarray:
    """Motion magnitude on the ``CELL``-pixel grid of one predicted frame."""
    rows, cols = -(-height // CELL), -(-width // CELL)
    field = np.full((rows, cols), -1.0, dtype=np.float32)
    magnitude = np.hypot(vectors["motion_x"], vectors["motion_y"]) / np.maximum(vectors["motion_scale"], 1)
    top = (vectors["dst_y"].astype(np.int64) - vectors["h"] // 2) // CELL
    left = (vectors["dst_x"].astype(np.int64) - vectors["w"] // 2) // CELL
    # Vectors come in a handful of block sizes: per size and cell offset one
    # vectorised set of (cell, magnitude) pairs; one scatter then keeps each
    # cell's largest (a block predicted from two references, in B-frames,
    # keeps the larger motion).
    cells, values = [], []
    for bh, bw in set(zip(vectors["h"].tolist(), vectors["w"].tolist())):
        pick = (vectors["h"] == bh) & (vectors["w"] == bw)
        block_top, block_left, block_magnitude = top[pick], left[pick], magnitude[pick]
        for dy in range(max(1, bh // CELL)):
            for dx in range(max(1, bw // CELL)):
                y, x = block_top + dy, block_left + dx
                inside = (y >= 0) & (y < rows) & (x >= 0) & (x < cols)
                cells.append(y[inside] * cols + x[inside])
                values.append(block_magnitude[inside])
    if cells:
        flat = torch.from_numpy(field.reshape(-1))  # shares field's memory
        flat.scatter_reduce_(0, torch.from_numpy(np.concatenate(cells)),
                             torch.from_numpy(np.concatenate(values).astype(np.float32)), reduce="amax")
    intra = field < 0
    field[intra] = max(float(magnitude.max()) if magnitude.size else 0.0, INTRA_MOTION)
    return field


def _to_tokens(field: np.ndarray, height: int, width: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """The centred square of a cell field, averaged onto the token grid."""
    side = min(height, width) // CELL
    top, left = (field.shape[0] - side) // 2, (field.shape[1] - side) // 2
    square = torch.from_numpy(np.ascontiguousarray(field[top: top + side, left: left + side]))
    return F.adaptive_avg_pool2d(square[None, None], (grid_h, grid_w)).flatten()


def motion_scores(path_or_reader, grid: Sequence[int]) -> MotionScores:
    """Per-token motion magnitude on the token grid ``(T, h, w)`` from the
    decoder's motion vectors (see the module docstring). ``path_or_reader``:
    a file path or an opened PyAV input container (not yet decoded from).
    Raises :class:`lookwhen.data.video.VideoError` for a file that cannot be
    decoded, and for one whose codec carries no motion vectors (intra-only
    codecs such as MJPEG, or a video of I-frames only)."""
    import av  # the video extra, as in _open

    if len(grid) != 3 or not all(isinstance(g, int) and g >= 1 for g in grid):
        raise ValueError(f"grid: expected three positive ints (T, h, w), got {grid!r}")
    frames, grid_h, grid_w = grid
    container, name, owned = _open(path_or_reader)
    try:
        if not container.streams.video:
            raise VideoError(name, "has no video stream")
        stream = container.streams.video[0]
        # Only the vectors are read: the deblocking filter, a pass over the
        # pixels after the vectors are parsed, is skipped (8% of the decode
        # on a 720p H.264 sample, the same vectors).
        stream.codec_context.options = {"flags2": "+export_mvs", "skip_loop_filter": "all"}
        per_frame = []
        try:
            for frame in container.decode(stream):
                side = frame.side_data.get("MOTION_VECTORS")
                vectors = side.to_ndarray() if side is not None and len(side) else None
                per_frame.append(None if vectors is None else _to_tokens(
                    _frame_field(vectors, frame.height, frame.width), frame.height, frame.width, grid_h, grid_w))
        except av.FFmpegError:
            raise VideoError(name, "cannot decode the video (the file is truncated or corrupt)") from None
    finally:
        if owned:
            container.close()
    if not per_frame:
        raise VideoError(name, "the video has no frames")
    if all(f is None for f in per_frame):
        raise VideoError(name, f"carries no motion vectors (codec {stream.codec_context.name}: intra-only, "
                               "or every frame is an I-frame)")
    n = len(per_frame)
    centres = sample_indices(n, frames)
    scores = torch.zeros(frames, grid_h * grid_w)
    has_vectors = torch.zeros(frames, dtype=torch.bool)
    for i, centre in enumerate(centres):
        # The segment of sample i; a video shorter than T gives one frame each.
        lo, hi = math.floor(i * n / frames), math.floor((i + 1) * n / frames)
        members = [f for f in per_frame[lo:hi] if f is not None] if hi > lo else []
        if hi <= lo and per_frame[centre] is not None:
            members = [per_frame[centre]]
        if members:
            scores[i] = torch.stack(members).mean(0)
            has_vectors[i] = True
    return MotionScores(scores.flatten(), has_vectors, n)


def fill_unmeasured(scores: torch.Tensor, has_vectors: torch.Tensor) -> torch.Tensor:
    """``scores [B, T*h*w]`` with every segment without vectors (I-frames)
    given the scores of the nearest segment that has them (the earlier one on
    a tie): the best guess of where things move there."""
    batch, frames = has_vectors.shape
    out = scores.view(batch, frames, -1).clone()
    for b in range(batch):
        measured = has_vectors[b].nonzero().flatten().tolist()
        for t in range(frames):
            if not has_vectors[b, t] and measured:
                nearest = min(measured, key=lambda m: (abs(m - t), m))
                out[b, t] = out[b, nearest]
    return out.view(batch, -1)


def clip_motion(clip: torch.Tensor, grid: Sequence[int]) -> MotionScores:
    """:func:`motion_scores` of a clip held in memory (uint8 ``[T, H, W,
    3]``): encoded to H.264 as a camera or a web video would be (x264's
    default motion search, near-lossless), then decoded for its vectors."""
    import av  # the video extra, as in _open

    encoded = write_video(io.BytesIO(), clip, preset="medium")
    encoded.seek(0)
    with av.open(encoded, "r", format="mp4") as container:
        return motion_scores(container, grid)


class WithMotion(WithExtras):
    """A data set of ``{"clip": uint8 [T, H, W, 3], ...}`` samples with each
    sample's motion scores on ``grid`` added as ``"motion"`` (float32
    ``[T*h*w]``, segments without vectors filled as
    :func:`fill_unmeasured` does), from the clip encoded and decoded by
    :func:`clip_motion`: what the ``motion`` selector trains on. The scores
    are kept per index (``cache``), so epochs and runs over the same clips
    encode each once."""

    def __init__(self, dataset, grid: Sequence[int], cache: Optional[dict] = None):
        super().__init__(dataset)
        self.grid = tuple(grid)
        self.cache = {} if cache is None else cache

    def extras(self, index: int, sample: Dict) -> Dict:
        if index not in self.cache:
            motion = clip_motion(sample["clip"], self.grid)
            self.cache[index] = fill_unmeasured(motion.scores[None], motion.has_vectors[None])[0]
        return {"motion": self.cache[index]}


def motion_selection(motions: Sequence[MotionScores], keep_ratio: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``motion`` selector: ids ``int32 [B, K]`` of the fastest-moving
    tokens of each clip, by ``topk_tokens`` at ``keep_ratio`` (the same
    selection contract as the learned selector's, at no model cost), and the
    scores they came from (``float32 [B, N]``, unmeasured segments filled)."""
    scores = torch.stack([m.scores for m in motions])
    filled = fill_unmeasured(scores, torch.stack([m.has_vectors for m in motions]))
    return lk.topk_tokens(filled.contiguous(), keep_ratio=keep_ratio), filled


def object_recall(indices: torch.Tensor, wanted: Sequence[torch.Tensor]) -> float:
    """Mean over clips of the fraction of ``wanted`` tokens (bool ``[N]`` per
    clip) among the selected ``indices [B, K]``."""
    recalls = [float(w[indices[b].long()].sum()) / float(w.sum()) for b, w in enumerate(wanted) if w.any()]
    return sum(recalls) / max(len(recalls), 1)


def motion_forward(model, clips: torch.Tensor, motions: Sequence[MotionScores], keep_ratio: Optional[float] = None):
    """A LookWhen model run on the ``motion`` selector's choice at
    ``keep_ratio`` (default: the model's): the selector network does not run
    (sequences are ``[CLS, tokens...]``), and the output's ``scores`` are the
    motion scores on the extractor's grid."""
    ratio = model.config.keep_ratio if keep_ratio is None else keep_ratio
    indices, scores = motion_selection(motions, ratio)
    out = model(clips, indices=indices.to(clips.device), run_selector=False)
    out.scores = scores.to(clips.device)
    return out
