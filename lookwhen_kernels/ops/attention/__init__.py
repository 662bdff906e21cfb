"""``varlen_attention``: FlashAttention-2 over packed variable-length
sequences (the design: :mod:`lookwhen_kernels.ops.attention.op`), one job
per file:

- ``configs``: tile configurations and tile widths.
- ``scores``: the Triton helpers every kernel shares (row loads, the score
  modifiers, the key range a window keeps).
- ``forward``, ``backward``: the kernels.
- ``launch``: from tensors to kernel launches (layouts, grids, autotuning).
- ``cpu``: the CPU path, opaque ops over :mod:`lookwhen_kernels.reference`.
- ``op``: the registered ops, autograd, FLOP formulas and the public
  functions.
- ``specs``: the static GPU report's specs, derived from the kernels' own
  parameter lists.
"""
from lookwhen_kernels.ops.attention.op import (
    attention_flops,
    block_diagonal_attention,
    dense_attention,
    varlen_attention,
)
from lookwhen_kernels.ops.attention.specs import compile_specs

__all__ = ["attention_flops", "block_diagonal_attention", "compile_specs", "dense_attention", "varlen_attention"]
