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
from typing import Dict, Optional, Tuple, Union

# timm's ImageNet statistics, on the 0..1 scale (pixels are divided by 255 first).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

KINDS = ("lookwhen", "dense")
# Choices of the architecture options (the names lookwhen.models.layers checks too).
NORMS = ("layernorm", "rmsnorm")
QK_NORMS = ("none", "width", "head")
MLP_ACTS = ("gelu", "gelu_tanh")
POS_EMBEDS = ("separable", "joint")
ATTENTIONS = ("kernels", "sdpa")
SCORE_HEADS = ("mlp", "stts")


def _type_problem(name: str, annotation: str, value) -> Optional[str]:
    """What is wrong with a field's value for its annotated type, or None."""
    if annotation == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif annotation == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif annotation == "bool":
        ok = isinstance(value, bool)
    elif annotation == "str":
        ok = isinstance(value, str)
    else:  # the (R, G, B) statistics
        ok = isinstance(value, (tuple, list)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    article = {"float": "a finite ", "int": "an "}.get(annotation, "a ")
    return None if ok else f"{name} must be {article}{annotation}, got {value!r}"


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
    # Selection. ``keep_rounding``: how a keep ratio becomes a token count,
    # "round" (to nearest) or "floor" (LookWhere's ``int(k_ratio * N)``); at
    # least one token either way.
    keep_ratio: float = 0.1
    keep_rounding: str = "round"
    # Selector: a shallow ViT on the clip scaled down by ``selector_downsample``.
    selector_width: int = 384
    selector_depth: int = 3
    selector_heads: int = 6
    selector_downsample: int = 2
    registers: int = 4
    score_hidden: int = 384
    # Selector geometry and head (issue 12, the paper-faithful preset and
    # LookWhere's head). The selector sees every ``selector_frame_stride``-th
    # frame (its scores cover the frames up to the next one). The score head
    # emits ``score_outputs`` = r*r logits per token, laid onto an r-times
    # finer grid and resized to the extractor's (1: one score per token).
    # ``context_projection``: the selector's CLS and registers reach the
    # extractor through a Linear to its width; without it (equal widths, as in
    # LookWhere) they enter as they are. ``selector_image_size`` > 0: the
    # selector sees the normalised frames bilinearly resized to that many
    # pixels (LookWhere's 154) instead of the clip pooled by
    # ``selector_downsample``. ``extractor_cls=False``: the extractor has no
    # CLS of its own; the selector's CLS leads each sequence and its final
    # state is the embedding (LookWhere).
    selector_frame_stride: int = 1
    score_outputs: int = 1
    context_projection: bool = True
    selector_image_size: int = 0
    extractor_cls: bool = True
    # Selector score head (issue 14): "mlp" is LookWhen's LayerNorm-MLP
    # (score_tokens); "stts" is STTS's scorer (local half-features with the
    # clip-mean of the other half, an MLP, min-max normalised per clip).
    score_head: str = "mlp"
    # Dense baseline: heads of its attention-pooling head.
    pool_heads: int = 12
    # Architecture options (issue 12, fidelity), kept together. Block options
    # of every trunk (lookwhen.models.layers.Block; the defaults are timm's plain
    # ViT): "layernorm" or "rmsnorm"; qkv bias; qk-norm "none", "width"
    # (InternVideo2) or "head" (timm); LayerScale initial value (0: none);
    # MLP activation "gelu" or "gelu_tanh". Dense baseline only: position
    # embedding "separable" (learned temporal + spatial factors) or "joint"
    # (one [1 + N, D] table with a CLS row, initialised as InternVideo2's 3-D
    # sin-cos); a final norm after the blocks (InternVideo2 has none); the
    # attention path, "kernels" (lookwhen_kernels.varlen_attention, as
    # LookWhen's extractor) or "sdpa" (PyTorch's scaled_dot_product_attention).
    norm: str = "layernorm"
    qkv_bias: bool = True
    qk_norm: str = "none"
    layer_scale: float = 0.0
    mlp_act: str = "gelu"
    pos_embed: str = "separable"
    final_norm: bool = True
    attention: str = "kernels"
    num_classes: int = 0
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    # Random initialisation is seeded so that runs without a checkpoint agree.
    seed: int = 0

    def __post_init__(self):
        # A config read from a file may hold anything: the types first (32.0
        # is not a width; NaN is no keep ratio).
        type_problems = [_type_problem(f.name, f.type, getattr(self, f.name)) for f in dataclasses.fields(self)]
        type_problems = [problem for problem in type_problems if problem]
        if type_problems:
            raise ValueError("config: " + "; ".join(type_problems))
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
        for field, choices in (("norm", NORMS), ("qk_norm", QK_NORMS), ("mlp_act", MLP_ACTS),
                               ("pos_embed", POS_EMBEDS), ("attention", ATTENTIONS)):
            if getattr(self, field) not in choices:
                problems.append(f"{field} must be one of {choices}, got {getattr(self, field)!r}")
        if self.layer_scale < 0:
            problems.append(f"layer_scale must be >= 0 (0: no LayerScale), got {self.layer_scale}")
        if self.kind == "lookwhen" and (self.pos_embed != "separable" or not self.final_norm
                                        or self.attention != "kernels"):
            problems.append("pos_embed, final_norm and attention are options of the dense baseline; LookWhen "
                            "keeps pos_embed='separable', final_norm=true and attention='kernels' (its "
                            "extractor runs on packed tokens)")
        if self.pos_embed == "joint" and self.width % 16:
            problems.append(f"pos_embed='joint' (3-D sin-cos: a quarter of the width for time, the rest split "
                            f"between rows and columns, each even) needs a width divisible by 16, got {self.width}")
        if len(self.mean) != 3 or len(self.std) != 3:
            problems.append("mean and std need three values (R, G, B)")
        if self.kind == "lookwhen":
            if not 0.0 < self.keep_ratio <= 1.0:
                problems.append(f"keep_ratio must lie in (0, 1], got {self.keep_ratio}")
            if self.keep_rounding not in ("round", "floor"):
                problems.append(f"keep_rounding must be 'round' or 'floor', got {self.keep_rounding!r}")
            for field in ("selector_width", "selector_depth", "selector_heads", "selector_downsample", "score_hidden"):
                if getattr(self, field) < 1:
                    problems.append(f"{field} must be positive, got {getattr(self, field)}")
            for field in ("selector_frame_stride", "score_outputs"):
                if getattr(self, field) < 1:
                    problems.append(f"{field} must be positive, got {getattr(self, field)}")
            if self.frames % max(self.selector_frame_stride, 1):
                problems.append(
                    f"frames {self.frames} is not a multiple of selector_frame_stride {self.selector_frame_stride}"
                )
            if math.isqrt(max(self.score_outputs, 0)) ** 2 != self.score_outputs:
                problems.append(f"score_outputs must be a square (r*r logits per token), got {self.score_outputs}")
            if not self.context_projection and self.selector_width != self.width:
                problems.append(
                    f"context_projection=False needs selector_width == width, got {self.selector_width} and {self.width}"
                )
            if self.score_head not in SCORE_HEADS:
                problems.append(f"score_head must be one of {SCORE_HEADS}, got {self.score_head!r}")
            elif self.score_head == "stts" and self.selector_width < 4:
                problems.append(f"score_head 'stts' needs selector_width >= 4, got {self.selector_width}")
            elif self.score_head == "stts" and self.score_outputs != 1:
                problems.append(f"score_head 'stts' gives one score per token: score_outputs must be 1, "
                                f"got {self.score_outputs}")
            if self.registers < 0:
                problems.append(f"registers must be >= 0, got {self.registers}")
            if self.selector_width % max(self.selector_heads, 1):
                problems.append(
                    f"selector_width {self.selector_width} is not divisible by selector_heads {self.selector_heads}"
                )
            window = self.patch_size * self.selector_downsample
            if self.selector_image_size < 0 or self.selector_image_size % max(self.patch_size, 1):
                problems.append(
                    f"selector_image_size must be 0 or a positive multiple of patch_size {self.patch_size}, "
                    f"got {self.selector_image_size}"
                )
            elif self.selector_image_size == 0 and self.image_size % window:
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

    def tokens_kept(self, keep_ratio: Optional[float] = None) -> int:
        """The tokens a keep ratio (default the config's) keeps per clip."""
        ratio = self.keep_ratio if keep_ratio is None else keep_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"keep_ratio: expected a float in (0, 1], got {ratio!r}")
        if self.keep_rounding == "floor":
            return max(1, int(ratio * self.n_tokens))
        # The kernels' package is imported here, not at the top: reading a
        # config (lookwhen --help) does not need it.
        from lookwhen_kernels import keep_ratio_to_k
        return keep_ratio_to_k(ratio, self.n_tokens)

    @property
    def selector_grid(self) -> Tuple[int, int, int]:
        """The selector's token grid ``(T / selector_frame_stride, h, w)``."""
        if self.selector_image_size:
            side = self.selector_image_size // self.patch_size
        else:
            side = self.image_size // (self.patch_size * self.selector_downsample)
        return (self.frames // self.selector_frame_stride, side, side)

    @property
    def score_grid(self) -> Tuple[int, int, int]:
        """The grid the selector's scores reach ``topk_tokens`` on: the
        selector's, repeated over the frames each selector frame stands for
        (``LookWhen`` repeats them; with ``score_outputs`` = r*r the scores
        are ``[B, n, r*r]`` on this grid)."""
        _, h, w = self.selector_grid
        return (self.frames, h, w)

    @property
    def score_map_grid(self) -> Tuple[int, int, int]:
        """The selector's scores as one map per selector frame, before the
        resize to the extractor's grid: ``selector_grid`` with each spatial
        side times r (what the uniqueness target is pooled to)."""
        frames, h, w = self.selector_grid
        r = math.isqrt(self.score_outputs)
        return (frames, h * r, w * r)

    @property
    def n_selector_tokens(self) -> int:
        return math.prod(self.selector_grid)

    @property
    def n_context(self) -> int:
        """Tokens that precede the selected ones in each extractor sequence:
        the extractor's CLS (unless ``extractor_cls`` is off), the selector's
        CLS and its registers."""
        return int(self.extractor_cls) + 1 + self.registers

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
    # The paper's LookWhen (106 M parameters; 40 and 108 GMACs per view at
    # keep ratios 0.1 and 0.3): a ViT-B/16 extractor on 16 x 14 x 14 = 3136
    # candidates and a 3-layer ViT-B-wide selector on the clip scaled down 2x
    # in space and time (8 frames of 112 px: 8 x 7 x 7 = 392 tokens), whose
    # CLS and registers enter the extractor unprojected. The derivation is in
    # docs/models.md ("Presets"); tests/test_model.py pins the figures.
    "lookwhen-b16": ModelConfig(
        name="lookwhen-b16", selector_width=768, selector_heads=12, score_hidden=384,
        selector_frame_stride=2, context_projection=False,
    ),
    # The earlier, lighter selector: 3 layers 384 wide on all 16 frames at
    # 112 px (16 x 7 x 7 tokens), projected to the extractor's width.
    "lookwhen-b16-light": ModelConfig(name="lookwhen-b16-light"),
    # The light preset's layout with a ViT-B-wide selector, like the authors' image model.
    "lookwhere-b16": ModelConfig(
        name="lookwhere-b16", selector_width=768, selector_heads=12, score_hidden=768
    ),
    # LookWhere's released image model (lookwhen.models.lookwhere loads
    # lookwhere_dinov2.pt): DINOv2-B/14 with 4 registers and LayerScale as
    # selector (3 blocks on the image resized to 154 px: 11 x 11 tokens, a
    # 4 x 4 logit head) and extractor (12 blocks at 518 px: 37 x 37), the
    # selector's normed CLS and registers leading the extractor's sequences.
    "lookwhere-dinov2": ModelConfig(
        name="lookwhere-dinov2", frames=1, image_size=518, patch_size=14, layer_scale=1e-5,
        selector_width=768, selector_heads=12, score_hidden=3072, score_outputs=16, selector_image_size=154,
        context_projection=False, extractor_cls=False, keep_rounding="floor",
    ),
    # A first run on a laptop CPU: 8 frames of 64 px in 8-px patches (8 x 8
    # tokens a frame, 512 candidates), two 64-wide layers each for the
    # selector (on every frame, at 32 px: 4 x 4) and the extractor, keeping a
    # quarter of the tokens. Not a model to report: a few dozen pre-training
    # or fine-tuning steps take seconds (docs/training.md, "First run").
    "lookwhen-tiny": ModelConfig(
        name="lookwhen-tiny", frames=8, image_size=64, patch_size=8, width=64, depth=2, heads=2,
        selector_width=64, selector_depth=2, selector_heads=2, score_hidden=64, registers=2, keep_ratio=0.25,
    ),
    # The dense model the paper compares against, InternVideo2-B/14
    # (internvideo2_base_patch14_224): 8 x 16 x 16 = 2048 tokens + CLS, a
    # joint 3-D sin-cos position table, RMSNorm, qk-norm, no qkv bias,
    # LayerScale 1e-5, tanh GELU, no final norm, a 16-head attention-pooling head.
    "internvideo2-b14": ModelConfig(
        name="internvideo2-b14", kind="dense", frames=8, patch_size=14, pool_heads=16,
        norm="rmsnorm", qkv_bias=False, qk_norm="width", layer_scale=1e-5, mlp_act="gelu_tanh",
        pos_embed="joint", final_norm=False,
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


def coerce_field(key: str, text: str):
    """The value of config field ``key`` written as ``text`` on a command
    line (``true``, ``4``, ``0.5``, ``0.5/0.5/0.5``), typed as the field."""
    defaults = dataclasses.asdict(PRESETS[DEFAULT_PRESET])
    if key not in defaults or key == "name":
        raise ValueError(f"{key!r}: not a config field (choose from {', '.join(k for k in defaults if k != 'name')})")
    current = defaults[key]
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
