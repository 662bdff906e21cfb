"""A disk cache of the teachers' outputs, so a many-epoch run pays for the
teachers once (``lookwhen cache-targets``).

:class:`TargetCache` reads teacher outputs per ``(video index, view)`` from
safetensors shards ``shard-XXXXX.safetensors`` under a folder, with
``index.json`` naming the shard of every key and pinning the dataset,
sampling, grid and teachers they were made for (a cache made for other clips
is refused, not silently misused). :func:`write_cache` writes them,
:func:`teacher_targets` computes them.

Patch features, the bulk of a cache (``[T, h*w, D]`` per clip: 4.8 MB in
float16 for ``lookwhen-b16`` with a 768-wide teacher), are stored in one of
:data:`PATCH_FORMATS`: ``fp16``, or ``int8`` (half the size) with one float16
scale per token, ``absmax / 127`` of its feature vector (symmetric rounding:
an element is off by at most half a step, ``absmax / 254``). The per-frame
and video features stay float32. :class:`WithTargets` reads the cache in the
data loader's worker processes, so the training step finds the targets in
its batch.

Under ``torchrun`` each rank computes its share of the missing keys and
writes its own shards (``shard-r<rank>-XXXXX``) and partial index
(``index.rank<rank>.json``); :func:`merge_rank_indexes` folds those into
``index.json`` once every rank is done, and a restart after an interruption
counts the partial indexes as done work.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from safetensors import safe_open

from lookwhen.data.datasets import WithExtras
from lookwhen.data.video import VideoError
from lookwhen.io.atomic import check_pinned, shard_name, write_json, write_tensors
from lookwhen.training.teachers import TeacherTargets, Teachers

CACHE_INDEX = "index.json"
# What check_pinned says a folder made for other inputs holds.
OTHER_CACHE = "a cache made for other clips or teachers"
PATCH_FORMATS = ("fp16", "int8")


def quantize_rows(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x [..., D]`` as int8 ``[..., D]`` and float16 ``scale [...]`` with
    ``x ~ q * scale[..., None]`` (``scale = absmax / 127`` of each row; an
    all-zero row gets scale 0)."""
    x = x.float()
    if not torch.isfinite(x).all():
        raise ValueError("patch targets hold NaN or inf: int8 cannot store them (are the teacher's outputs broken?)")
    if x.numel() == 0:
        return x.to(torch.int8), x.new_zeros(x.shape[:-1], dtype=torch.float16)
    scale = (x.abs().amax(-1) / 127).to(torch.float16)
    # Divide by the scale as stored, so q * scale reconstructs x to within
    # half a step; a zero row divides by 1 (its q is 0 anyway).
    step = scale.float().unsqueeze(-1)
    q = torch.round(x / torch.where(step > 0, step, torch.ones_like(step))).clamp(-127, 127)
    return q.to(torch.int8), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float().unsqueeze(-1)


def _index_path(folder) -> str:
    """The index of the cache in ``folder``, which must exist."""
    path = os.path.join(os.fspath(folder), CACHE_INDEX)
    if not os.path.isfile(path):
        raise ValueError(f"{os.fspath(folder)}: not a target cache (no {CACHE_INDEX}; make one with "
                         "lookwhen cache-targets)")
    return path


class TargetCache:
    """Teacher outputs per ``(video index, view)`` (see the module
    docstring), as float32 whatever form the patch features are stored in
    (:attr:`patch_format`)."""

    def __init__(self, folder, fingerprint: Dict):
        self.folder = os.fspath(folder)
        index = check_pinned(_index_path(self.folder), fingerprint, what=OTHER_CACHE, key="fingerprint")
        self.views = index["views"]
        self.shard_of = index["shards"]
        # Caches written before the int8 form hold float16.
        self.patch_format = index.get("patch_format", "fp16")
        self._open: Dict[str, object] = {}

    def __getstate__(self):
        # Open shards stay with their process: a loader worker started by
        # spawn opens its own.
        return {**self.__dict__, "_open": {}}

    @classmethod
    def for_dataset(cls, folder, dataset, grid: Sequence[int]) -> "TargetCache":
        """The cache in ``folder``, checked against the dataset's videos and
        sampling and the token grid (the teachers are the cache's own)."""
        with open(_index_path(folder), encoding="utf-8") as handle:
            teachers = json.load(handle)["fingerprint"]["teachers"]
        return cls(folder, cache_fingerprint(dataset, grid, teachers))

    def first(self) -> TeacherTargets:
        """One entry (for the targets' widths)."""
        index, view = next(iter(self.shard_of)).split("/")
        return self.get([int(index)], [int(view)])

    @staticmethod
    def key(index: int, view: int) -> str:
        return f"{int(index)}/{int(view)}"

    def sample(self, index: int, view: int) -> Dict[str, torch.Tensor]:
        """One clip's targets, float32: ``patches [T, h*w, Di]``, ``frames
        [T, Di]`` and, with a video teacher, ``video [Dv]``."""
        key = self.key(index, view)
        if key not in self.shard_of:
            raise ValueError(f"{self.folder}: no cached targets for video {index}, view {view}")
        shard = self.shard_of[key]
        if shard not in self._open:
            self._open[shard] = safe_open(os.path.join(self.folder, shard), framework="pt")
        handle = self._open[shard]
        names = handle.keys()
        out = {name: handle.get_tensor(f"{key}/{name}").float() for name in ("patches", "frames", "video")
               if f"{key}/{name}" in names}
        if f"{key}/patch_scales" in names:
            out["patches"] = dequantize_rows(handle.get_tensor(f"{key}/patches"),
                                             handle.get_tensor(f"{key}/patch_scales"))
        return out

    def get(self, indices: Iterable[int], views: Iterable[int]) -> TeacherTargets:
        return targets_of_batch([self.sample(index, view) for index, view in zip(indices, views)])


