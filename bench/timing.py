"""Timing, peak memory and per-stage timing.

CPU: ``torch.utils.benchmark`` (its block-size estimate doubles as the
warm-up, it runs with the process's thread count, not its default of one);
calls of 50 ms and more (model forwards) are timed one by one.
CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs).
Every measured callable cycles through several inputs, so a run never sees the
previous run's data already in cache.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import itertools
import logging
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from lookwhen.data.video import native_stderr_silenced


@dataclass(frozen=True)
class Stats:
    """Seconds per call: median and the 20 % / 80 % quantiles of the samples."""

    median: float
    q20: float
    q80: float
    samples: int

    @classmethod
    def from_samples(cls, samples: Sequence[float]) -> "Stats":
        ordered = sorted(samples)
        return cls(statistics.median(ordered), _quantile(ordered, 0.2), _quantile(ordered, 0.8), len(ordered))

    def as_dict(self) -> Dict[str, float]:
        return {"median_s": self.median, "q20_s": self.q20, "q80_s": self.q80, "samples": self.samples}


def _quantile(ordered: Sequence[float], q: float) -> float:
    # Linear interpolation between order statistics (numpy's default rule).
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rotating(fn: Callable, inputs: Sequence[tuple]) -> Callable[[], object]:
    """A zero-argument step calling ``fn`` on the next input set each time."""
    cycle = itertools.cycle(inputs)
    return lambda: fn(*next(cycle))


# Calls at least this long (model forwards) are timed one by one on CPU.
LONG_CALL_S = 0.05


def sample(step: Callable[[], object], device: torch.device, *, min_run_time: float, min_samples: int = 3,
           expected: Optional[float] = None) -> List[float]:
    """Seconds per call of ``step``, one entry per measured block.

    ``expected`` (seconds per call, e.g. from an earlier measurement of the
    same step) saves the first untimed call, which otherwise warms up and
    tells how long a call takes so that slow calls still get ``min_samples``.
    """
    if device.type == "cuda":
        import triton.testing

        times_ms = triton.testing.do_bench(step, warmup=25, rep=max(1, int(min_run_time * 1000)), return_mode="all")
        return [t / 1000.0 for t in times_ms]
    # torch.utils.benchmark imports cpp_extension, which warns about a missing
    # CUDA toolkit on CPU-only machines; irrelevant to Python-level timing.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils.benchmark import Timer

    if expected is None:
        start = time.perf_counter()
        step()
        expected = time.perf_counter() - start
    if expected >= LONG_CALL_S:
        # blocked_autorange would spend one more call on its block-size
        # estimate and then time blocks of one call anyway.
        times = []
        for _ in range(max(min_samples, math.ceil(min_run_time / expected))):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return times
    # blocked_autorange's block-size estimate runs the step once more: the
    # warm-up of this measurement.
    timer = Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=max(min_run_time, min_samples * expected))
    return list(measurement.times)


# glibc's mallopt parameters.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def retain_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory in the process (as jemalloc
    and tcmalloc do, and as ``torch.backends.xeon.run_cpu`` arranges by
    preloading one of them). By default it hands large blocks back to the
    OS on free, and the next forward page-faults them in again: on this
    2-core VM that cost the dense baseline ~10 % and LookWhen ~20 % of their
    CPU time, as a sparse model allocates more temporaries per FLOP. False
    where the C library has no ``mallopt`` (not glibc)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # Older glibc caps the mmap threshold at 32 MiB; larger blocks then
    # still come from mmap.
    mmap_ok = any(mallopt(_M_MMAP_THRESHOLD, limit) for limit in (1 << 30, 32 << 20))
    return bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30)) and mmap_ok


def noise(a: Stats, b: Stats) -> float:
    """Relative difference of two medians of the same measurement."""
    return abs(a.median - b.median) / max(min(a.median, b.median), 1e-12)


def peak_memory(step: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by one call beyond what was allocated before it.

    CUDA: the caching allocator's peak counter. CPU: the profiler's memory
    events (each op's own allocations, the frees in between) summed in time
    order; it sees inside our custom ops, which run their CPU path as one op.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    # The profiler's backend logs its start and stop (and the missing GPU) to fd 2.
    with native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # An op's net self usage is its own allocations less the frees inside it
    # (its children's temporaries, say): allocations count from its start,
    # net frees from its end.
    events = sorted((e.time_range.start if e.self_cpu_memory_usage > 0 else e.time_range.end, e.self_cpu_memory_usage)
                    for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, change in events:
        live += change
        peak = max(peak, live)
    return peak


class StageTimer:
    """``stage_timer`` for the model's forward: accumulates wall time per
    stage name (CUDA-synchronised at the boundaries on a GPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: Dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
