"""Compiling the native CPU backend (``csrc/`` through ``CMakeLists.txt``),
shared by ``setup.py`` at install time and by ``python -m
lookwhen_kernels.native --build``, which compiles for the torch running now
when it is not the release the install compiled against (a torch pinned or
capped below the one pip put in its build environment).

Standard library only: ``setup.py`` loads this file by path inside pip's build
environment, where the package's own dependencies are not installed."""
import os
import shutil
import subprocess
import sys
from typing import Optional


# The vector instruction sets a portable build compiles the kernels for, as
# ATen's own CPU kernels are (``torch.backends.cpu.get_cpu_capability()``
# says which of them ATen runs): "" is the portable library every build has.
VECTOR_VARIANTS = ("", "avx2", "avx512")


def library_name(torch_version: str, variant: str = "") -> str:
    """A library compiled against one torch release does not load (or worse,
    misbehaves) under another, so each build is named for its release, and
    environments with different releases can share one editable checkout.
    ``variant``: one of :data:`VECTOR_VARIANTS`."""
    return f"_native-torch{torch_version}{'-' + variant if variant else ''}.so"


def build(source_dir: str, torch_prefix: str, torch_version: str, destination: str, arch: str = "") -> str:
    """Configure and build the library against the torch whose CMake package
    is under ``torch_prefix``; copy it into ``destination`` under
    :func:`library_name`, with the vector variants CMake built for this
    machine's architecture beside it; return the portable library's path. Raises ``RuntimeError`` saying why
    it could not be built."""
    cmake = shutil.which("cmake")
    if cmake is None:
        raise RuntimeError("no cmake on PATH (`pip install cmake ninja` provides it)")
    if not os.path.exists(os.path.join(source_dir, "CMakeLists.txt")):
        raise RuntimeError(f"no CMakeLists.txt in {source_dir}: building needs the package's source tree")
    # One build folder per torch release and target: CMake caches where it
    # found torch and what the target CPU can do.
    build_dir = os.path.join(source_dir, "build", f"native-torch-{torch_version}-{arch or 'portable'}")
    # CMake's cache also holds the paths of the torch, compiler and Ninja it
    # found; pip's isolated build environments are deleted after each
    # install, so a cache from another environment is thrown away, not reused.
    ninja = shutil.which("ninja")
    environment = "\n".join([torch_prefix, cmake, ninja or ""])
    stamp = os.path.join(build_dir, "lookwhen-environment.txt")
    if os.path.isdir(build_dir) and _read(stamp) != environment:
        shutil.rmtree(build_dir)
    os.makedirs(build_dir, exist_ok=True)
    with open(stamp, "w") as file:
        file.write(environment)
    configure = [cmake, "-S", source_dir, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={torch_prefix}", f"-DLOOKWHEN_NATIVE_ARCH={arch}"]
    if ninja and not os.path.exists(os.path.join(build_dir, "CMakeCache.txt")):
        configure += ["-G", "Ninja"]
    # Two translation units per library: more jobs would not help. The
    # portable library first, and it must build; a vector variant that does
    # not (a compiler or torch headers without that instruction set) is left
    # out, and its machines load the next narrower one.
    build_target = [cmake, "--build", build_dir, "--parallel", "2", "--target"]
    for step in (configure, [*build_target, "lookwhen_native"]):
        try:
            subprocess.run(step, check=True)
        except (OSError, subprocess.CalledProcessError) as error:
            raise RuntimeError(f"the CMake build failed ({error})") from error
    for variant in VECTOR_VARIANTS[1:]:
        if _cache_says(build_dir, f"LOOKWHEN_VARIANT_{variant.upper()}"):
            result = subprocess.run([*build_target, f"lookwhen_native_{variant}"])
            if result.returncode != 0:
                print(f"lookwhen_kernels native CPU backend: the {variant} variant did not build and is left "
                      "out; machines with it load the next narrower library", file=sys.stderr)
    os.makedirs(destination, exist_ok=True)
    for variant in VECTOR_VARIANTS:
        built = os.path.join(build_dir, f"_native{'-' + variant if variant else ''}.so")
        library = os.path.join(destination, library_name(torch_version, variant))
        if os.path.exists(built):
            # A new file moved into place: writing over a library that a
            # running process has mapped would change the code under it.
            partial = f"{library}.{os.getpid()}.partial"
            shutil.copyfile(built, partial)
            os.replace(partial, library)
        elif os.path.exists(library):
            # Left from an earlier build with other flags (-march): stale.
            os.remove(library)
    return os.path.join(destination, library_name(torch_version))


def _cache_says(build_dir: str, name: str) -> bool:
    """Whether CMake's cache in ``build_dir`` holds ``name`` set to ON."""
    return f"{name}:INTERNAL=ON" in (_read(os.path.join(build_dir, "CMakeCache.txt")) or "")


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as file:
            return file.read()
    except OSError:
        return None
