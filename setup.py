"""Packaging. ``pip install lookwhen-kernels`` gives the ops (torch and triton
alone); the extras add the model layer, video input, training, the benchmark
and the test suite.

Installing also compiles the optional native CPU backend (``csrc/``, through
``CMakeLists.txt``) against the torch the package will run with: the
environment's own torch when it has one, otherwise the torch that
``pyproject.toml`` puts in pip's build environment, which is the release pip
then installs beside the package. CMake and Ninja come from the build
requirements; a C++ compiler must be on the machine. Without one, or if the
build fails, installation goes on and the CPU ops run their PyTorch reference
(``python -m lookwhen_kernels.native`` says which). The library's name holds
the torch release it was built for; it is not loaded under another.

Environment: ``LOOKWHEN_NATIVE_BUILD=0`` skips the build;
``LOOKWHEN_NATIVE_ARCH=native`` (or any ``-march`` value, e.g. ``x86-64-v3``)
compiles for that CPU instead of the portable default, so a wheel built with
the default runs on any machine of the same architecture."""
import importlib.util
import os
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_native_build():
    # By path: importing the package would import torch and triton, which
    # pip's build environment does not have.
    spec = importlib.util.spec_from_file_location("native_build", os.path.join(HERE, "lookwhen_kernels", "native_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


native_build = _load_native_build()


def _torch_of_target():
    """``(cmake prefix, version)`` of the torch the package will be loaded
    into, or ``None``. pip builds in an isolated environment (the default
    without ``--no-build-isolation``) whose path overlay hides the target
    environment: that environment is asked first, without the overlay, and
    the build environment's torch serves only where the target has none yet
    (a fresh environment, where pip installs that same release next)."""
    query = [sys.executable, "-c", "import torch, torch.utils; print(torch.utils.cmake_prefix_path); print(torch.__version__)"]
    bare = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    for env in (bare, None):
        result = subprocess.run(query, env=env, capture_output=True, text=True)
        if result.returncode == 0:
            prefix, version = result.stdout.split()
            return prefix, version
    return None


class CMakeExtension(Extension):
    """The native library: built by CMake, not by setuptools' compiler."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self):
        for ext in self.extensions:
            self._build(ext)

    def _build(self, ext: CMakeExtension) -> None:
        if os.environ.get("LOOKWHEN_NATIVE_BUILD", "1") in ("0", ""):
            self._skip("skipped (LOOKWHEN_NATIVE_BUILD=0)")
            return
        torch = _torch_of_target()
        if torch is None:
            self._skip("not built: torch is not installed for this interpreter")
            return
        prefix, torch_version = torch
        try:
            native_build.build(HERE, prefix, torch_version, os.path.dirname(self.get_ext_fullpath(ext.name)),
                               arch=os.environ.get("LOOKWHEN_NATIVE_ARCH", ""))
        except RuntimeError as error:
            self._skip(f"not built: {error}")

    @staticmethod
    def _skip(why: str) -> None:
        print(f"lookwhen_kernels native CPU backend {why}; the CPU ops will run their PyTorch reference",
              file=sys.stderr)


MODEL = ["timm>=1.0", "safetensors>=0.4", "numpy>=1.24", "einops>=0.7"]
VIDEO = ["decord2>=3.0", "av>=12.0", "pillow>=9.0", "numpy>=1.24"]
TRAIN = [*MODEL, "tqdm>=4.60", "matplotlib>=3.7"]
BENCH = [*MODEL, "tqdm>=4.60", "matplotlib>=3.7", "pytest-benchmark>=4.0"]
TENSORBOARD = ["tensorboard>=2.14"]

setup(
    name="lookwhen-kernels",
    version="0.1.0",
    description="Fused Triton kernels and a thin model layer for token-selection video transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[*find_packages(include=["lookwhen_kernels*", "lookwhen", "lookwhen.*"]), "lookwhen_bench",
              "lookwhen_bench.experiments"],
    # The benchmark lives in bench/ (``python -m bench`` from a checkout) and
    # installs under a name of ours.
    package_dir={"lookwhen_bench": "bench"},
    ext_modules=[CMakeExtension("lookwhen_kernels._native")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        # The lowest pair the version matrix (noxfile.py, docs/versions.md) runs.
        "torch>=2.11",
        "triton>=3.6",
    ],
    extras_require={
        "model": MODEL,
        "video": VIDEO,
        "train": TRAIN,
        "tensorboard": TENSORBOARD,
        "bench": BENCH,
        "test": sorted({*TRAIN, *VIDEO, *BENCH, *TENSORBOARD, "pytest>=7.4", "hypothesis>=6.80"}),
        "xformers": ["xformers>=0.0.28"],
        "flash-attn": ["flash-attn>=2.6"],
    },
    entry_points={
        "console_scripts": [
            "lookwhen=lookwhen.cli:main",
            "lookwhen-bench=lookwhen_bench.__main__:main",
        ]
    },
)
