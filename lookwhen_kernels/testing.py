"""Test helpers shared by the op tests: the tolerance rule, random varlen
batches, poisoned outputs, the layouts PyTorch hands to an op, and a counter
of host reads.

The tolerance rule is FlashAttention's: a kernel may be at most ``factor``
times as far from the float64 oracle as the same-precision PyTorch reference
is, plus a small absolute floor (so exact-in-every-precision results do not
demand bit equality).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lookwhen_kernels.layout import cu_seqlens_from_lengths  # noqa: F401  (tests build batches with it)

DEFAULT_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    if actual.numel() == 0:
        return 0.0
    diff = (actual.double() - expected.double()).abs()
    # inf - inf is nan: equal infinities count as exact.
    same_inf = torch.isinf(actual.double()) & (actual.double() == expected.double())
    diff = torch.where(same_inf, torch.zeros_like(diff), diff)
    if torch.isnan(diff).any():
        return float("inf")
    return float(diff.max())


def assert_within_reference_error(
    actual: torch.Tensor,
    reference_same_precision: torch.Tensor,
    oracle: torch.Tensor,
    *,
    factor: float = 2.0,
    floor: Optional[float] = None,
    name: str = "output",
) -> None:
    """``|actual - oracle| <= factor * |reference - oracle| + floor``, in max
    norm; the default floor is the dtype's, times the oracle's magnitude."""
    if floor is None:
        floor = magnitude_floor(oracle, DEFAULT_FLOOR.get(reference_same_precision.dtype, 1e-5))
    kernel_err = max_abs_error(actual, oracle)
    reference_err = max_abs_error(reference_same_precision, oracle)
    bound = factor * reference_err + floor
    if not kernel_err <= bound:
        raise AssertionError(
            f"{name}: kernel error {kernel_err:.3e} exceeds {factor} x reference error "
            f"{reference_err:.3e} + {floor:.1e} = {bound:.3e}"
        )


def magnitude_floor(expected: torch.Tensor, floor: float) -> float:
    """An absolute floor scaled to the size of the values compared: a fixed
    1e-5 is below one ulp of fp32 values past 100, and loose for values near 0."""
    expected = expected.detach()
    finite = expected[torch.isfinite(expected)] if expected.numel() else expected
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    return floor * max(1.0, scale)


def poison_(tensor: torch.Tensor) -> torch.Tensor:
    """Fill with a value no correct kernel writes, so unwritten elements show."""
    if tensor.is_floating_point():
        return tensor.fill_(float("nan"))
    return tensor.fill_(torch.iinfo(tensor.dtype).min)


def assert_fully_written(tensor: torch.Tensor, name: str = "output") -> None:
    if tensor.is_floating_point():
        bad = torch.isnan(tensor)
    else:
        bad = tensor == torch.iinfo(tensor.dtype).min
    if bool(bad.any()):
        raise AssertionError(f"{name}: {int(bad.sum())} of {tensor.numel()} elements never written")


def random_lengths(
    batch: int,
    max_len: int,
    *,
    generator: Optional[torch.Generator] = None,
    include: Sequence[int] = (),
) -> list:
    """Random sequence lengths in ``[0, max_len]``; ``include`` forces some values in."""
    lengths = torch.randint(0, max_len + 1, (batch,), generator=generator).tolist()
    for slot, forced in enumerate(include[:batch]):
        lengths[slot] = int(forced)
    return lengths



def layout_variants(tensor: torch.Tensor, *, expand: bool = True) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(name, view)`` for the layouts PyTorch hands an op: a storage offset,
    every other element of a wider buffer, transposed storage (2-d and up),
    and with ``expand`` two stride-0 views, ``"expanded"`` (the first slice
    along dimension 0 broadcast, as autograd hands the gradient of a sum) and
    ``"broadcast"`` (the same along the last dimension). The expansions change
    the values; the others keep them. Compare an op on a view with the op on
    ``view.contiguous()``."""
    flat = torch.empty(tensor.numel() + 3, dtype=tensor.dtype)
    yield "offset", flat[3:].view(tensor.shape).copy_(tensor)
    if tensor.dim() and tensor.shape[-1] > 0:
        wide = torch.empty(*tensor.shape[:-1], 2 * tensor.shape[-1], dtype=tensor.dtype)
        view = wide[..., ::2]
        yield "strided", view.copy_(tensor)
    if tensor.dim() >= 2:
        yield "transposed", tensor.transpose(0, -1).contiguous().transpose(0, -1)
    if expand and tensor.dim() and tensor.shape[0] > 1:
        yield "expanded", tensor[:1].expand(tensor.shape)
    if expand and tensor.dim() > 1 and tensor.shape[-1] > 1:
        yield "broadcast", tensor[..., :1].expand(tensor.shape)


# Ops that read a tensor's values on the host (output sizes that depend on data included).
_READ_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique",
             "aten.unique", "aten.equal")


class _HostReads(TorchDispatchMode):
    """Sees every op below the Python API. Tensors that already live on the
    host (built from Python data, or copies read back) are tracked, so that
    working on them counts nothing: only the reads that would wait for a GPU
    do."""

    def __init__(self, reads: List[str]):
        super().__init__()
        self.reads = reads
        self.host = {}  # id -> tensor (held, so that ids stay unique)

    def is_host(self, tensor) -> bool:
        return id(tensor) in self.host

    def mark_host(self, tensors) -> None:
        for t in tensors if isinstance(tensors, (tuple, list)) else (tensors,):
            if isinstance(t, torch.Tensor):
                self.host[id(t)] = t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        out = func(*args, **kwargs)
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        on_host = bool(inputs) and all(self.is_host(t) for t in inputs)
        to_host = name.startswith("aten._to_copy") and kwargs.get("device") == torch.device("cpu")
        # A copy of host data stays host data here (on a GPU it could be
        # the copy to the device, which is then not read back by this code).
        if name.startswith("aten.lift_fresh") or on_host:
            self.mark_host(out)
        elif to_host:
            self.reads.append(f"{name} (to the host)")
            self.mark_host(out)
        elif name.startswith(_READ_OPS) and not on_host:
            self.reads.append(name)
        return out


@contextlib.contextmanager
def count_host_reads() -> Iterator[List[str]]:
    """Record every call that reads device data on the host (a sync on CUDA).
    On CPU every tensor counts as device data unless it was built from Python
    data or read back, so a CPU run counts what a GPU run would wait for.
    Seen: ``.item()``, ``bool()``/``int()``/``float()`` of a tensor,
    ``.tolist()``, ``.numpy()``, ``.cpu()``, ``.to("cpu")``, and the ops whose
    output size depends on data (``nonzero``, boolean indexing, ``unique``).
    Not seen: reads inside a registered op's implementation (the dispatch
    mode sees the op as one call) and host-to-device copies (none exist on
    CPU). Yields the list of recorded calls."""
    reads: List[str] = []
    mode = _HostReads(reads)
    patched = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "cpu")}

    def counting(name, original):
        # These read without dispatching an op on CPU.
        def method(self, *args, **kwargs):
            if not mode.is_host(self):
                reads.append(f"Tensor.{name}")
            return original(self, *args, **kwargs)
        return method

    for name, original in patched.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        with mode:
            yield reads
    finally:
        for name, original in patched.items():
            setattr(torch.Tensor, name, original)
