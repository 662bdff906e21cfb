"""Model configurations and named presets.

One flat dataclass describes both model kinds, so a test or a benchmark can
shrink any preset with ``get_config(name, depth=2, width=64, ...)``. The
``selector_*`` fields only matter for ``kind="lookwhen"``.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Dict, Tuple, Union

# timm's ImageNet statistics, on the 0..1 scale (pixels are divided by 255 first).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

KINDS = ("lookwhen", "dense")
SCORE_HEADS = ("mlp", "stts")


@dataclass(frozen=True)
class ModelConfig:
    name: str
    kind: str = "lookwhen"
    # Input clip and the extractor's token grid.
    frames: int = 16
    image_size: int = 224
    patch_size: int = 16
    tubelet: int = 1
    # Extractor (LookWhen) or the whole trunk (dense).
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    # Selection.
    keep_ratio: float = 0.1
    # Selector: a shallow ViT on the clip scaled down by ``selector_downsample``.
    selector_width: int = 384
    selector_depth: int = 3
    selector_heads: int = 6
    selector_downsample: int = 2
    registers: int = 4
    score_hidden: int = 384
    # Selector score head (issue 14): "mlp" is LookWhen's LayerNorm-MLP
    # (score_tokens); "stts" is STTS's scorer (local half-features with the
    # clip-mean of the other half, an MLP, min-max normalised per clip).
    score_head: str = "mlp"
    # Dense baseline: heads of its attention-pooling head.
    pool_heads: int = 12
    num_classes: int = 0
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    # Random initialisation is seeded so that runs without a checkpoint agree.
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        problems = []
        if self.kind not in KINDS:
            problems.append(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.tubelet != 1:
            problems.append(f"tubelet: only 1 (one frame per token) is supported, got {self.tubelet}")
        for field in ("frames", "image_size", "patch_size", "width", "depth", "heads"):
            if getattr(self, field) < 1:
                problems.append(f"{field} must be positive, got {getattr(self, field)}")
        if self.width % max(self.heads, 1):
            problems.append(f"width {self.width} is not divisible by heads {self.heads}")
        if self.image_size % max(self.patch_size, 1):
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            problems.append("mean and std need three values (R, G, B)")
        if self.kind == "lookwhen":
            if not 0.0 < self.keep_ratio <= 1.0:
                problems.append(f"keep_ratio must lie in (0, 1], got {self.keep_ratio}")
            for field in ("selector_width", "selector_depth", "selector_heads", "selector_downsample", "score_hidden"):
                if getattr(self, field) < 1:
                    problems.append(f"{field} must be positive, got {getattr(self, field)}")
            if self.score_head not in SCORE_HEADS:
                problems.append(f"score_head must be one of {SCORE_HEADS}, got {self.score_head!r}")
            elif self.score_head == "stts" and self.selector_width < 4:
                problems.append(f"score_head 'stts' needs selector_width >= 4, got {self.selector_width}")
            if self.registers < 0:
                problems.append(f"registers must be >= 0, got {self.registers}")
            if self.selector_width % max(self.selector_heads, 1):
                problems.append(
                    f"selector_width {self.selector_width} is not divisible by selector_heads {self.selector_heads}"
                )
            window = self.patch_size * self.selector_downsample
            if self.image_size % window:
                problems.append(
                    f"image_size {self.image_size} is not a multiple of patch_size x selector_downsample = {window}"
                )
        elif self.width % max(self.pool_heads, 1):
            problems.append(f"width {self.width} is not divisible by pool_heads {self.pool_heads}")
        if problems:
            raise ValueError(f"config {self.name!r}: " + "; ".join(problems))

    # Derived sizes -----------------------------------------------------------
    @property
    def grid(self) -> Tuple[int, int, int]:
        """The extractor's token grid ``(T, h, w)``."""
        side = self.image_size // self.patch_size
        return (self.frames, side, side)

    @property
    def n_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def selector_grid(self) -> Tuple[int, int, int]:
        side = self.image_size // (self.patch_size * self.selector_downsample)
        return (self.frames, side, side)

    @property
    def n_selector_tokens(self) -> int:
        return math.prod(self.selector_grid)

    @property
    def n_context(self) -> int:
        """Tokens that precede the selected ones in each extractor sequence:
        the extractor's CLS, the selector's CLS and its registers."""
        return 2 + self.registers

    # Serialisation -----------------------------------------------------------
    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"config: unknown fields {unknown}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))


PRESETS: Dict[str, ModelConfig] = {
    # ViT-B/16 extractor on 16 x 14 x 14 = 3136 candidates, a 3-layer width-384
    # selector on the 112-px clip (16 x 7 x 7 tokens).
    "lookwhen-b16": ModelConfig(name="lookwhen-b16"),
    # The same with a ViT-B-wide selector, like the authors' image model.
    "lookwhere-b16": ModelConfig(
        name="lookwhere-b16", selector_width=768, selector_heads=12, score_hidden=768
    ),
    # The dense model the paper compares against: ViT-B/14, 8 x 16 x 16 = 2048
    # tokens + CLS, attention-pooling head.
    "internvideo2-b14": ModelConfig(
        name="internvideo2-b14", kind="dense", frames=8, patch_size=14
    ),
}

DEFAULT_PRESET = "lookwhen-b16"
BASELINE_PRESET = "internvideo2-b14"


def get_config(name_or_config: Union[str, ModelConfig] = DEFAULT_PRESET, **overrides) -> ModelConfig:
    """A preset by name (or a given config) with ``overrides`` applied."""
    if isinstance(name_or_config, ModelConfig):
        base = name_or_config
    elif name_or_config in PRESETS:
        base = PRESETS[name_or_config]
    else:
        raise ValueError(f"unknown preset {name_or_config!r}; choose from {', '.join(PRESETS)}")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown config fields {unknown}")
    return dataclasses.replace(base, **overrides) if overrides else base


_KIND = {bool: "true or false", int: "an integer", float: "a number", tuple: "numbers separated by /", str: "a string"}


def _coerce(key: str, text: str, current):
    try:
        if isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if isinstance(current, tuple):
            return tuple(float(v) for v in text.split("/"))
        return type(current)(text)
    except ValueError:
        raise ValueError(f"{key}={text}: expected {_KIND[type(current)]}") from None


def parse_overrides(items) -> Dict[str, object]:
    """``["depth=2", "frames=4"]`` (command-line ``KEY=VALUE`` items) ->
    typed config overrides."""
    defaults = dataclasses.asdict(PRESETS[DEFAULT_PRESET])
    out: Dict[str, object] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{item!r}: expected KEY=VALUE")
        if key not in defaults or key == "name":
            raise ValueError(f"{key!r}: not a config field (choose from {', '.join(k for k in defaults if k != 'name')})")
        out[key] = _coerce(key, value, defaults[key])
    return out

