"""Video datasets for training and evaluation: decoded uint8 clips, so the
model's fused uint8 path is what trains.

Sources: a folder tree ``root/<class>/<video>`` (classes in sorted order) or
a manifest file with one ``path,label`` (or ``path label``) line per video,
Kinetics-style, paths relative to ``root`` (default: the manifest's folder).

Sampling. Training: ``frames`` frames ``stride`` apart from a random start
(the stride shrinks for videos too short to hold the span, down to 1, after
which frames repeat), the short side resized to a random length in
``scale x size`` and a random ``size x size`` crop, flipped horizontally
with probability 1/2. Evaluation: uniform segments and a centre crop
(:func:`lookwhen.data.video.read_clip`'s rule). Every random choice comes from a
generator seeded by ``(seed, view, index)``, so a clip depends only on its
index and view, not on the worker that decodes it: runs resume exactly, and
cached teacher targets (keyed by index and view) match their clips.

Bad files. A video that cannot be read is replaced by the next readable one
(in index order), so every batch is full and data-parallel ranks stay in
step; the sample carries the ``(path, reason)`` of what it skipped, and the
training loop reports each bad file once and counts them per epoch. A
dataset with no readable video fails at construction.
"""
from __future__ import annotations

import csv
import os
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from lookwhen.data.video import VideoError, decode_frames, resize_short_side, resize_square, sample_indices

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ogv", ".flv")


HEADERS = ("path,label", "pathlabel", "path")


class DatasetError(ValueError):
    """A dataset that cannot be used at all (no videos, none readable, a bad manifest)."""


@dataclass(frozen=True)
class Sampling:
    """How clips are cut from videos. ``train=False``: uniform segments and a
    centre crop; the other fields only matter for training."""

    frames: int = 16
    size: int = 224
    train: bool = True
    stride: int = 4
    scale: Tuple[float, float] = (1.0, 1.25)
    flip: bool = True

    def __post_init__(self):
        if self.frames < 1 or self.size < 1 or self.stride < 1:
            raise ValueError(f"frames, size and stride must be positive, got {self.frames}, {self.size}, {self.stride}")
        low, high = self.scale
        if not 1.0 <= low <= high:
            raise ValueError(f"scale: expected 1 <= low <= high (short side relative to size), got {self.scale}")


def _seed(*parts: int) -> int:
    return zlib.crc32(",".join(str(int(p)) for p in parts).encode())


