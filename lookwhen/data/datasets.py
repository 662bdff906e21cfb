"""Video datasets for training and evaluation: decoded uint8 clips, so the
model's fused uint8 path is what trains.

Sources: a folder tree ``root/<class>/<video>`` (classes in sorted order), a
manifest file (below), or :class:`Annotations` made by a reader of a
benchmark's own annotation files (:mod:`lookwhen.data.annotations`).

Manifest. One video per line, ``path,label`` (or ``path label``), paths
relative to ``root`` (default: the manifest's folder); blank lines and ``#``
comments are skipped. Two more columns, ``path,label,start,end``, cut the
clips from the time window ``[start, end)`` in seconds. A label is a class
id (an integer) or a class name; names map to ids through a class list
(``classes``: the names in id order, e.g. a file with one name per line),
by default the manifest's names sorted. A multi-label clip lists its
classes separated by ``;`` (``video.mp4,c092;c147``); a first line
``path,labels`` (plural) declares a multi-label manifest, in which a clip
may also have no class. Every line's labels are ids, or every line's are
names.

Sampling. Training: ``frames`` frames ``stride`` apart from a random start
(the stride shrinks for videos too short to hold the span, down to 1, after
which frames repeat), the short side resized to a random length in
``scale x size`` and a random ``size x size`` crop, flipped horizontally
with probability 1/2, then the optional augmentations of
:mod:`lookwhen.data.augment` (RandAugment, random erasing). Evaluation: uniform segments and a centre crop
(:func:`lookwhen.data.video.read_clip`'s rule). Every random choice comes from a
generator seeded by ``(seed, view, index)``, so a clip depends only on its
index and view, not on the worker that decodes it: runs resume exactly, and
cached teacher targets (keyed by index and view) match their clips.

Labels. A sample's ``label`` is the class id, or for a multi-label data set
float32 ``[num_classes]`` holding 1 at each of the clip's classes (what
``binary_cross_entropy_with_logits`` takes).

Bad files. A video that cannot be read is replaced by the next readable one
(in index order), so every batch is full and data-parallel ranks stay in
step; the sample carries the ``(path, reason)`` of what it skipped, and the
training loop reports each bad file once and counts them per epoch. A
dataset with no readable video fails at construction.
"""
from __future__ import annotations

import abc
import csv
import math
import os
import re
import zlib
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from lookwhen.data.augment import Augment
from lookwhen.data.decoders import loader_threads
from lookwhen.data.video import VideoError, decode_frames, resize_short_side, resize_square, sample_indices

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ogv", ".flv")


# First lines that name the columns; "labels" declares a multi-label manifest.
HEADERS = ("path,label", "pathlabel", "path", "path,labels", "path,label,start,end", "path,labels,start,end")
_INTEGER = re.compile(r"-?\d+")


class DatasetError(ValueError):
    """A dataset that cannot be used at all (no videos, none readable, a bad manifest)."""


class Entry(NamedTuple):
    """One video of a data set: its file, its class id (a tuple of ids in a
    multi-label data set) and the time window ``[start, end)`` in seconds
    the clips are cut from (``None``: from the start, to the end)."""

    path: str
    label: Union[int, Tuple[int, ...]]
    start: Optional[float] = None
    end: Optional[float] = None


@dataclass
class Annotations:
    """A data set's entries and what training needs to know about its labels.
    ``classes``: the class names in id order (``None`` when the labels are
    bare ids); ``multi_label``: a clip may carry several classes (or none);
    ``flip``: whether a horizontal flip keeps a clip's class (not where left
    and right are part of the classes, as in Something-Something and
    Jester)."""

    entries: List[Entry]
    classes: Optional[List[str]] = None
    multi_label: bool = False
    flip: bool = True
    source: str = ""

    @property
    def num_classes(self) -> int:
        """The classifier's width: the class list's length, else the largest id + 1."""
        if self.classes is not None:
            return len(self.classes)
        ids = [i for entry in self.entries for i in (entry.label if isinstance(entry.label, tuple) else
                                                      (entry.label,))]
        return max(ids, default=-1) + 1


