"""``topk_tokens``: per-clip top-K token selection, optionally on coarse
scores bilinearly upsampled to the fine token grid; a fixed K
(:func:`topk_tokens`) or one K per clip (:func:`topk_tokens_budgets`,
packed).

One program owns one clip and holds all of its (fine) scores in registers: it
reads the coarse scores, upsamples them on the fly, selects and writes the
position-sorted ids, so no score ever goes back to memory between the steps.
Selection is exact and sort-free (:mod:`lookwhen_kernels.ops.selection.keys`):
order keys, the K-th largest built bit by bit, ties to the lowest id, and a
prefix sum over the selection mask gives every chosen id its output slot, so
the output comes out in ascending token order without a sort.

One job per file: ``kernels`` (Triton), ``launch`` (tensors to launches),
``op`` (registration and the public functions), ``specs`` (the static GPU
report's configurations).
"""
from lookwhen_kernels.ops.topk_tokens.launch import select_into
from lookwhen_kernels.ops.topk_tokens.op import topk_tokens, topk_tokens_budgets
from lookwhen_kernels.ops.topk_tokens.specs import compile_specs

__all__ = ["compile_specs", "select_into", "topk_tokens", "topk_tokens_budgets"]
