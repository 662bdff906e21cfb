"""Dispatch and input validation shared by every op.

Validation runs on the Python side before any launch so that a bad argument
fails with a ``ValueError`` naming it, instead of an illegal memory access or a
silently wrong result inside a kernel.

Two kinds of check (the host-sync policy): *structural* checks (type, dtype,
device, shape, strides) read only metadata and always run. *Value* checks
(index ranges, offsets, NaN scans) read tensor data back to the host, a
device sync on CUDA: they run when the op's ``validate`` argument is true (the
default) and never while torch.compile traces, where tensors have no data.
Hot paths (the LookWhen model) validate once at their boundary and pass
``validate=False``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


_DETERMINISTIC = os.environ.get("LOOKWHEN_DETERMINISTIC", "0") not in ("", "0")


def set_deterministic(enabled: bool) -> bool:
    """Deterministic mode: two runs on the same inputs give bitwise-equal
    outputs and gradients, across processes. Kernel configs are pinned
    (the first of each list, no autotuning, whose pick can differ between
    processes) and sums that would use atomic adds (the positional-embedding
    gradient of ``gather_patch_embed``) run as fixed-order GEMMs instead. Also
    on when ``LOOKWHEN_DETERMINISTIC=1`` at import or while
    ``torch.use_deterministic_algorithms(True)`` is in force. Returns the
    previous setting."""
    global _DETERMINISTIC
    previous, _DETERMINISTIC = _DETERMINISTIC, bool(enabled)
    return previous


def deterministic() -> bool:
    """Whether deterministic mode is on (see :func:`set_deterministic`)."""
    return _DETERMINISTIC or torch.are_deterministic_algorithms_enabled()


def interpret_mode() -> bool:
    """True when Triton runs kernels in its numpy interpreter (tests on CPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


CPU_BACKENDS = ("triton", "native", "reference")
_CPU_BACKEND: Optional[str] = None


def set_cpu_backend(name: Optional[str]) -> Optional[str]:
    """Force the path CPU tensors take: ``"triton"`` (the kernels, in the
    interpreter), ``"native"`` (the C++ kernels where an op has one, else the
    reference) or ``"reference"``; ``None`` restores the default (Triton under
    ``TRITON_INTERPRET=1``, else native when built, else the reference). The
    op tests run every case against both the Triton and the native kernels
    with it. Returns the previous setting."""
    global _CPU_BACKEND
    if name is not None and name not in CPU_BACKENDS:
        raise ValueError(f"name: expected one of {CPU_BACKENDS} or None, got {name!r}")
    previous, _CPU_BACKEND = _CPU_BACKEND, name
    return previous


def _tracing(tensor: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() or is_fake(tensor)


def use_triton(tensor: torch.Tensor) -> bool:
    """CUDA tensors take the kernels; CPU tensors only under the interpreter
    (or :func:`set_cpu_backend`'s ``"triton"``).

    While torch.compile traces (fake tensors), CPU stays on the reference: the
    interpreter needs real data and Inductor cannot build Triton kernels for CPU.
    """
    if tensor.is_cuda:
        return True
    if tensor.device.type != "cpu" or (_CPU_BACKEND or ("triton" if interpret_mode() else None)) != "triton":
        return False
    return not _tracing(tensor)


def native_kernel(name: str, tensor: torch.Tensor, handles: bool = True):
    """The native CPU kernel ``torch.ops.lookwhen_native.<name>`` for an op's
    CPU branch, or ``None`` where the reference runs: the library is not
    built or is disabled (``LOOKWHEN_NATIVE=0``), the reference backend is
    forced, torch.compile is tracing (the trace keeps the reference's ATen
    ops, which Inductor compiles), or the call uses a mode the native kernel
    does not have (``handles=False``: several scores per token)."""
    if not handles or tensor.device.type != "cpu" or _CPU_BACKEND == "reference" or _tracing(tensor):
        return None
    # Imported on first use: `python -m lookwhen_kernels.native` runs that
    # module as __main__, and runpy warns when importing the package has
    # already imported it.
    from lookwhen_kernels import native

    return native.kernel(name)


def cpu_dispatch(name: Optional[str], args: Sequence[Any], reference: Callable, *, handles: bool = True):
    """An op's CPU path on ``args`` (its registered op's arguments): the
    native kernel ``torch.ops.lookwhen_native.<name>`` where
    :func:`native_kernel` gives one, else ``reference(*args)``, the op's
    PyTorch reference. ``name=None``: the op has no native kernel."""
    kernel = None if name is None else native_kernel(name, args[0], handles)
    return (reference if kernel is None else kernel)(*args)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype PyTorch-side math runs in: float64 for float64 (the
    oracle), float32 for everything narrower."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def checks_values(validate: bool, tensor: torch.Tensor) -> bool:
    """Whether an op runs its value checks: when asked to and the data is real
    (not while torch.compile traces, not on fake tensors)."""
    return bool(validate) and not (torch.compiler.is_compiling() or is_fake(tensor))


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    tensor,
    *,
    ndim: Optional[int] = None,
    dtypes: Optional[Sequence[torch.dtype]] = None,
    device: Optional[torch.device] = None,
    contiguous: bool = False,
) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if ndim is not None and tensor.dim() != ndim:
        raise ValueError(
            f"{name}: expected a {ndim}-d tensor, got shape {tuple(tensor.shape)}"
        )
    if dtypes is not None and tensor.dtype not in dtypes:
        raise ValueError(f"{name}: expected dtype {_dtype_names(dtypes)}, got {tensor.dtype}")
    if device is not None and tensor.device != device:
        raise ValueError(
            f"{name}: expected a tensor on {device} (like the other inputs), got {tensor.device}"
        )
    if contiguous and not tensor.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (call .contiguous() first)")


def check_shape(name: str, tensor: torch.Tensor, expected: Sequence[Union[int, None]]) -> None:
    """``None`` in ``expected`` matches any size."""
    shape = tuple(tensor.shape)
    ok = len(shape) == len(expected) and all(
        e is None or e == s for e, s in zip(expected, shape)
    )
    if not ok:
        pretty = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name}: expected shape {pretty}, got {list(shape)}")


