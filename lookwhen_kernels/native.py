"""The native CPU backend: C++ kernels from ``csrc/`` (built by
``CMakeLists.txt`` into ``lookwhen_kernels/_native-torch<release>.so`` when
the package is installed on a machine with a C++ compiler, against the torch
it will run with), registered as ``torch.ops.lookwhen_native.<op>``.

Optional: without the library every CPU op runs its PyTorch reference, and
the first CPU op to do so says once (a warning) that the backend is not built.
``LOOKWHEN_NATIVE=0`` turns the backend off at run time (silently: that is a
choice, not a missing build). :func:`status` says which case holds; ``python
-m lookwhen_kernels.native`` prints it.
"""
from __future__ import annotations

import glob
import os
import warnings
from typing import Optional

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_state = {"loaded": None, "status": None, "warned": False}


def _load() -> bool:
    if _state["loaded"] is not None:
        return _state["loaded"]
    loaded, status = False, None
    if os.environ.get("LOOKWHEN_NATIVE", "1") in ("0", ""):
        status = "disabled (LOOKWHEN_NATIVE=0): CPU ops run their PyTorch reference"
    else:
        # setup.py names each build for its torch release; a library built by
        # hand with CMake (``_native.so``) is loaded on trust.
        candidates = [os.path.join(_HERE, f"_native-torch{torch.__version__}.so"), os.path.join(_HERE, "_native.so")]
        found = [path for path in candidates if os.path.exists(path)]
        others = sorted(glob.glob(os.path.join(_HERE, "_native-torch*.so")))
        if found:
            try:
                torch.ops.load_library(found[0])
                loaded, status = True, f"built: {found[0]}"
            except (OSError, RuntimeError) as error:
                status = f"not loadable ({found[0]}: {error}): CPU ops run their PyTorch reference"
        elif others:
            releases = ", ".join(os.path.basename(path)[len("_native-torch"):-len(".so")] for path in others)
            status = (f"built for torch {releases}, not the torch {torch.__version__} running: CPU ops run their "
                      "PyTorch reference (reinstall the package to build it for this torch)")
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


if __name__ == "__main__":
    print(f"lookwhen_kernels native CPU backend: {status()}")
