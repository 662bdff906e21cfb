"""Model shapes the benchmarks run at: presets of ``lookwhen.models.config`` with
``KEY=VALUE`` overrides from the command line."""
from __future__ import annotations

import contextlib
from typing import Dict, List, Sequence

import torch

from . import BenchError
from lookwhen.cli.args import parse_overrides as parse_config_overrides
from lookwhen.models.config import ModelConfig, get_config

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(device: torch.device, dtype: torch.dtype):
    """How the models run in fp16/bf16: under autocast, as the model layer
    supports it (weights stay fp32; one context around all timed calls keeps
    autocast's cache of cast weights warm). fp32 runs plain."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def parse_overrides(items: Sequence[str]) -> Dict[str, object]:
    """``["depth=2", "frames=4"]`` -> typed config overrides."""
    try:
        return parse_config_overrides(items)
    except ValueError as exc:
        raise BenchError(str(exc)) from None


def resolve(preset: str, overrides: Dict[str, object]) -> ModelConfig:
    try:
        return get_config(preset, **overrides)
    except ValueError as exc:
        raise BenchError(str(exc)) from None


def parse_shapes(items: Sequence[str], common: Dict[str, object]) -> List[ModelConfig]:
    """``PRESET`` or ``PRESET:key=value,key=value`` items; the per-item
    overrides apply on top of the common ``--set`` ones."""
    configs = []
    for item in items:
        preset, _, rest = item.partition(":")
        own = parse_overrides([kv for kv in rest.split(",") if kv]) if rest else {}
        configs.append(resolve(preset, {**common, **own}))
    return configs
