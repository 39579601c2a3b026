"""Build script for the native extension ``packdit._C``.

Package metadata lives in pyproject.toml; this file only adds the CMake-built
extension. Environment variables:

  PACKDIT_SKIP_EXT=1          pure-Python install, no extension
  PACKDIT_NO_CUDA=1           build the C++ part only, even if nvcc is found
  PACKDIT_CUDA_ARCHS="80;90"  CUDA architectures (default "80;90")
  MAX_JOBS=N                  parallel compile jobs (else
                              CMAKE_BUILD_PARALLEL_LEVEL, else os.cpu_count())
  CMAKE_ARGS="..."            extra arguments for the CMake configure step
"""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _tool(module: str, attr: str, exe: str) -> str:
    """Path of a build tool, preferring the PyPI package (cmake, ninja) that
    the build environment provides over whatever is first on PATH."""
    try:
        mod = __import__(module)
        candidate = Path(getattr(mod, attr)) / exe
        if candidate.is_file():
            return str(candidate)
    except (ImportError, AttributeError):
        pass
    found = shutil.which(exe)
    if found is None:
        raise RuntimeError(f"packdit: '{exe}' not found; install it (pip install {module})")
    return found


def _nvcc_hint() -> list[str]:
    """CMake looks for nvcc on PATH (or $CUDACXX); also try $CUDA_HOME, $CUDA_PATH and
    /usr/local/cuda like torch.utils.cpp_extension does."""
    if os.environ.get("CUDACXX") or shutil.which("nvcc"):
        return []
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return [f"-DCMAKE_CUDA_COMPILER={Path(root) / 'bin' / 'nvcc'}"]
    return []


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path = ROOT):
        super().__init__(name, sources=[])
        self.sourcedir = os.fspath(Path(sourcedir).resolve())


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11

        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        ext_path.parent.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        suffix = ext_path.name[len(ext.name.rpartition(".")[2]):]

        cmake = _tool("cmake", "CMAKE_BIN_DIR", "cmake")
        ninja = _tool("ninja", "BIN_DIR", "ninja")
        args = [
            "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={ext_path.parent}",
            f"-DPACKDIT_EXT_SUFFIX={suffix}",
            f"-DPACKDIT_WITH_CUDA={'OFF' if _env_flag('PACKDIT_NO_CUDA') else 'ON'}",
        ]
        if not _env_flag("PACKDIT_NO_CUDA"):
            args += _nvcc_hint()
        archs = os.environ.get("PACKDIT_CUDA_ARCHS", "").strip()
        if archs:
            args.append(f"-DPACKDIT_CUDA_ARCHS={archs}")
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))

        build_args = ["--build", ".", "--target", "_C"]
        if "MAX_JOBS" in os.environ:
            build_args += ["-j", os.environ["MAX_JOBS"]]
        elif "CMAKE_BUILD_PARALLEL_LEVEL" not in os.environ:
            build_args += ["-j", str(os.cpu_count() or 1)]

        subprocess.run([cmake, ext.sourcedir, *args], cwd=build_dir, check=True)
        subprocess.run([cmake, *build_args], cwd=build_dir, check=True)
        if not ext_path.is_file():
            raise RuntimeError(f"packdit: CMake did not produce {ext_path}")


ext_modules = [] if _env_flag("PACKDIT_SKIP_EXT") else [CMakeExtension("packdit._C")]

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
