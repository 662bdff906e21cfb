"""FLOP counting with ``torch.utils.flop_counter`` (no hand-written totals).

The counter counts a multiply-add as two FLOPs; video papers report GMACs
(one per multiply-add), :func:`gmacs` converts.

The ``lookwhen_kernels`` ops register their own formulas. PyTorch's counter
has none for the CPU flash-attention kernels that
``scaled_dot_product_attention`` dispatches to on CPU, so the dense baseline's
attention would count as free; they are registered here with PyTorch's own
SDPA formulas.
"""
from __future__ import annotations

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_CPU_SDPA = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}
for _op, _formula in _CPU_SDPA.items():
    if _op not in flop_counter.flop_registry:
        register_flop_formula(_op)(_formula)


def count_flops(model: torch.nn.Module, clip: torch.Tensor, **forward_kwargs) -> int:
    """FLOPs of one forward of ``model(clip, **forward_kwargs)`` (no grad)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(clip, **forward_kwargs)
    return counter.get_total_flops()


def gmacs(flops: float) -> float:
    """GMACs (billions of multiply-adds, the papers' unit) of a FLOP count
    from :func:`count_flops`, which counts each multiply-add as two FLOPs."""
    return flops / 2e9

