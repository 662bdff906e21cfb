"""What models cost per clip, side by side (``lookwhen info``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from lookwhen.models import build_model
from lookwhen.models.config import BASELINE_PRESET
from lookwhen.models.flops import count_flops, gmacs


@dataclass
class ModelCost:
    """One row of :func:`cost_table`: what a model costs per clip."""

    name: str
    parameters: str
    tokens_in: str
    tokens_kept: str
    flops: int

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    @property
    def gmacs(self) -> float:
        return gmacs(self.flops)


def _millions(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def cost_table(preset: str, keep_ratio: Optional[float] = None) -> List[ModelCost]:
    """Parameters, tokens and FLOPs per clip of ``preset`` (at
    ``keep_ratio``, default the config's) and of the dense baseline beside
    it, each randomly initialised and run once on a random clip."""
    generator = torch.Generator().manual_seed(0)
    names = [preset] + ([BASELINE_PRESET] if preset != BASELINE_PRESET else [])
    rows = []
    for name in names:
        model = build_model(name).eval()
        cfg = model.config
        clip = torch.randint(0, 256, (1, cfg.frames, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8,
                             generator=generator)
        if cfg.kind == "lookwhen":
            ratio = cfg.keep_ratio if keep_ratio is None else keep_ratio
            kept = cfg.tokens_kept(ratio)
            rows.append(ModelCost(
                name, f"{_millions(model):.1f}M (selector {_millions(model.selector):.1f}M, "
                      f"extractor {_millions(model.extractor):.1f}M)",
                f"{cfg.n_tokens} (selector {cfg.n_selector_tokens})", f"{kept} ({ratio:g}) + {cfg.n_context} context",
                count_flops(model, clip, keep_ratio=ratio)))
        else:
            rows.append(ModelCost(name, f"{_millions(model):.1f}M", f"{cfg.n_tokens} + CLS", "all",
                                  count_flops(model, clip)))
    return rows
