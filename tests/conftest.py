"""Tests run the Triton kernels on CPU through Triton's interpreter.

The variable must be set before the first ``triton.jit`` decorator runs (it
decides at decoration time whether a kernel is compiled or interpreted), so it
is set here, at collection, before any test module imports the package.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs an NVIDIA GPU (bf16 and real-kernel timing)")
    config.addinivalue_line("markers", "slow: long-running, still part of the default suite")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Fresh random inputs every run, but a printed seed reproduces a failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"torch seed {seed}")  # shown with the output of a failing test
    yield seed
