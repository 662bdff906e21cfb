"""Tests run the Triton kernels on CPU through Triton's interpreter.

The variable must be set before the first ``triton.jit`` decorator runs (it
decides at decoration time whether a kernel is compiled or interpreted), so it
is set here, at collection, before any test module imports the package.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Fresh random inputs every run, but a printed seed reproduces a failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"torch seed {seed}")  # shown with the output of a failing test
    yield seed