def train_indices(n_frames: int, frames: int, stride: int, generator: torch.Generator) -> List[int]:
    """``frames`` indices ``stride`` apart from a random start; the stride
    shrinks to fit short videos and, below one frame per sample, the
    uniform rule of :func:`sample_indices` repeats frames."""
    stride = min(stride, max(1, (n_frames - 1) // max(frames - 1, 1)))
    span = (frames - 1) * stride + 1
    if span > n_frames:
        return sample_indices(n_frames, frames)
    start = int(torch.randint(0, n_frames - span + 1, (1,), generator=generator))
    return [start + i * stride for i in range(frames)]


def random_resized_crop(frames: torch.Tensor, size: int, scale: Tuple[float, float], flip: bool,
                        generator: torch.Generator) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` -> ``[T, size, size, 3]``: short side resized
    to ``u * size`` (``u`` uniform in ``scale``), a random crop, an optional
    horizontal flip, the same for every frame."""
    u = scale[0] + (scale[1] - scale[0]) * float(torch.rand((), generator=generator))
    resized = resize_short_side(frames, max(size, round(u * size)))
    _, new_h, new_w, _ = resized.shape
    top = int(torch.randint(0, new_h - size + 1, (1,), generator=generator))
    left = int(torch.randint(0, new_w - size + 1, (1,), generator=generator))
    crop = resized[:, top: top + size, left: left + size]
    if flip and bool(torch.rand((), generator=generator) < 0.5):
        crop = crop.flip(2)
    return crop.contiguous()


def collate_list(batch):
    """A DataLoader ``collate_fn`` that keeps the samples as they are."""
    return batch


def _scan_folder(root: str) -> Tuple[List[Tuple[str, int]], List[str]]:
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    items = []
    for label, name in enumerate(classes):
        for folder, _, files in sorted(os.walk(os.path.join(root, name))):
            for file in sorted(files):
                if file.lower().endswith(VIDEO_SUFFIXES):
                    items.append((os.path.join(folder, file), label))
    return items, classes


def read_manifest(path, root=None, *, labels: bool = True) -> List[Tuple[str, int]]:
    """``(path, label)`` of every line of a manifest (``path,label`` or
    ``path label``; blank lines, ``#`` comments and a header are skipped).
    ``labels=False`` also takes lines that hold a path alone (label -1)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: no such manifest file")
    base = os.fspath(root) if root is not None else os.path.dirname(os.path.abspath(path))
    items = []
    with open(path, newline="", encoding="utf-8") as handle:
        try:
            lines = handle.readlines()
        except UnicodeDecodeError as error:
            raise DatasetError(f"{path}: not a text manifest (byte {error.start} is not UTF-8; a video given "
                               "as --manifest?)") from None
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#") or number == 1 and line.lower().replace(" ", "") in HEADERS:
                continue
            fields = next(csv.reader([line])) if "," in line else line.rsplit(None, 1)
            if not labels and (len(fields) == 1 or not fields[-1].strip().lstrip("-").isdigit()):
                fields = [line, "-1"]
            if len(fields) != 2:
                raise DatasetError(f"{path}:{number}: expected 'path,label', got {line!r}")
            video, label = fields[0].strip(), fields[1].strip()
            try:
                label_id = int(label)
            except ValueError:
                raise DatasetError(f"{path}:{number}: label {label!r} is not an integer") from None
            items.append((video if os.path.isabs(video) else os.path.join(base, video), label_id))
    return items


class VideoDataset(torch.utils.data.Dataset):
    """``dataset[i]`` -> dict with ``clip`` (uint8 ``[T, S, S, 3]``),
    ``label`` (int), ``index`` (the index of the video the clip came from),
    ``view`` and ``skipped`` (``(path, reason)`` of the unreadable videos
    passed over on the way). ``view`` selects the random sampling; it is the
    epoch (:meth:`set_epoch`) unless ``views`` is set, then ``epoch %
    views``: the views teacher targets were cached for."""

    def __init__(self, source, *, sampling: Sampling = Sampling(), root=None, seed: int = 0,
                 views: Optional[int] = None, check: bool = True):
        source = os.fspath(source)
        if os.path.isdir(source):
            self.items, self.classes = _scan_folder(source)
        elif os.path.isfile(source):
            self.items = read_manifest(source, root)
            self.classes = [str(c) for c in sorted({label for _, label in self.items})]
        else:
            raise DatasetError(f"{source}: no such folder or manifest file")
        if not self.items:
            raise DatasetError(f"{source}: no videos found (expected root/<class>/<video> or 'path,label' lines)")
        if views is not None and views < 1:
            raise ValueError(f"views must be at least 1, got {views}")
        self.source = source
        self.sampling = sampling
        self.seed = seed
        self.views = views
        self.epoch = 0
        if check:
            self._first_readable()

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch's DataLoader iterator is made (workers get a
        copy of the dataset when their iterator starts)."""
        self.epoch = epoch

    @property
    def view(self) -> int:
        return self.epoch if self.views is None else self.epoch % self.views

    def _first_readable(self) -> None:
        problems = []
        for path, _ in self.items:
            try:
                decode_frames(path, lambda n: [0])
                return
            except VideoError as error:
                problems.append(str(error))
        raise DatasetError(
            f"{self.source}: none of its {len(self.items)} videos can be read (first: {problems[0]})"
        )

    def clip(self, index: int, view: int) -> torch.Tensor:
        """The clip of video ``index`` under sampling ``view`` (raises
        :class:`VideoError`)."""
        path, _ = self.items[index]
        cfg = self.sampling
        if not cfg.train:
            return resize_square(decode_frames(path, lambda n: sample_indices(n, cfg.frames)), cfg.size)
        generator = torch.Generator().manual_seed(_seed(self.seed, view, index))
        frames = decode_frames(path, lambda n: train_indices(n, cfg.frames, cfg.stride, generator))
        return random_resized_crop(frames, cfg.size, cfg.scale, cfg.flip, generator)

    def __getitem__(self, index: int) -> Dict:
        view = self.view
        skipped = []
        for offset in range(len(self.items)):
            current = (index + offset) % len(self.items)
            try:
                clip = self.clip(current, view)
            except VideoError as error:
                skipped.append((error.path, error.reason))
                continue
            return {"clip": clip, "label": self.items[current][1], "index": current, "view": view,
                    "skipped": skipped}
        raise DatasetError(f"{self.source}: no video can be read any more ({skipped[0][0]}: {skipped[0][1]})")


def collate(samples: Sequence[Dict]) -> Dict:
    """Stack samples into ``clips [B, T, S, S, 3]``, ``labels``, ``indices``
    and ``views`` (int64 ``[B]``), with every sample's ``skipped`` joined."""
    return {
        "clips": torch.stack([s["clip"] for s in samples]),
        "labels": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
        "indices": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
        "views": torch.tensor([s["view"] for s in samples], dtype=torch.int64),
        "skipped": [item for s in samples for item in s["skipped"]],
    }


class SkipReport:
    """Reports each unreadable video once (one warning line naming it) and
    counts the skips of the current epoch."""

    def __init__(self, write=print):
        self.write = write
        self.seen: Dict[str, str] = {}
        self.epoch_count = 0

    def add(self, skipped: Sequence[Tuple[str, str]]) -> None:
        for path, reason in skipped:
            self.epoch_count += 1
            if path not in self.seen:
                self.seen[path] = reason
                self.write(f"warning: skipped {path}: {reason}")

    def end_epoch(self, epoch: int) -> Optional[str]:
        """The end-of-epoch line (``None`` when nothing was skipped)."""
        count, self.epoch_count = self.epoch_count, 0
        if not count:
            return None
        return (f"epoch {epoch}: skipped {count} reads of unreadable videos ({len(self.seen)} so far: "
                + ", ".join(sorted(self.seen)) + ")")
