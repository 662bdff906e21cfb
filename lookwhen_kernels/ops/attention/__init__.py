"""The pieces of ``varlen_attention`` (the op itself, its registration,
autograd and public API: :mod:`lookwhen_kernels.ops.varlen_attention`), one
job per file:

- ``configs``: tile configurations and tile widths.
- ``scores``: the Triton helpers every kernel shares (row loads, the score
  modifiers, the key range a window keeps).
- ``forward``, ``backward``: the kernels.
- ``launch``: from tensors to kernel launches (layouts, grids, autotuning).
- ``cpu``: the CPU path, opaque ops over :mod:`lookwhen_kernels.reference`.
- ``report``: the static GPU report's specs, derived from the kernels' own
  parameter lists.
"""
