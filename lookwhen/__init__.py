"""lookwhen: the thin model layer over ``lookwhen_kernels``: the LookWhen
selector-extractor model, the dense baseline it is measured against, video
input, checkpoints and the ``lookwhen`` command.

Subpackages, each importing only those before it: ``models`` (the networks,
presets, ``build_model``), ``data`` (video decoding, datasets, synthetic
clips), ``io`` (checkpoints, weight files, atomic writes), ``training``
(engine, losses, teachers, pre-training, fine-tuning, evaluation,
embedding) and ``cli`` (the command: parsing and printing). The flat layout's
module paths (``lookwhen.video``, ``lookwhen.model``, ...) still import, with a
``FutureWarning`` (``lookwhen.moved``).

The public names below are imported on first use (PEP 562), so that
``import lookwhen`` (and ``lookwhen --help``) does not pay for torch, timm and
the kernels until a model is wanted."""
import importlib

from lookwhen import moved

moved.install()

__all__ = [
    "PRESETS",
    "ModelConfig",
    "get_config",
    "build_model",
    "LookWhen",
    "LookWhenOutput",
    "DenseBaseline",
    "count_flops",
    "prepack_linears",
]

_SUBPACKAGES = ("cli", "data", "io", "models", "training")


def __getattr__(name):
    if name in __all__:
        value = getattr(importlib.import_module("lookwhen.models"), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"lookwhen.{name}")
    else:
        raise AttributeError(f"module 'lookwhen' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_SUBPACKAGES))
