"""Frozen teachers for pre-training, and a disk cache of their outputs.

- :class:`ImageTeacher`: a timm ViT (DINOv3 / DINOv2 in the paper) built by
  name, weights from a local file (nothing is downloaded), run frame by
  frame at its own resolution and normalisation. It returns every frame's
  patch features resampled to the token grid the targets need, and every
  frame's global token (timm's pre-logits: CLS or pooled).
- :class:`VideoTeacher`: any ``nn.Module`` mapping a uint8 clip to ``[B, D]``;
  by default the faithful InternVideo2-B/14 (``internvideo2-b14``) with an
  official InternVideo2 checkpoint, or any of our models from a lookwhen
  checkpoint. The clip is resampled to the frames and size the teacher was
  built for.

Teachers are frozen and run under ``no_grad``, in bf16 on a GPU.
:class:`TargetCache` stores their outputs per ``(video index, view)`` in
safetensors shards, so a many-epoch run pays for the teachers once
(``lookwhen cache-targets``).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from lookwhen.data.video import fit_clips


@dataclass
class TeacherTargets:
    """``patches [B, T, h*w, Di]`` (image teacher, on the token grid),
    ``frames [B, T, Di]`` (image teacher's per-frame global token),
    ``video [B, Dv]`` (video teacher; ``None`` without one). float32."""

    patches: torch.Tensor
    frames: torch.Tensor
    video: Optional[torch.Tensor] = None

    def to(self, device) -> "TeacherTargets":
        return TeacherTargets(*(None if t is None else t.to(device) for t in (self.patches, self.frames, self.video)))


def load_state_dict_file(path) -> Dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a torch file (``weights_only``;
    a ``{"model": ...}`` or ``{"state_dict": ...}`` wrapper and DDP's
    ``module.`` prefix are unwrapped)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such weights file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many kinds for a bad file
            raise ValueError(f"{path}: not a safetensors or torch state-dict file ({error})") from None
        for key in ("model", "state_dict"):
            if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
                state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a mapping of parameter names to tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class ImageTeacher(nn.Module):
    """A frozen timm image model: DINOv2 (``vit_base_patch14_reg4_dinov2``,
    ...) and DINOv3 (``vit_base_patch16_dinov3``, ...) through timm's own
    definitions. It runs at the model's own resolution (its pretrained
    config's ``input_size``: 518 px for DINOv2, 256 for DINOv3) and
    normalisation unless ``image_size`` overrides the resolution (timm
    resamples its position table); ``model_kwargs`` go to
    ``timm.create_model`` (``depth=``, ``dynamic_img_size=``, ...).

    Patch features are the tokens after the model's prefix (CLS and
    registers, ``num_prefix_tokens``), resampled from the model's patch grid
    (patch 14 or 16) to the grid the targets need. The global token is the
    CLS token as the upstream models define it: timm pools DINOv3 by
    averaging unless told otherwise, so models with a CLS token are set to
    token pooling unless ``global_pool`` is given."""

    def __init__(self, name: str, weights, *, image_size: Optional[int] = None,
                 frame_chunk: int = 64, **model_kwargs):
        super().__init__()
        import timm

        kwargs = dict(model_kwargs)
        if image_size is not None:
            kwargs["img_size"] = image_size
        try:
            model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        except RuntimeError as error:  # timm's "Unknown model"
            raise ValueError(f"image teacher {name!r}: {error}") from None
        if ("global_pool" not in kwargs and getattr(model, "cls_token", None) is not None
                and getattr(model, "global_pool", "token") not in ("token", "map")):
            model.reset_classifier(0, global_pool="token")
        state = load_state_dict_file(weights)
        # The model family's own converter, as timm applies it to pretrained
        # weights: it resamples position tables to this resolution and maps
        # the original releases' key names (DINOv2's, say).
        convert = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
        if convert is not None:
            state = convert(state, model)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"{os.fspath(weights)}: does not fit {name}: missing keys {result.missing_keys[:5]}, "
                f"unexpected keys {result.unexpected_keys[:5]}"
            )
        self.name = name
        self.model = _freeze(model)
        config = model.pretrained_cfg
        self.image_size = image_size or int(config.get("input_size", (3, 224, 224))[-1])
        self.register_buffer("mean", torch.tensor(config.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(config.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1),
                             persistent=False)
        self.frame_chunk = frame_chunk

    @property
    def dim(self) -> int:
        return self.model.num_features

    def _features(self, frames: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``[F, H, W, 3]`` -> patch grid ``[F, D, gh, gw]`` and global ``[F, D]``."""
        x = frames.permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        with _autocast(x.device):
            tokens = self.model.forward_features(x)
            pooled = self.model.forward_head(tokens, pre_logits=True)
        patches = tokens[:, self.model.num_prefix_tokens:].float()
        side = round(patches.shape[1] ** 0.5)
        if side * side != patches.shape[1]:
            raise ValueError(f"image teacher {self.name}: {patches.shape[1]} patch tokens are not a square grid")
        return patches.transpose(1, 2).reshape(len(x), -1, side, side), pooled.float()

    @torch.no_grad()
    def forward(self, clip: torch.Tensor, grid: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``[B, T, H, W, 3]`` -> (patch features ``[B, T, h*w, D]`` on
        the ``grid = (h, w)`` token grid, global tokens ``[B, T, D]``)."""
        batch, frames = clip.shape[:2]
        flat = clip.reshape(batch * frames, *clip.shape[2:])
        patch_parts, global_parts = [], []
        for start in range(0, len(flat), self.frame_chunk):
            patches, pooled = self._features(flat[start: start + self.frame_chunk])
            if patches.shape[-2:] != tuple(grid):
                # Area-weighted when shrinking, bilinear when growing.
                mode = "area" if patches.shape[-1] > grid[1] else "bilinear"
                patches = F.interpolate(patches, size=tuple(grid), mode=mode,
                                        **({} if mode == "area" else {"align_corners": False}))
            patch_parts.append(patches.flatten(2).transpose(1, 2))
            global_parts.append(pooled)
        patches = torch.cat(patch_parts).view(batch, frames, grid[0] * grid[1], -1)
        return patches, torch.cat(global_parts).view(batch, frames, -1)


class VideoTeacher(nn.Module):
    """A frozen clip -> ``[B, D]`` module. When the module has a ``config``
    with ``frames`` and ``image_size`` (our models), clips are resampled to
    them: frames by the uniform rule, pixels by an antialiased resize."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = _freeze(module)
        config = getattr(module, "config", None)
        self.frames = getattr(config, "frames", None)
        self.image_size = getattr(config, "image_size", None)

    @classmethod
    def from_checkpoint(cls, path, device="cpu", *, config: str = "internvideo2-b14",
                        **overrides) -> "VideoTeacher":
        """The teacher in a weights file: a lookwhen checkpoint (safetensors
        with its config, :mod:`lookwhen.io.checkpoint`) rebuilds its own model;
        any other file is an official InternVideo2 checkpoint, loaded into
        the faithful ``config`` preset (with ``overrides``) by
        :func:`lookwhen.models.baseline.load_internvideo2`, which refuses missing or
        unexpected keys (its classifier is left out)."""
        from lookwhen.models.baseline import load_internvideo2
        from lookwhen.io.checkpoint import CheckpointError, load_checkpoint, read_config

        try:
            read_config(path)
        except CheckpointError:
            model, _ = load_internvideo2(path, config, **overrides)
            return cls(model.to(device))
        return cls(load_checkpoint(path, device))

    @torch.no_grad()
    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        clip = fit_clips(clip, self.frames, self.image_size)
        with _autocast(clip.device):
            out = self.module(clip.contiguous())
        embedding = getattr(out, "embedding", out)
        return embedding.float()


class Teachers:
    """The image teacher and an optional video teacher, run together."""

    def __init__(self, image: ImageTeacher, video: Optional[VideoTeacher] = None):
        self.image = image
        self.video = video

    def to(self, device) -> "Teachers":
        self.image.to(device)
        if self.video is not None:
            self.video.to(device)
        return self

    def __call__(self, clip: torch.Tensor, grid: Tuple[int, int]) -> TeacherTargets:
        patches, frames = self.image(clip, grid)
        return TeacherTargets(patches, frames, None if self.video is None else self.video(clip))


# The cache ---------------------------------------------------------------------
CACHE_INDEX = "index.json"


class TargetCache:
    """Teacher outputs per ``(video index, view)`` in safetensors shards
    ``shard-XXXXX.safetensors`` under ``folder``, with ``index.json`` naming
    the shard of every key and the dataset, sampling and grid they were made
    for (a cache made for other clips is refused, not silently misused).
    Patch features are stored in float16 (they are regression targets; the
    loss standardises them first)."""

    def __init__(self, folder, fingerprint: Dict):
        self.folder = os.fspath(folder)
        path = os.path.join(self.folder, CACHE_INDEX)
        if not os.path.isfile(path):
            raise ValueError(f"{self.folder}: not a target cache (no {CACHE_INDEX}; make one with lookwhen cache-targets)")
        with open(path, encoding="utf-8") as handle:
            index = json.load(handle)
        if index["fingerprint"] != fingerprint:
            differ = sorted(k for k in set(index["fingerprint"]) | set(fingerprint)
                            if index["fingerprint"].get(k) != fingerprint.get(k))
            raise ValueError(f"{self.folder}: the cache was made for other clips or teachers (differs in {differ})")
        self.views = index["views"]
        self.shard_of = index["shards"]
        self._open: Dict[str, object] = {}

    @classmethod
    def for_dataset(cls, folder, dataset, grid: Sequence[int]) -> "TargetCache":
        """The cache in ``folder``, checked against the dataset's videos and
        sampling and the token grid (the teachers are the cache's own)."""
        path = os.path.join(os.fspath(folder), CACHE_INDEX)
        if not os.path.isfile(path):
            raise ValueError(f"{os.fspath(folder)}: not a target cache (no {CACHE_INDEX}; make one with "
                             "lookwhen cache-targets)")
        with open(path, encoding="utf-8") as handle:
            teachers = json.load(handle)["fingerprint"]["teachers"]
        return cls(folder, cache_fingerprint(dataset, grid, teachers))

    def first(self) -> TeacherTargets:
        """One entry (for the targets' widths)."""
        index, view = next(iter(self.shard_of)).split("/")
        return self.get([int(index)], [int(view)])

    @staticmethod
    def key(index: int, view: int) -> str:
        return f"{int(index)}/{int(view)}"

    def get(self, indices: Iterable[int], views: Iterable[int]) -> TeacherTargets:
        from safetensors import safe_open

        parts: Dict[str, List[torch.Tensor]] = {"patches": [], "frames": [], "video": []}
        for index, view in zip(indices, views):
            key = self.key(index, view)
            if key not in self.shard_of:
                raise ValueError(f"{self.folder}: no cached targets for video {index}, view {view}")
            shard = self.shard_of[key]
            if shard not in self._open:
                self._open[shard] = safe_open(os.path.join(self.folder, shard), framework="pt")
            handle = self._open[shard]
            for name in parts:
                if f"{key}/{name}" in handle.keys():
                    parts[name].append(handle.get_tensor(f"{key}/{name}").float())
        video = torch.stack(parts["video"]) if parts["video"] else None
        return TeacherTargets(torch.stack(parts["patches"]), torch.stack(parts["frames"]), video)


def write_cache(folder, entries: Iterable[Tuple[int, int, TeacherTargets]], fingerprint: Dict, views: int,
                *, shard_size: int = 256, progress=None) -> int:
    """Write ``(video index, view, single-clip targets)`` entries as shards;
    finished shards are kept, so an interrupted run restarted with the same
    fingerprint recomputes only what is missing (``done`` keys are skipped
    by the caller through :func:`cached_keys`). Returns the entry count."""
    from safetensors.torch import save_file

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    shard_of = cached_keys(folder, fingerprint)
    pending: Dict[str, torch.Tensor] = {}
    keys: List[str] = []
    count = 0

    def flush():
        if not keys:
            return
        name = f"shard-{len(set(shard_of.values())):05d}.safetensors"
        temporary = os.path.join(folder, name + ".tmp")
        save_file(pending, temporary)
        os.replace(temporary, os.path.join(folder, name))
        shard_of.update({key: name for key in keys})
        _write_index(folder, fingerprint, views, shard_of)
        pending.clear()
        keys.clear()

    for index, view, targets in entries:
        key = TargetCache.key(index, view)
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
    _write_index(folder, fingerprint, views, shard_of)
    return count


def cached_keys(folder, fingerprint: Dict) -> Dict[str, str]:
    """``key -> shard`` of what ``folder`` already holds for this fingerprint
    (empty for a new folder; a folder made for something else is refused)."""
    path = os.path.join(os.fspath(folder), CACHE_INDEX)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        index = json.load(handle)
    if index.get("fingerprint") != fingerprint:
        raise ValueError(f"{os.fspath(folder)}: holds a cache made for other clips or teachers; use a new folder")
    return dict(index["shards"])


def _write_index(folder: str, fingerprint: Dict, views: int, shard_of: Dict[str, str]) -> None:
    temporary = os.path.join(folder, CACHE_INDEX + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump({"fingerprint": fingerprint, "views": views, "shards": shard_of}, handle)
    os.replace(temporary, os.path.join(folder, CACHE_INDEX))


def cache_fingerprint(dataset, grid: Sequence[int], teacher_names: Sequence[str]) -> Dict:
    """What cached targets depend on: the videos, their sampling and seed,
    the token grid and the teachers."""
    import dataclasses
    import hashlib

    videos = hashlib.sha1("\n".join(f"{p},{l}" for p, l in dataset.items).encode()).hexdigest()
    # Through JSON, so it compares equal to what the index file holds.
    return json.loads(json.dumps({"videos": videos, "sampling": dataclasses.asdict(dataset.sampling),
                                  "seed": dataset.seed, "grid": list(grid), "teachers": list(teacher_names)}))