def check_cu_seqlens(
    name: str,
    cu_seqlens: torch.Tensor,
    *,
    batch: Optional[int] = None,
    total: Optional[int] = None,
    max_len: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Validate a packed-layout offset vector and return its lengths (on CPU).

    Reads the (small) tensor back to the host: callers that care about syncs
    validate once at the model boundary, not per layer (the structural part
    alone is :func:`check_offsets`).
    """
    check_offsets(name, cu_seqlens, batch=batch, device=device)
    host = cu_seqlens.detach().to("cpu", torch.int64)
    if int(host[0]) != 0:
        raise ValueError(f"{name}: must start at 0, got {int(host[0])}")
    lengths = host[1:] - host[:-1]
    if bool((lengths < 0).any()):
        raise ValueError(f"{name}: must be non-decreasing, got {host.tolist()}")
    if total is not None and int(host[-1]) != total:
        raise ValueError(
            f"{name}: last offset is {int(host[-1])} but the packed tensor has {total} rows"
        )
    if max_len is not None and lengths.numel() and int(lengths.max()) > max_len:
        raise ValueError(
            f"{name}: a sequence of length {int(lengths.max())} exceeds the limit {max_len}"
        )
    return lengths


def _int_range(low: Optional[int], high: Optional[int]) -> str:
    if high is not None:
        return f"an int in [{low}, {high}]"
    return {0: "a non-negative int", 1: "a positive int"}.get(low, f"an int >= {low}") if low is not None else "an int"


def check_int(name: str, value, low: Optional[int] = None, high: Optional[int] = None, *, note: str = "",
              types: Tuple[type, ...] = (Integral,)) -> int:
    """``value`` as an int in ``[low, high]`` (bools refused), else a
    ``ValueError`` naming ``name``, the range and ``note`` (what the value
    counts). ``types``: what passes as an int (``torch.SymInt`` too where
    torch.compile traces sizes); those are returned unchanged."""
    if isinstance(value, bool) or not isinstance(value, types) or (low is not None and value < low) or (
        high is not None and value > high
    ):
        raise ValueError(f"{name}: expected {_int_range(low, high)}{f' ({note})' if note else ''}, got {value!r}")
    return int(value) if isinstance(value, Integral) else value


# The intervals a float argument may be asked to lie in, and how an error says so.
REAL_RANGES = {
    "(0, 1]": (lambda v: 0 < v <= 1, "a float in (0, 1]"),
    "(0, inf)": (lambda v: 0 < v < math.inf, "a positive finite float"),
    "(0, inf]": (lambda v: v > 0, "a positive float"),
    "[0, inf)": (lambda v: 0 <= v < math.inf, "a finite float >= 0"),
}


def check_real(name: str, value, interval: str, *, note: str = "") -> float:
    """``value`` as a float in ``interval`` (a key of :data:`REAL_RANGES`;
    NaN lies in none), else a ``ValueError`` naming ``name``."""
    inside, expected = REAL_RANGES[interval]
    if isinstance(value, bool) or not isinstance(value, Real) or not inside(value):
        raise ValueError(f"{name}: expected {expected}{f' ({note})' if note else ''}, got {value!r}")
    return float(value)


INT32_MAX = 2**31 - 1


def check_int32(name: str, value: int, what: str) -> None:
    """Kernels index with int32 where a count fits it; past that they would
    wrap around silently, so the count is refused instead."""
    if value > INT32_MAX:
        raise ValueError(f"{name}: {what} is {value}, past the int32 offsets the kernels use ({INT32_MAX})")


def check_offsets(
    name: str, cu_seqlens: torch.Tensor, *, batch: Optional[int] = None, device: Optional[torch.device] = None,
) -> None:
    """The checks of an offset vector that read no data. Contiguity matters:
    kernels index ``cu_seqlens[b]`` as ``ptr + b``."""
    check_tensor(name, cu_seqlens, ndim=1, dtypes=(torch.int32,), device=device, contiguous=True)
    if cu_seqlens.numel() < 1:
        raise ValueError(f"{name}: expected at least one element (B+1 offsets)")
    if batch is not None and cu_seqlens.numel() != batch + 1:
        raise ValueError(
            f"{name}: expected {batch + 1} offsets for a batch of {batch}, got {cu_seqlens.numel()}"
        )


def check_indices(
    name: str,
    indices: torch.Tensor,
    n_tokens: int,
    *,
    device: Optional[torch.device] = None,
) -> None:
    """Token ids must be int32 and inside ``[0, n_tokens)``."""
    check_tensor(name, indices, dtypes=(torch.int32,), device=device, contiguous=True)
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= n_tokens:
            raise ValueError(
                f"{name}: token ids must lie in [0, {n_tokens}), got values in [{lo}, {hi}]"
            )


@triton.jit
def split_program_id(n_blocks):
    """``(block, rest)`` of a flat 1-d launch over ``n_blocks`` blocks per
    item: grid axes 1 and 2 hold at most 65,535 programs, so a batch (or
    batch x heads) of more items cannot sit on them. Blocks vary fastest, so
    the programs of one item still run side by side (sharing its data in L2)."""
    pid = tl.program_id(0)
    return pid % n_blocks, pid // n_blocks


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@dataclass(frozen=True)
class CompileSpec:
    """One kernel at one configuration it really launches with, for the static
    GPU report (``python -m lookwhen_kernels.inspect``).

    ``signature`` maps every argument name to a Triton type string (``"*fp16"``,
    ``"i32"``, ``"fp32"``, ``"constexpr"``); ``constexprs`` gives the values of
    the constexpr ones. ``tensor_cores`` marks the GEMM-shaped kernels that must
    use HGMMA on sm_90 and HMMA on sm_80; ``warpgroup_mma=False`` accepts HMMA
    on sm_90 too, for tiles under the warpgroup MMA's 64 rows. ``divisible_by_16`` names the integer
    arguments that are multiples of 16 at the real shapes (strides, D, H, W):
    Triton's launcher specialises on that at run time, so the report must too.
    """

    name: str
    fn: Any
    signature: Dict[str, str]
    constexprs: Dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    tensor_cores: bool = False
    warpgroup_mma: bool = True
    archs: Tuple[int, ...] = (90, 80)
    divisible_by_16: Tuple[str, ...] = ()


TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` for an input dtype: fp32 inputs promise
    fp32 products (TF32 would cost ~1e-3 relative error); ignored for 16-bit."""
    return "ieee" if dtype == torch.float32 else "tf32"


def wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)``, which lets torch.compile trace
    the launch, or the kernel itself where torch cannot wrap it: under
    Triton's interpreter before Triton 3.8, ``triton.jit`` returns an
    ``InterpretedFunction`` that torch before 2.14 refuses. Nothing traces
    the interpreter, so launching the kernel directly loses nothing."""
    if isinstance(kernel, (JITFunction, Autotuner)):
        return torch.library.wrap_triton(kernel)
    return kernel
