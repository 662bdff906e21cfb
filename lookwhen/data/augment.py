"""Clip augmentations on the uint8 path, each the same on every frame of a
clip (an operation that differed from frame to frame would add motion that
is not in the video), every random choice drawn from the clip's own
generator, so a resumed run cuts the same clips.

- **RandAugment** (``randaugment=(n, m)``): ``n`` operations drawn uniformly
  from :data:`OPERATIONS`, each at magnitude ``m`` of 10 with a random sign
  where it has one (timm's ``rand-m{m}-n{n}``; VideoMAE and the InternVideo
  fine-tuning recipes use m7-n4 or m9-n2). The geometric operations fill
  with black.
- **Random erasing** (``erase=p``): with probability ``p`` one rectangle of
  2-33% of the frame, aspect ratio 0.3-3.3 (log-uniform), filled with
  uniform noise, in the same place on every frame (timm's ``mode="pixel"``
  with VideoMAE's clip-wide box).

Mixup and CutMix mix two clips and their labels, so they act on batches:
:mod:`lookwhen.training.finetune`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch


class _Torchvision:
    """``torchvision.transforms.v2.functional``, imported on first use:
    importing torchvision loads dynamo and inductor (about 1 s), which every
    process reading a data set (and ``lookwhen --help``) would otherwise pay
    whether or not it augments."""

    def __getattr__(self, name):
        import torchvision.transforms.v2.functional as functional
        return getattr(functional, name)


TF = _Torchvision()


def _signed(generator: torch.Generator) -> float:
    return -1.0 if bool(torch.rand((), generator=generator) < 0.5) else 1.0


# Operation name -> f(clip [T, 3, H, W] uint8, level in [0, 1], generator).
# The ranges are timm's RandAugment ranges at level 1 (magnitude 10).
OPERATIONS: Dict[str, Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]] = {
    "identity": lambda x, level, g: x,
    "autocontrast": lambda x, level, g: TF.autocontrast(x),
    "equalize": lambda x, level, g: TF.equalize(x),
    "rotate": lambda x, level, g: TF.rotate(x, 30.0 * level * _signed(g)),
    "solarize": lambda x, level, g: TF.solarize(x, 255 - round(256 * level)),
    "posterize": lambda x, level, g: TF.posterize(x, 8 - round(4 * level)),
    "colour": lambda x, level, g: TF.adjust_saturation(x, 1.0 + 0.9 * level * _signed(g)),
    "contrast": lambda x, level, g: TF.adjust_contrast(x, 1.0 + 0.9 * level * _signed(g)),
    "brightness": lambda x, level, g: TF.adjust_brightness(x, 1.0 + 0.9 * level * _signed(g)),
    "sharpness": lambda x, level, g: TF.adjust_sharpness(x, 1.0 + 0.9 * level * _signed(g)),
    "shear_x": lambda x, level, g: TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0,
                                             shear=[math.degrees(math.atan(0.3 * level * _signed(g))), 0.0]),
    "shear_y": lambda x, level, g: TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0,
                                             shear=[0.0, math.degrees(math.atan(0.3 * level * _signed(g)))]),
    "translate_x": lambda x, level, g: TF.affine(x, angle=0.0, translate=[round(0.45 * level * _signed(g)
                                                                                * x.shape[-1]), 0],
                                                 scale=1.0, shear=[0.0, 0.0]),
    "translate_y": lambda x, level, g: TF.affine(x, angle=0.0, translate=[0, round(0.45 * level * _signed(g)
                                                                                   * x.shape[-2])],
                                                 scale=1.0, shear=[0.0, 0.0]),
}
_NAMES = tuple(OPERATIONS)


@dataclass(frozen=True)
class Augment:
    """``randaugment``: ``(n, m)`` or None; ``erase``: the probability of
    random erasing (0: never)."""

    randaugment: Optional[Tuple[int, int]] = None
    erase: float = 0.0

    def __post_init__(self):
        if self.randaugment is not None:
            n, m = self.randaugment
            if n < 1 or not 0 <= m <= 10:
                raise ValueError(f"randaugment: expected n >= 1 operations at a magnitude m in [0, 10], got "
                                 f"n={n}, m={m}")
        if not 0 <= self.erase <= 1:
            raise ValueError(f"erase: a probability in [0, 1], got {self.erase}")

    def __bool__(self) -> bool:
        return self.randaugment is not None or self.erase > 0

    def __call__(self, clip: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 ``[T, H, W, 3]`` -> the same shape, augmented."""
        if not self:
            return clip
        x = clip.permute(0, 3, 1, 2)
        if self.randaugment is not None:
            n, m = self.randaugment
            for choice in torch.randint(0, len(_NAMES), (n,), generator=generator).tolist():
                x = OPERATIONS[_NAMES[choice]](x, m / 10, generator)
        if self.erase and bool(torch.rand((), generator=generator) < self.erase):
            x = erase(x, generator)
        return x.permute(0, 2, 3, 1).contiguous()


def erase(x: torch.Tensor, generator: torch.Generator, attempts: int = 10) -> torch.Tensor:
    """One noise-filled rectangle in the same place on every frame of
    ``x [T, 3, H, W]`` (unchanged if no drawn box fits in ``attempts``)."""
    _, channels, height, width = x.shape
    for _ in range(attempts):
        area = height * width * (0.02 + 0.31 * float(torch.rand((), generator=generator)))
        aspect = math.exp(math.log(0.3) + (math.log(1 / 0.3) - math.log(0.3)) * float(torch.rand((), generator=generator)))
        h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < h < height and 0 < w < width:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            x = x.clone()
            x[:, :, top: top + h, left: left + w] = torch.randint(0, 256, (channels, h, w), generator=generator,
                                                                  dtype=torch.uint8)
            return x
    return x
