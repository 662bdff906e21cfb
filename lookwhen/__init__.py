"""lookwhen: the thin model layer over ``lookwhen_kernels``: the LookWhen
selector-extractor model, the dense baseline it is measured against, video
input, checkpoints and the ``lookwhen`` command.

Subpackages, each importing only those before it: ``models`` (the networks,
presets, ``build_model``), ``data`` (video decoding, datasets, synthetic
clips), ``io`` (checkpoints, weight files, atomic writes), ``training``
(engine, losses, teachers, pre-training, fine-tuning, evaluation,
embedding) and ``cli`` (the command: parsing and printing). The flat layout's
module paths (``lookwhen.video``, ``lookwhen.model``, ...) still import, with a
``FutureWarning`` (``lookwhen.moved``)."""
from lookwhen import moved
from lookwhen.models import (
    PRESETS,
    DenseBaseline,
    LookWhen,
    LookWhenOutput,
    ModelConfig,
    build_model,
    count_flops,
    get_config,
    prepack_linears,
)

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
