"""CPU inference: linear layers through oneDNN with their weights packed once.

On the CPUs we measure on, ATen's float32 ``linear`` (MKL's sgemm) repacks the
weight matrix on every call and, on AMD EPYC, runs 20-50 % below oneDNN's
matrix product with a weight laid out in advance; the loss is largest for the
few-hundred-row products of a sparse extractor. :func:`prepack_linears`
switches a model's ``nn.Linear`` layers to :class:`PrepackedLinear`, which
keeps the same parameters (state dicts, names and optimisers are unaffected)
and takes the oneDNN path only where it computes the same function:

* float32 CPU inputs and weights, outside autocast;
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

__all__ = ["PrepackedLinear", "onednn_available", "prepack_linears"]


def onednn_available() -> bool:
    """Whether this PyTorch build has the oneDNN packed linear."""
    mkldnn = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(mkldnn, "_reorder_linear_weight")
        and hasattr(mkldnn, "_linear_pointwise")
    )


class PrepackedLinear(nn.Linear):
    """``nn.Linear`` whose eager CPU float32 inference runs oneDNN's product
    with the weight packed on first use (see the module docstring)."""

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

    def _fast_path(self, x: torch.Tensor) -> bool:
        weight = self.weight
        return (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and weight.dtype == torch.float32
            and weight.device.type == "cpu"
            and (self.bias is None or self.bias.dtype == torch.float32)
            and x.numel() > 0
            and not torch.is_autocast_enabled("cpu")
            and untracked_eager(x, weight, self.bias)
        )

    def _packed_weight(self) -> torch.Tensor:
        key = tensor_state(self.weight)
        if self._packed is None or self._packed[0] != key:
            with torch.no_grad():
                self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None))
        return self._packed[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fast_path(x):
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.detach()
        rows = x.reshape(-1, self.in_features)
        out = torch.ops.mkldnn._linear_pointwise(rows, self._packed_weight(), bias, "none", [], "")
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
