"""The models: LookWhen (selector + extractor), the dense baseline and the
other baselines it is measured against, their presets, FLOP counting and
weight mappings. ``build_model`` turns a preset or config into a model."""
from __future__ import annotations

from typing import Union

import torch

from lookwhen.models.baseline import DenseBaseline
from lookwhen.models.config import PRESETS, ModelConfig, get_config
from lookwhen.models.cpu_inference import prepack_linears
from lookwhen.models.flops import count_flops
from lookwhen.models.lookwhen import LookWhen, LookWhenOutput


def build_model(name_or_config: Union[str, ModelConfig] = "lookwhen-b16", **overrides) -> torch.nn.Module:
    """A randomly initialised ``LookWhen`` or ``DenseBaseline``. The weights
    depend only on the config (its ``seed``), not on the global RNG, which is
    left untouched."""
    config = get_config(name_or_config, **overrides)
    cls = LookWhen if config.kind == "lookwhen" else DenseBaseline
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return cls(config)
