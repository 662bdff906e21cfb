"""Test helpers shared by the op tests: the tolerance rule, random varlen
batches and poisoned outputs.

The tolerance rule is FlashAttention's: a kernel may be at most ``factor``
times as far from the float64 oracle as the same-precision PyTorch reference
is, plus a small absolute floor (so exact-in-every-precision results do not
demand bit equality).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

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
    """``|actual - oracle| <= factor * |reference - oracle| + floor``, in max norm."""
    if floor is None:
        floor = DEFAULT_FLOOR.get(reference_same_precision.dtype, 1e-5)
    kernel_err = max_abs_error(actual, oracle)
    reference_err = max_abs_error(reference_same_precision, oracle)
    bound = factor * reference_err + floor
    if not kernel_err <= bound:
        raise AssertionError(
            f"{name}: kernel error {kernel_err:.3e} exceeds {factor} x reference error "
            f"{reference_err:.3e} + {floor:.1e} = {bound:.3e}"
        )


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

