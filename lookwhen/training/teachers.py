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

Teachers are frozen and run under ``no_grad``, in bf16 on a GPU; their
outputs can be computed once and cached (:mod:`lookwhen.training.targets`).
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Optional, Tuple

import timm
import torch
import torch.nn.functional as F
from torch import nn

from lookwhen.data.video import fit_clips
from lookwhen.io.checkpoint import CheckpointError, load_checkpoint, read_config
from lookwhen.io.weights import load_internvideo2, load_state_dict_file


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
        :func:`lookwhen.io.weights.load_internvideo2`, which refuses missing or
        unexpected keys (its classifier is left out)."""
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
