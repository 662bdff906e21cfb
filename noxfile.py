"""The version matrix: the suite and the compile report on every torch/Triton
pair the package declares, each in its own environment.

    python -m pip install nox
    nox                                   # every pair: tests, then inspect
    nox -s "tests(2.11.0)"               # one pair's suite
    nox -s tests -- tests/test_topk_tokens.py -x   # arguments after -- go to pytest
    nox -s asan                           # the native kernels under AddressSanitizer

CI runs the suite on one pair only (``.ci/run``); docs/versions.md holds the
table this gives. The lowest pair here is ``install_requires``' floor.
"""
import os

import nox

# torch, torchvision, triton. 2.11 + 3.6 is the GPU machine's image.
PAIRS = [
    ("2.11.0", "0.26.0", "3.6.0"),
    ("2.14.1", "0.29.1", "3.8.0"),
    ("2.15.0", "0.29.2", "3.9.0"),
]
IDS = [torch for torch, _, _ in PAIRS]
# Triton's interpreter before 3.8 converts one-element arrays to Python ints,
# which NumPy 2.4 refuses: every kernel loop over a runtime bound fails there.
INTERPRETER_NEEDS = {"3.6.0": ["numpy<2.4"]}

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests", "inspect"]


def _install(session, torch, torchvision, triton):
    """The pair, then the package built against it (no build isolation: the
    native library must be compiled for this environment's torch, and
    editable installs of several environments coexist, each loading the
    library named for its own release)."""
    pins = [f"torch=={torch}", f"triton=={triton}"]
    # Where the registry has no torchvision for a new torch yet, pip picks
    # whichever release the pins allow.
    if torchvision:
        pins.append(f"torchvision=={torchvision}")
    pins += INTERPRETER_NEEDS.get(triton, [])
    session.install("setuptools>=64", "wheel", "cmake>=3.18", "ninja", *pins)
    session.install("--no-build-isolation", "-e", ".[test]", *pins)
    session.run("python", "-m", "lookwhen_kernels.native")


@nox.session
@nox.parametrize("torch,torchvision,triton", PAIRS, ids=IDS)
def tests(session, torch, torchvision, triton):
    _install(session, torch, torchvision, triton)
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
@nox.parametrize("torch,torchvision,triton", PAIRS, ids=IDS)
def inspect(session, torch, torchvision, triton):
    _install(session, torch, torchvision, triton)
    session.run("python", "-m", "lookwhen_kernels.inspect", "--json", f"docs/results/inspect-triton-{triton}.json",
                env={"TRITON_INTERPRET": "0"})


# The native backend's tests and every op test on its backend, which include
# the hostile calls of tests/test_native.py.
ASAN_TESTS = ["tests/test_native.py", "tests/test_topk_tokens.py", "tests/test_gather_patch_embed.py",
              "tests/test_score_tokens.py", "tests/test_nn_uniqueness.py", "tests/test_frame_normalize.py"]


@nox.session
def asan(session):
    """The native library built with AddressSanitizer (CMake's
    LOOKWHEN_ASAN), loaded through LOOKWHEN_NATIVE_LIBRARY with the
    sanitizer's runtime preloaded (before libstdc++, whose exceptions it
    intercepts); any out-of-bounds access aborts the run with a report."""
    torch, torchvision, triton = PAIRS[1]
    _install(session, torch, torchvision, triton)
    prefix = session.run("python", "-c", "import torch; print(torch.utils.cmake_prefix_path)", silent=True).strip()
    session.run("cmake", "-S", ".", "-B", "build/asan", "-G", "Ninja", f"-DCMAKE_PREFIX_PATH={prefix}",
                "-DLOOKWHEN_ASAN=ON", external=True)
    session.run("cmake", "--build", "build/asan", external=True)
    runtime = [session.run("gcc", f"-print-file-name={name}", silent=True, external=True).strip()
               for name in ("libasan.so", "libstdc++.so")]
    session.run("python", "-m", "pytest", "-q", "-k", "not triton", *ASAN_TESTS, *session.posargs,
                env={"LD_PRELOAD": " ".join(runtime), "ASAN_OPTIONS": "detect_leaks=0",
                     "LOOKWHEN_NATIVE_LIBRARY": os.path.abspath("build/asan/_native.so")})
