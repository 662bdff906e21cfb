"""CPU inference: linear layers through oneDNN with their weights packed once.

On the CPUs we measure on, ATen's float32 ``linear`` (MKL's sgemm) repacks the
weight matrix on every call and, on AMD EPYC, runs 20-50 % below oneDNN's
matrix product with a weight laid out in advance; the loss is largest for the
few-hundred-row products of a sparse extractor. Under bfloat16 autocast it is
worse: autocast re-casts every float32 weight to bfloat16 on every call (its
weight cache does not apply under ``inference_mode``), about a fifth of
LookWhen's bfloat16 forward on a 2-core Xeon with AMX. :func:`prepack_linears`
switches a model's ``nn.Linear`` layers to :class:`PrepackedLinear`, which
keeps the same parameters (state dicts, names and optimisers are unaffected)
and takes the oneDNN path only where it computes the same function:

* CPU inputs and weights, float32 or bfloat16 (one dtype), outside autocast;
  or under CPU autocast to bfloat16, where the product runs in bfloat16 (as
  autocast's ``linear`` does) from a bfloat16 copy of the weight packed once;
* no gradient to track (``torch.no_grad`` / ``torch.inference_mode``, or
  nothing requires grad): the packed product has no autograd formula;
* eager execution: ``torch.compile``, ``FlopCounterMode`` and fake tensors
  see the plain ``F.linear`` (so FLOP counts do not change).

Everywhere else it is ``nn.Linear``. The packed copy (the weight's size
again) is rebuilt when the weight changes in place, moves or is replaced
(except a weight created under ``inference_mode`` and changed in place under
it: such tensors carry no version counter).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from lookwhen.models.layers import tensor_state, untracked_eager

__all__ = ["PrepackedLinear", "bf16_matrix_units", "onednn_available", "prepack_linears"]


# The CPU features that multiply bfloat16 natively (oneDNN uses them), as
# /proc/cpuinfo names them, with PyTorch's own probe where it has one.
_BF16_UNITS = (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported"))


def bf16_matrix_units() -> Tuple[str, ...]:
    """The CPU's bfloat16 matrix units found (``amx_bf16``, ``avx512_bf16``):
    where there are any, bfloat16 products run several times faster than
    float32 ones (about 8x on AMX); where there are none, oneDNN emulates
    them, slower than float32."""
    try:
        with open("/proc/cpuinfo") as file:
            flags = next((line.split(":", 1)[1].split() for line in file if line.startswith("flags")), [])
    except OSError:
        flags = []
    return tuple(name for name, probe in _BF16_UNITS
                 if name in flags or getattr(torch.cpu, probe, lambda: False)())


def onednn_available() -> bool:
    """Whether this PyTorch build has the oneDNN packed linear."""
    mkldnn = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(mkldnn, "_reorder_linear_weight")
        and hasattr(mkldnn, "_linear_pointwise")
    )


class PrepackedLinear(nn.Linear):
    """``nn.Linear`` whose eager CPU float32 or bfloat16 inference runs
    oneDNN's product with the weight packed on first use (see the module
    docstring)."""

    _packed: Optional[Tuple[tuple, torch.Tensor]] = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "PrepackedLinear":
        """A layer holding ``linear``'s own parameter objects."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.train(linear.training)
        return layer

    def _product_dtype(self, x: torch.Tensor) -> Optional[torch.dtype]:
        """The dtype the packed product runs in, or ``None`` where
        ``F.linear`` must run."""
        weight, bias = self.weight, self.bias
        if not (x.device.type == "cpu" and weight.device.type == "cpu" and x.numel() > 0
                and untracked_eager(x, weight, bias)):
            return None
        if torch.is_autocast_enabled("cpu"):
            # Autocast casts float32 and bfloat16 operands (not float64) to its dtype.
            cast = {torch.float32, torch.bfloat16}
            operands = {x.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
            eligible = torch.get_autocast_dtype("cpu") == torch.bfloat16 and operands <= cast
            return torch.bfloat16 if eligible else None
        same = x.dtype == weight.dtype and (bias is None or bias.dtype == x.dtype)
        return x.dtype if same and x.dtype in (torch.float32, torch.bfloat16) else None

    def _packed_weight(self, dtype: torch.dtype) -> torch.Tensor:
        key = (tensor_state(self.weight), dtype)
        if self._packed is None or self._packed[0] != key:
            with torch.no_grad():
                weight = self.weight.detach().to(dtype)
                self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(weight, None))
        return self._packed[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._product_dtype(x)
        if dtype is None:
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.detach().to(dtype)
        rows = x.reshape(-1, self.in_features).to(dtype)
        out = torch.ops.mkldnn._linear_pointwise(rows, self._packed_weight(dtype), bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        self._packed = None
        return super()._apply(fn, recurse)


def prepack_linears(model: nn.Module) -> nn.Module:
    """Turn every ``nn.Linear`` inside ``model`` (not subclasses, which may
    compute something else) into a :class:`PrepackedLinear` sharing its
    parameters; returns ``model``. A no-op where oneDNN is missing."""
    if not onednn_available():
        return model
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PrepackedLinear.from_linear(child))
    return model
