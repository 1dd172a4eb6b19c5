"""Builds the C++ kernels under csrc/ into mlot_kernels/_C (ninja, through torch.utils.cpp_extension).

The same sources build with CMake into a library for torch.ops.load_library (see CMakeLists.txt).
"""

import glob
import os
import platform
import shutil
import sys

from setuptools import setup

CXX = os.environ.get("CXX", "c++")
if shutil.which(CXX) is None:
    sys.exit(
        f"mlot-kernels: no C++ compiler found (looked for {CXX!r}, the CXX variable or 'c++'). "
        "The kernels are compiled at install: install a C++17 compiler, for example "
        "`apt-get install g++` (Debian/Ubuntu), `dnf install gcc-c++` (Fedora) or "
        "`xcode-select --install` (macOS), or point CXX at one, then install again."
    )

from torch.utils.cpp_extension import BuildExtension, CppExtension  # noqa: E402

# Flags shared with CMakeLists.txt. -march=native: the library is built on the machine that
# runs it. -fopenmp: at::parallel_for is inline OpenMP in torch's CPU builds (without the
# flag it runs serially), and it turns on the `#pragma omp simd` loops; the library then
# needs libgomp.so.1, which torch has already loaded. -fno-trapping-math: without it GCC does
# not if-convert the selects in exp_simd (csrc/vec_math.h), so no exp loop vectorises ("control
# flow in loop"); the kernels never enable floating-point traps. -fno-math-errno: std::sqrt and
# std::log in loops need not set errno. Neither changes an IEEE result.
# -mprefer-vector-width=512 (x86-64 only) lets AVX-512 machines use their full width.
CXX_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-std=c++17"]
if platform.machine() in ("x86_64", "AMD64"):
    CXX_FLAGS.append("-mprefer-vector-width=512")

setup(
    ext_modules=[
        CppExtension(
            "mlot_kernels._C",
            sorted(glob.glob("csrc/*.cpp")),
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
