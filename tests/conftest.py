"""Tests run the Triton kernels on CPU through Triton's interpreter.

The variable must be set before the first ``triton.jit`` decorator runs (it
decides at decoration time whether a kernel is compiled or interpreted), so it
is set here, at collection, before any test module imports the package.

Random inputs come from a fixed seed per test (the same failures on every
run); ``LOOKWHEN_TEST_SEED=random`` draws a fresh one per test and any integer
uses that seed for every test. The seed is printed with the output of a failing test.
"""
import os
import zlib

# ``LOOKWHEN_TEST_DEVICE=cuda`` (set by .ci/gpu) leaves the kernels compiled
# for the GPU, for the tests marked ``cuda``.
if os.environ.get("LOOKWHEN_TEST_DEVICE", "cpu") != "cuda":
    os.environ["TRITON_INTERPRET"] = "1"

import numpy  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402


def _major_minor(version: str):
    return tuple(int(part) for part in version.split(".")[:2])


def pytest_configure(config):
    # Otherwise every kernel loop over a runtime bound fails with "only
    # 0-dimensional arrays can be converted to Python scalars", hundreds of times.
    if (os.environ.get("TRITON_INTERPRET") == "1" and _major_minor(triton.__version__) < (3, 8)
            and _major_minor(numpy.__version__) >= (2, 4)):
        pytest.exit(f"Triton {triton.__version__}'s interpreter cannot run with NumPy {numpy.__version__}: "
                    "install 'numpy<2.4' (or Triton 3.8 or later)", returncode=4)
    if _major_minor(triton.__version__) < (3, 8):
        # The same conversion, deprecated since NumPy 1.25: one warning per
        # kernel loop (about 12,000 a run) that says nothing about our code.
        config.addinivalue_line("filterwarnings", "ignore:Conversion of an array with ndim > 0 to a scalar"
                                ":DeprecationWarning:triton.runtime.interpreter")

DEFAULT_SEED = 0


def _seed_for(test_id: str) -> int:
    setting = os.environ.get("LOOKWHEN_TEST_SEED", "")
    if setting == "random":
        return int.from_bytes(os.urandom(4), "little")
    if setting:
        return int(setting)
    # A per-test default, so tests do not share one random stream.
    return (DEFAULT_SEED + zlib.crc32(test_id.encode())) % 2**32


@pytest.fixture(autouse=True)
def _seed(request):
    seed = _seed_for(request.node.nodeid)
    torch.manual_seed(seed)
    print(f"torch seed {seed} (LOOKWHEN_TEST_SEED={seed} reproduces this test)")
    yield seed


@pytest.fixture
def pytorch_cpu_path(monkeypatch):
    """The CPU ops' own path (native kernels or the PyTorch reference)
    instead of the Triton interpreter: for model-level tests (training, the
    CLI), where the interpreter would only make them slow."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture
def poisoned_allocations():
    """``torch.empty`` hands out NaN-filled memory (integers: their largest
    value) in deterministic mode, so an output element a kernel never writes
    shows up. Op test modules use it for every test."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)
    torch.utils.deterministic.fill_uninitialized_memory = previous_fill


@pytest.fixture(params=["triton", "native"])
def cpu_backend(request):
    """Runs a test once per CPU backend of the ops: the Triton kernels (in the
    interpreter, the default here) and the native C++ kernels (skipped when
    the library is not built or ``LOOKWHEN_NATIVE=0``). Op test modules use
    it for every test."""
    from lookwhen_kernels import native
    from lookwhen_kernels import set_cpu_backend

    if request.param == "native" and not native.available():
        pytest.skip(f"native CPU backend {native.status()}")
    previous = set_cpu_backend("native" if request.param == "native" else None)
    yield request.param
    set_cpu_backend(previous)


def pytest_collection_modifyitems(config, items):
    """Tests of the reference alone (``test_reference_*``) do not depend on
    the CPU backend: their native-backend copies are deselected."""
    duplicates = [item for item in items if item.name.startswith("test_reference")
                  and getattr(item, "callspec", None) is not None and item.callspec.params.get("cpu_backend") == "native"]
    if duplicates:
        config.hook.pytest_deselected(items=duplicates)
        dropped = set(map(id, duplicates))
        items[:] = [item for item in items if id(item) not in dropped]
