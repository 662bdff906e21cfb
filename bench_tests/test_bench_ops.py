"""pytest-benchmark suite of the ops at tiny CPU shapes (``pytest
bench_tests --benchmark-only``); separate from the test suite, which never
times.

Every case of ``python -m bench ops`` for a shrunken LookWhen and dense
baseline, each provider in each mode, grouped so that pytest-benchmark
compares the fused op with its alternatives side by side.
"""
import pytest
import torch

from bench.ops import cases_for, make_step
from lookwhen.models.config import get_config

TINY = dict(frames=2, depth=1, width=128, heads=2, pool_heads=2, selector_width=64, context_projection=True, selector_heads=2, score_hidden=64)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

PARAMS = [
    pytest.param(case, provider, mode, id=f"{name}-{case.kernel}-{provider}-{mode}-{case.label.replace(' ', '_')}")
    for name in ("lookwhen-b16", "internvideo2-b14")
    for case in cases_for(get_config(name, **TINY), batch=1, keep_ratio=0.1)
    for mode in case.modes
    for provider, fn in case.providers(DEVICE, torch.float32).items() if mode in case.provider_modes(fn)
]


@pytest.mark.parametrize("case, provider, mode", PARAMS)
def test_op(benchmark, case, provider, mode):
    benchmark.group = f"{case.kernel} {case.label} {mode}"
    benchmark(make_step(case, provider, mode, DEVICE, torch.float32, rotate=2))
