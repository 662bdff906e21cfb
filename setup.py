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
import os
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


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
        cmake = shutil.which("cmake")
        if cmake is None:
            self._skip("not built: no cmake on PATH")
            return
        torch = _torch_of_target()
        if torch is None:
            self._skip("not built: torch is not installed for this interpreter")
            return
        prefix, torch_version = torch
        arch = os.environ.get("LOOKWHEN_NATIVE_ARCH", "")
        # One build folder per torch release and target: CMake caches where it
        # found torch and what the target CPU can do.
        build_dir = os.path.join(HERE, "build", f"native-torch-{torch_version}-{arch or 'portable'}")
        configure = [cmake, "-S", HERE, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_PREFIX_PATH={prefix}",
                     f"-DLOOKWHEN_NATIVE_ARCH={arch}"]
        if shutil.which("ninja") and not os.path.exists(os.path.join(build_dir, "CMakeCache.txt")):
            configure += ["-G", "Ninja"]
        # Two translation units: more jobs would not help.
        steps = [configure, [cmake, "--build", build_dir, "--parallel", "2"]]
        try:
            for step in steps:
                subprocess.run(step, check=True)
        except (OSError, subprocess.CalledProcessError) as error:
            self._skip(f"not built: the CMake build failed ({error})")
            return
        # Named for the torch release it was compiled against: a library built
        # for one release does not load (or worse, misbehaves) under another,
        # and environments with different torch releases can share an
        # editable checkout, each loading its own build.
        folder = os.path.dirname(self.get_ext_fullpath(ext.name))
        os.makedirs(folder, exist_ok=True)
        shutil.copyfile(os.path.join(build_dir, "_native.so"), os.path.join(folder, f"_native-torch{torch_version}.so"))

    @staticmethod
    def _skip(why: str) -> None:
        print(f"lookwhen_kernels native CPU backend {why}; the CPU ops will run their PyTorch reference",
              file=sys.stderr)


MODEL = ["timm>=1.0", "safetensors>=0.4", "numpy>=1.24", "einops>=0.7"]
VIDEO = ["decord2>=3.0", "av>=12.0", "pillow>=9.0", "numpy>=1.24"]
TRAIN = [*MODEL, "tqdm>=4.60", "matplotlib>=3.7"]
BENCH = [*MODEL, "tqdm>=4.60", "matplotlib>=3.7", "pytest-benchmark>=4.0"]

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
        "bench": BENCH,
        "test": sorted({*TRAIN, *VIDEO, *BENCH, "pytest>=7.4", "hypothesis>=6.80"}),
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
