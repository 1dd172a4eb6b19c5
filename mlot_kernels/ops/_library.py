"""Loads the compiled operator library, which registers the ``torch.ops.mlot`` operators.

By default that is ``mlot_kernels/_C``, compiled at install. The environment variable
``MLOT_KERNELS_LIBRARY`` names another build of the same sources instead (the CMake one).
"""

import importlib.util
import os

import torch

LIBRARY_ENV = "MLOT_KERNELS_LIBRARY"


def _library_path() -> str:
    override = os.environ.get(LIBRARY_ENV)
    if override:
        if not os.path.isfile(override):
            raise ImportError(f"mlot_kernels: {LIBRARY_ENV}={override!r} is not a file")
        return os.path.abspath(override)
    spec = importlib.util.find_spec("mlot_kernels._C")
    if spec is None or spec.origin is None:
        raise ImportError(
            "mlot_kernels: the compiled kernels (mlot_kernels/_C) are missing. They are built "
            "at install: with torch installed, run `pip install --no-build-isolation -e .` "
            "(needs a C++ compiler such as g++), or set "
            f"{LIBRARY_ENV} to the library that CMakeLists.txt builds."
        )
    return spec.origin


path = _library_path()
torch.ops.load_library(path)
