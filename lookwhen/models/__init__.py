"""The models: LookWhen (selector + extractor), the dense baseline and the
other baselines it is measured against, their presets, FLOP counting and
weight mappings. ``build_model`` turns a preset or config into a model.

The names are imported from their modules on first use (PEP 562): the
networks import timm and the kernels, which a caller that wants only the
presets (the command's ``--help``) should not wait for."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    import torch

    from lookwhen.models.baseline import DenseBaseline
    from lookwhen.models.config import PRESETS, ModelConfig, get_config
    from lookwhen.models.cpu_inference import prepack_linears
    from lookwhen.models.flops import count_flops
    from lookwhen.models.lookwhen import LookWhen, LookWhenOutput

_LAZY = {
    "DenseBaseline": "lookwhen.models.baseline",
    "PRESETS": "lookwhen.models.config",
    "ModelConfig": "lookwhen.models.config",
    "get_config": "lookwhen.models.config",
    "prepack_linears": "lookwhen.models.cpu_inference",
    "count_flops": "lookwhen.models.flops",
    "LookWhen": "lookwhen.models.lookwhen",
    "LookWhenOutput": "lookwhen.models.lookwhen",
}

__all__ = sorted([*_LAZY, "build_model"])


def build_model(name_or_config: Union[str, "ModelConfig"] = "lookwhen-b16", **overrides) -> "torch.nn.Module":
    """A randomly initialised ``LookWhen`` or ``DenseBaseline``. The weights
    depend only on the config (its ``seed``), not on the global RNG, which is
    left untouched."""
    import torch

    from lookwhen.models.baseline import DenseBaseline
    from lookwhen.models.config import get_config
    from lookwhen.models.lookwhen import LookWhen

    config = get_config(name_or_config, **overrides)
    cls = LookWhen if config.kind == "lookwhen" else DenseBaseline
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return cls(config)


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lookwhen.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
