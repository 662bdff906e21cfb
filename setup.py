"""Packaging. ``pip install lookwhen-kernels`` gives the ops (torch and triton
alone); the extras add the model layer, video input, training, the benchmark
and the test suite. Building also compiles the optional native CPU backend
(``csrc/``, through ``CMakeLists.txt``) when CMake and a C++ compiler are at
hand; without them, or if the build fails, installation goes on and the CPU
ops run their PyTorch reference (``python -m lookwhen_kernels.native`` says
which). ``LOOKWHEN_NATIVE_BUILD=0`` skips the build."""
import os
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def _torch_cmake_prefix():
    """Torch's CMake package of the environment being installed into. pip
    builds in an isolated environment without torch (the default without
    ``--no-build-isolation``), so the interpreter is asked again without the
    isolation's path overlay: the torch the library must match is the one it
    will be loaded into."""
    try:
        import torch

        return torch.utils.cmake_prefix_path
    except ImportError:
        pass
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    query = [sys.executable, "-c", "import torch.utils; print(torch.utils.cmake_prefix_path)"]
    result = subprocess.run(query, env=env, capture_output=True, text=True)
    return result.stdout.strip() or None if result.returncode == 0 else None


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
        prefix = _torch_cmake_prefix()
        if prefix is None:
            self._skip("not built: torch is not installed for this interpreter")
            return
        build_dir = os.path.join(HERE, "build", "native")
        configure = [cmake, "-S", HERE, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_PREFIX_PATH={prefix}"]
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
        target = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(os.path.join(build_dir, "_native.so"), target)

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
        # torch.library.triton_op / wrap_triton arrived in 2.6.
        "torch>=2.6",
        "triton>=3.2",
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
