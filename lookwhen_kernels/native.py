"""The native CPU backend: C++ kernels from ``csrc/`` (built by
``CMakeLists.txt`` into ``lookwhen_kernels/_native-torch<release>.so`` when
the package is installed on a machine with a C++ compiler, against the torch
it will run with), registered as ``torch.ops.lookwhen_native.<op>``.

Optional: without the library every CPU op runs its PyTorch reference, and
the first CPU op to do so says once (a warning) that the backend is not built.
``LOOKWHEN_NATIVE=0`` turns the backend off at run time (silently: that is a
choice, not a missing build). :func:`status` says which case holds; ``python
-m lookwhen_kernels.native`` prints it, and ``python -m lookwhen_kernels.native
--build`` compiles the library for the torch running now (from a source
checkout, with CMake and a C++ compiler) when the install compiled it against
another release.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import warnings
from typing import Optional

import torch

from .native_build import build, library_name

# ATen's CPU capability -> the library variants that can run on it, best
# first (an AVX512 machine runs AVX2 code too).
_VARIANTS_FOR = {"AVX512": ("avx512", "avx2"), "AVX2": ("avx2",)}
_BUILD_NAME = re.compile(r"_native-torch(.+?)(?:-(?:avx2|avx512))?\.so$")

_HERE = os.path.dirname(os.path.abspath(__file__))
_state = {"loaded": None, "status": None, "warned": False}


def _load() -> bool:
    if _state["loaded"] is not None:
        return _state["loaded"]
    loaded, status = False, None
    if os.environ.get("LOOKWHEN_NATIVE", "1") in ("0", ""):
        status = "disabled (LOOKWHEN_NATIVE=0): CPU ops run their PyTorch reference"
    else:
        # setup.py names each build for its torch release (and vector
        # instruction set: the one ATen's kernels use here, which
        # ATEN_CPU_CAPABILITY=default makes the portable one); a library built
        # by hand with CMake (``_native.so``) is loaded on trust.
        # LOOKWHEN_NATIVE_LIBRARY: a build of another kind (AddressSanitizer).
        variants = _VARIANTS_FOR.get(torch.backends.cpu.get_cpu_capability(), ())
        candidates = [os.environ.get("LOOKWHEN_NATIVE_LIBRARY", ""),
                      *(os.path.join(_HERE, library_name(torch.__version__, v)) for v in variants),
                      os.path.join(_HERE, library_name(torch.__version__)), os.path.join(_HERE, "_native.so")]
        found = [path for path in candidates if os.path.exists(path)]
        others = sorted(glob.glob(os.path.join(_HERE, "_native-torch*.so")))
        if found:
            try:
                torch.ops.load_library(found[0])
                loaded, status = True, f"built: {found[0]}"
            except (OSError, RuntimeError) as error:
                status = f"not loadable ({found[0]}: {error}): CPU ops run their PyTorch reference"
        elif others:
            releases = ", ".join(dict.fromkeys(_BUILD_NAME.search(os.path.basename(path)).group(1) for path in others))
            status = (f"built for torch {releases}, not the torch {torch.__version__} running: CPU ops run their "
                      "PyTorch reference (`python -m lookwhen_kernels.native --build` builds it for this torch)")
        else:
            status = ("not built: CPU ops run their PyTorch reference (reinstall with a C++ compiler, "
                      "`pip install -e .`, to build csrc/)")
    _state["loaded"], _state["status"] = loaded, status
    return loaded


def available() -> bool:
    """Whether the native kernels are built, loaded and enabled."""
    return _load()


def status() -> str:
    """One line: built (and from where), not built, or disabled."""
    _load()
    return _state["status"]


def kernel(name: str) -> Optional[object]:
    """``torch.ops.lookwhen_native.<name>``, or ``None`` when the backend is
    not available (the first such call from a CPU op warns once unless the
    backend was disabled on purpose)."""
    if _load():
        return getattr(torch.ops.lookwhen_native, name)
    if not _state["warned"] and not _state["status"].startswith("disabled"):
        _state["warned"] = True
        warnings.warn(f"lookwhen_kernels native CPU backend {_state['status']}", RuntimeWarning, stacklevel=4)
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lookwhen_kernels.native",
                                     description="Say whether the native CPU backend is in use, or build it.")
    parser.add_argument("--build", action="store_true",
                        help="compile csrc/ against the torch running now (needs the source tree, CMake, a C++ compiler)")
    parser.add_argument("--arch", default=os.environ.get("LOOKWHEN_NATIVE_ARCH", ""),
                        help="-march value (e.g. native, x86-64-v3); default: portable")
    args = parser.parse_args(argv)
    if args.build:
        try:
            library = build(os.path.dirname(_HERE), torch.utils.cmake_prefix_path, torch.__version__, _HERE,
                            arch=args.arch)
        except RuntimeError as error:
            print(f"lookwhen_kernels native CPU backend not built: {error}", file=sys.stderr)
            return 1
        print(f"built {library}")
        _state["loaded"] = None
    print(f"lookwhen_kernels native CPU backend: {status()}")
    return 0 if available() or not args.build else 1


if __name__ == "__main__":
    sys.exit(main())