def targets_of_batch(samples) -> TeacherTargets:
    """:class:`TeacherTargets` of a batch from per-clip ``samples`` (a list
    of :meth:`TargetCache.sample` dicts), or from their stack (the dict
    :func:`lookwhen.data.datasets.collate` makes of them)."""
    if isinstance(samples, dict):
        return TeacherTargets(samples["patches"], samples["frames"], samples.get("video"))
    video = torch.stack([s["video"] for s in samples]) if "video" in samples[0] else None
    return TeacherTargets(torch.stack([s["patches"] for s in samples]), torch.stack([s["frames"] for s in samples]),
                          video)


class WithTargets(WithExtras):
    """A training data set with each sample's cached teacher targets added
    as ``targets`` (:meth:`TargetCache.sample` of its index and view), read
    in the loader's workers."""

    def __init__(self, dataset, cache: TargetCache):
        super().__init__(dataset)
        self.cache = cache

    def extras(self, index: int, sample: Dict) -> Dict:
        return {"targets": self.cache.sample(sample["index"], sample["view"])}


def write_cache(folder, entries: Iterable[Tuple[int, int, TeacherTargets]], fingerprint: Dict, views: int,
                *, shard_size: int = 256, progress=None, rank: int = 0, world: int = 1,
                patch_format: str = "fp16") -> int:
    """Write ``(video index, view, single-clip targets)`` entries as shards,
    the patch features in ``patch_format``; finished shards are kept, so an
    interrupted run restarted with the same fingerprint and form recomputes
    only what is missing (``done`` keys are skipped by the caller through
    :func:`cached_keys`). Rank ``rank`` of ``world > 1`` writes shards and
    an index of its own (see the module docstring). Returns the entry
    count."""
    if patch_format not in PATCH_FORMATS:
        raise ValueError(f"patch_format must be one of {PATCH_FORMATS}, got {patch_format!r}")
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    held = _held_format(folder)
    if held is not None and held != patch_format:
        raise ValueError(f"{folder}: the cache there holds {held} patch targets, not {patch_format} (write the "
                         "other form to a new folder)")
    shard_of = cached_keys(folder, fingerprint)
    own = {} if world == 1 else _read_shards(_rank_index(folder, rank), fingerprint)
    pending: Dict[str, torch.Tensor] = {}
    keys: List[str] = []
    count = 0

    def flush():
        if not keys:
            return
        if world == 1:
            name = shard_name(len(set(shard_of.values())))
        else:
            name = f"shard-r{rank}-{len(set(own.values())):05d}.safetensors"
        write_tensors(os.path.join(folder, name), pending)
        shard_of.update({key: name for key in keys})
        own.update({key: name for key in keys})
        if world == 1:
            _write_index(folder, fingerprint, views, shard_of, patch_format)
        else:
            write_json(_rank_index(folder, rank), {"fingerprint": fingerprint, "views": views, "shards": own,
                                                   "patch_format": patch_format})
        pending.clear()
        keys.clear()

    for index, view, targets in entries:
        key = TargetCache.key(index, view)
        if patch_format == "int8":
            q, scales = quantize_rows(targets.patches.to("cpu"))
            pending[f"{key}/patches"], pending[f"{key}/patch_scales"] = q.contiguous(), scales.contiguous()
        else:
            pending[f"{key}/patches"] = targets.patches.to("cpu", torch.float16).contiguous()
        pending[f"{key}/frames"] = targets.frames.to("cpu", torch.float32).contiguous()
        if targets.video is not None:
            pending[f"{key}/video"] = targets.video.to("cpu", torch.float32).contiguous()
        keys.append(key)
        count += 1
        if progress is not None:
            progress(1)
        if len(keys) >= shard_size:
            flush()
    flush()
    if world == 1:
        _write_index(folder, fingerprint, views, shard_of, patch_format)
    return count


