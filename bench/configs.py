"""Model shapes the benchmarks run at: presets of ``lookwhen.config`` with
``KEY=VALUE`` overrides from the command line."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Dict, List, Sequence

import torch

from bench import BenchError
from lookwhen.config import PRESETS, ModelConfig, get_config

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(device: torch.device, dtype: torch.dtype):
    """How the models run in fp16/bf16: under autocast, as the model layer
    supports it (weights stay fp32; one context around all timed calls keeps
    autocast's cache of cast weights warm). fp32 runs plain."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


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
        raise BenchError(f"{key}={text}: expected {_KIND[type(current)]}") from None


def parse_overrides(items: Sequence[str]) -> Dict[str, object]:
    """``["depth=2", "frames=4"]`` -> typed config overrides."""
    defaults = dataclasses.asdict(PRESETS["lookwhen-b16"])
    out: Dict[str, object] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BenchError(f"{item!r}: expected KEY=VALUE")
        if key not in defaults or key == "name":
            raise BenchError(f"{key!r}: not a config field (choose from {', '.join(k for k in defaults if k != 'name')})")
        out[key] = _coerce(key, value, defaults[key])
    return out


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