def read_class_list(path) -> List[str]:
    """Class names in id order from a file with one name per line (blank
    lines skipped)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: no such class list")
    with open(path, encoding="utf-8") as handle:
        names = [line.strip() for line in handle if line.strip()]
    if not names:
        raise DatasetError(f"{path}: the class list is empty")
    if len(set(names)) != len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        raise DatasetError(f"{path}: class names listed twice: {twice[:3]}")
    return names


def class_ids(names: Sequence[str]) -> Dict[str, int]:
    return {name: i for i, name in enumerate(names)}


def map_class_names(rows: Sequence[Tuple[str, int, Union[str, Tuple[str, ...]]]],
                    classes: Optional[Sequence[str]]) -> Tuple[List[Union[int, Tuple[int, ...]]], List[str]]:
    """``(file, line, name or names)`` rows -> their class ids through
    ``classes`` (default: the rows' names sorted), and the class list. A
    name missing from a given list raises a :class:`DatasetError` naming
    the file and line."""
    if classes is None:
        classes = sorted({name for *_, names in rows for name in (names if isinstance(names, tuple) else (names,))})
    ids = class_ids(classes)
    labels = []
    for file, line, names in rows:
        try:
            if isinstance(names, tuple):
                labels.append(tuple(ids[name] for name in names))
            else:
                labels.append(ids[names])
        except KeyError as error:
            raise DatasetError(f"{file}:{line}: class {error.args[0]!r} is not in the class list "
                               f"({len(classes)} classes)") from None
    return labels, list(classes)


def check_window(start: Optional[float], end: Optional[float], where: str) -> None:
    """A time window's bounds: finite, ``0 <= start < end`` (either may be ``None``)."""
    for name, value in (("start", start), ("end", end)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise DatasetError(f"{where}: {name} {value} is not a time in seconds (finite, >= 0)")
    if start is not None and end is not None and not start < end:
        raise DatasetError(f"{where}: the window [{start}, {end}) s is empty (start must be before end)")


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
    augment: Optional[Augment] = None

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


def _scan_folder(root: str, classes: Optional[Sequence[str]] = None) -> Annotations:
    names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    classes = names if classes is None else list(classes)
    ids = class_ids(classes)
    entries = []
    for name in names:
        if name not in ids:
            raise DatasetError(f"{os.path.join(root, name)}: class {name!r} is not in the class list "
                               f"({len(classes)} classes)")
        for folder, _, files in sorted(os.walk(os.path.join(root, name))):
            for file in sorted(files):
                if file.lower().endswith(VIDEO_SUFFIXES):
                    entries.append(Entry(os.path.join(folder, file), ids[name]))
    return Annotations(entries, classes, source=root)


def load_source(source, root=None, classes: Optional[Sequence[str]] = None) -> Annotations:
    """A folder tree or a manifest file as :class:`Annotations`; class names
    (a manifest's, or a folder's sub-folders) map to ids through
    ``classes`` (default: the names sorted)."""
    source = os.fspath(source)
    if os.path.isdir(source):
        return _scan_folder(source, classes)
    if os.path.isfile(source):
        return read_manifest(source, root, classes=classes)
    raise DatasetError(f"{source}: no such folder or manifest file")


def _manifest_seconds(text: str, where: str) -> Optional[float]:
    text = text.strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise DatasetError(f"{where}: {text!r} is not a time in seconds") from None


def read_manifest(path, root=None, *, labels: bool = True, classes: Optional[Sequence[str]] = None) -> Annotations:
    """The entries of a manifest (the format is in the module docstring),
    class names mapped through ``classes`` (default: the names sorted).
    ``labels=False`` reads the paths alone, of any manifest (a line ending
    in a video suffix is a path as a whole; otherwise its first field is),
    and takes lines that hold nothing but a path (label -1)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: no such manifest file")
    base = os.fspath(root) if root is not None else os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8") as handle:
        try:
            lines = handle.readlines()
        except UnicodeDecodeError as error:
            raise DatasetError(f"{path}: not a text manifest (byte {error.start} is not UTF-8; a video given "
                               "as --manifest?)") from None
    multi_label = False
    rows = []  # (line number, video, label text, start, end)
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if number == 1 and line.lower().replace(" ", "") in HEADERS:
            multi_label = line.lower().replace(" ", "").startswith("path,labels")
            continue
        where = f"{path}:{number}"
        if not labels:
            head, tail = (line.rsplit(None, 1) + [""])[:2]
            if line.lower().endswith(VIDEO_SUFFIXES):
                video = line
            elif "," in line:
                video = next(csv.reader([line]))[0]
            else:
                video = head if tail and (_INTEGER.fullmatch(tail) or head.lower().endswith(VIDEO_SUFFIXES)) else line
            rows.append((number, video.strip(), "-1", None, None))
            continue
        fields = next(csv.reader([line])) if "," in line else line.rsplit(None, 1)
        if len(fields) not in (2, 4):
            raise DatasetError(f"{where}: expected 'path,label' or 'path,label,start,end', got {line!r}")
        start, end = (None, None) if len(fields) == 2 else (
            _manifest_seconds(fields[2], where), _manifest_seconds(fields[3], where))
        check_window(start, end, where)
        rows.append((number, fields[0].strip(), fields[1].strip(), start, end))
    multi_label = multi_label or any(";" in label for _, _, label, _, _ in rows)
    texts = [tuple(t.strip() for t in label.split(";") if t.strip()) if multi_label else label
             for _, _, label, _, _ in rows]
    tokens = [(number, token) for (number, *_), text in zip(rows, texts)
              for token in (text if multi_label else (text,))]
    named = [(number, token) for number, token in tokens if not _INTEGER.fullmatch(token)]
    if not multi_label:
        empty = next((number for number, token in tokens if not token), None)
        if empty is not None:
            raise DatasetError(f"{path}:{empty}: the label is empty")
    if named and len(named) < len(tokens):
        number, token = next((n, t) for n, t in tokens if _INTEGER.fullmatch(t))
        raise DatasetError(f"{path}:{number}: label {token!r} is a class id, but other lines give class names "
                           f"({named[0][1]!r} on line {named[0][0]}): give one or the other")
    if named:
        ids, classes = map_class_names([(path, number, text) for (number, *_), text in zip(rows, texts)], classes)
    else:
        ids = [tuple(int(t) for t in text) if multi_label else int(text) for text in texts]
        classes = None if classes is None else list(classes)
    entries = [Entry(video if os.path.isabs(video) else os.path.join(base, video), label, start, end)
               for (_, video, _, start, end), label in zip(rows, ids)]
    return Annotations(entries, classes, multi_label=multi_label, source=path)


class VideoDataset(torch.utils.data.Dataset):
    """``dataset[i]`` -> dict with ``clip`` (uint8 ``[T, S, S, 3]``),
    ``label`` (the class id; multi-hot float32 ``[num_classes]`` for a
    multi-label data set), ``index`` (the index of the video the clip came
    from), ``view`` and ``skipped`` (``(path, reason)`` of the unreadable
    videos passed over on the way). ``source``: a folder, a manifest file or
    :class:`Annotations`. ``view`` selects the random sampling; it is the
    epoch (:meth:`set_epoch`) unless ``views`` is set, then ``epoch %
    views``: the views teacher targets were cached for. ``decoder``: see
    :mod:`lookwhen.data.decoders` (every one gives the same pixels)."""

    def __init__(self, source, *, sampling: Sampling = Sampling(), root=None, seed: int = 0,
                 views: Optional[int] = None, check: bool = True, decoder: str = "auto"):
        self.annotations = source if isinstance(source, Annotations) else load_source(source, root)
        self.items = self.annotations.entries
        source = self.annotations.source
        if self.annotations.classes is not None:
            self.classes = self.annotations.classes
        else:
            self.classes = [str(c) for c in sorted({label for _, label, *_ in self.items})]
        if not self.items:
            raise DatasetError(f"{source}: no videos found (expected root/<class>/<video> or 'path,label' lines)")
        if views is not None and views < 1:
            raise ValueError(f"views must be at least 1, got {views}")
        self.source = source
        self.sampling = sampling
        self.seed = seed
        self.views = views
        self.epoch = 0
        self.multi_label = self.annotations.multi_label
        self.num_classes = self.annotations.num_classes
        self.decoder = decoder
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
        for path, _, start, end in self.items:
            try:
                decode_frames(path, lambda n: [0], start=start, end=end, decoder=self.decoder)
                return
            except VideoError as error:
                problems.append(str(error))
        raise DatasetError(
            f"{self.source}: none of its {len(self.items)} videos can be read (first: {problems[0]})"
        )

    def clip(self, index: int, view: int) -> torch.Tensor:
        """The clip of video ``index`` under sampling ``view`` (raises
        :class:`VideoError`)."""
        path, _, start, end = self.items[index]
        cfg = self.sampling
        if not cfg.train:
            return resize_square(decode_frames(path, lambda n: sample_indices(n, cfg.frames), start=start, end=end,
                                               decoder=self.decoder, threads=loader_threads()), cfg.size)
        generator = torch.Generator().manual_seed(_seed(self.seed, view, index))
        frames = decode_frames(path, lambda n: train_indices(n, cfg.frames, cfg.stride, generator), start=start,
                               end=end, decoder=self.decoder, threads=loader_threads())
        clip = random_resized_crop(frames, cfg.size, cfg.scale, cfg.flip, generator)
        return clip if cfg.augment is None else cfg.augment(clip, generator)

    def label(self, index: int):
        """Video ``index``'s label as samples carry it."""
        label = self.items[index].label
        if not self.multi_label:
            return label
        hot = torch.zeros(self.num_classes)
        hot[list(label if isinstance(label, tuple) else (label,))] = 1.0
        return hot

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
            return {"clip": clip, "label": self.label(current), "index": current, "view": view,
                    "skipped": skipped}
        raise DatasetError(f"{self.source}: no video can be read any more ({skipped[0][0]}: {skipped[0][1]})")


# The keys every sample has; any other key of a sample (a tensor, or a dict
# of tensors) is something a wrapper added (:class:`WithExtras`).
SAMPLE_KEYS = ("clip", "label", "index", "view", "skipped")


def _stack(values: Sequence):
    if isinstance(values[0], dict):
        return {key: _stack([v[key] for v in values]) for key in values[0]}
    return torch.stack(values)


def collate(samples: Sequence[Dict]) -> Dict:
    """Stack samples into ``clips [B, T, S, S, 3]``, ``labels`` (int64
    ``[B]``, or float32 ``[B, C]`` multi-hot), ``indices`` and ``views``
    (int64 ``[B]``), with every sample's ``skipped`` joined; whatever a
    :class:`WithExtras` wrapper added (such as ``motion`` or ``targets``) is
    stacked under its own key."""
    labels = [s["label"] for s in samples]
    extras = {key: _stack([s[key] for s in samples]) for key in samples[0] if key not in SAMPLE_KEYS}
    # A data set of something computed from the clips (cached embeddings)
    # has no clips.
    clips = {"clips": torch.stack([s["clip"] for s in samples])} if "clip" in samples[0] else {}
    return {
        **clips,
        "labels": torch.stack(labels) if isinstance(labels[0], torch.Tensor) else torch.tensor(labels,
                                                                                           dtype=torch.int64),
        "indices": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
        "views": torch.tensor([s["view"] for s in samples], dtype=torch.int64),
        "skipped": [item for s in samples for item in s["skipped"]],
        **extras,
    }


class WithExtras(torch.utils.data.Dataset, abc.ABC):
    """A data set's samples with what :meth:`extras` computes from each
    merged in (tensors, or dicts of tensors: :func:`collate` stacks them),
    in the loader's worker processes. The wrapped data set's other
    attributes (``classes``, ``set_epoch``, ...) show through."""

    def __init__(self, dataset):
        self.dataset = dataset

    @abc.abstractmethod
    def extras(self, index: int, sample: Dict) -> Dict:
        """What to add to the wrapped data set's sample ``index``."""

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int):
        sample = self.dataset[index]
        return {**sample, **self.extras(index, sample)}


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