def _rank_index(folder: str, rank: int) -> str:
    return os.path.join(folder, f"index.rank{rank}.json")


def _read_shards(path: str, fingerprint: Dict) -> Dict[str, str]:
    index = check_pinned(path, fingerprint, what=OTHER_CACHE, key="fingerprint")
    return {} if index is None else dict(index["shards"])


def _rank_indexes(folder: str) -> List[str]:
    return sorted(os.path.join(folder, name) for name in os.listdir(folder)
                  if name.startswith("index.rank") and name.endswith(".json")) if os.path.isdir(folder) else []


def cached_keys(folder, fingerprint: Dict) -> Dict[str, str]:
    """``key -> shard`` of what ``folder`` already holds for this fingerprint,
    the ranks' partial indexes included (empty for a new folder; a folder
    made for something else is refused)."""
    folder = os.fspath(folder)
    shard_of = _read_shards(os.path.join(folder, CACHE_INDEX), fingerprint)
    for path in _rank_indexes(folder):
        shard_of.update(_read_shards(path, fingerprint))
    return shard_of


def merge_rank_indexes(folder, fingerprint: Dict, views: int) -> None:
    """Fold the ranks' partial indexes into ``index.json`` (after every rank
    has finished writing), then remove them."""
    folder = os.fspath(folder)
    partial = _rank_indexes(folder)
    _write_index(folder, fingerprint, views, cached_keys(folder, fingerprint), _held_format(folder) or "fp16")
    for path in partial:
        os.remove(path)


def _write_index(folder: str, fingerprint: Dict, views: int, shard_of: Dict[str, str], patch_format: str) -> None:
    write_json(os.path.join(folder, CACHE_INDEX), {"fingerprint": fingerprint, "views": views, "shards": shard_of,
                                                   "patch_format": patch_format})


def _held_format(folder: str) -> Optional[str]:
    """The patch form of what ``folder``'s indexes (the merged one or the
    ranks') already hold; ``None`` for a new folder."""
    for path in [os.path.join(folder, CACHE_INDEX), *_rank_indexes(folder)]:
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                return json.load(handle).get("patch_format", "fp16")
    return None


def teacher_targets(teachers: Teachers, keys: Sequence[Tuple[int, int]], clip: Callable[[int, int], torch.Tensor],
                    grid: Sequence[int], *, batch_size: int = 8, device: torch.device = torch.device("cpu"),
                    skipped: Optional[Callable[[str, str], None]] = None,
                    ) -> Iterator[Tuple[int, int, TeacherTargets]]:
    """What :func:`write_cache` takes: ``(video index, view, single-clip
    targets)`` for every ``(index, view)`` of ``keys``, the clips
    ``clip(index, view)`` run through the teachers ``batch_size`` at a time
    on the ``grid = (h, w)`` token grid. A clip that cannot be read
    (:class:`VideoError`) is reported to ``skipped(path, reason)`` and left
    out."""
    for start in range(0, len(keys), batch_size):
        chunk, clips = [], []
        for index, view in keys[start: start + batch_size]:
            try:
                clips.append(clip(index, view))
                chunk.append((index, view))
            except VideoError as error:
                if skipped is not None:
                    skipped(error.path, error.reason)
        if not clips:
            continue
        targets = teachers(torch.stack(clips).to(device), tuple(grid))
        for b, (index, view) in enumerate(chunk):
            video = None if targets.video is None else targets.video[b]
            yield index, view, TeacherTargets(targets.patches[b], targets.frames[b], video)


def cache_fingerprint(dataset, grid: Sequence[int], teacher_names: Sequence[str]) -> Dict:
    """What cached targets depend on: the videos, their sampling and seed,
    the token grid and the teachers."""
    # An entry without a time window reads as before windows existed, so
    # caches written then stay valid.
    videos = hashlib.sha1("\n".join(f"{e.path},{e.label}" + ("" if e.start is None and e.end is None else
                                                            f",{e.start},{e.end}")
                                    for e in dataset.items).encode()).hexdigest()
    # Through JSON, so it compares equal to what the index file holds.
    return json.loads(json.dumps({"videos": videos, "sampling": dataclasses.asdict(dataset.sampling),
                                  "seed": dataset.seed, "grid": list(grid), "teachers": list(teacher_names)}))
