"""The two ways of building the kernels: CMakeLists.txt, and setup.py's compiler check."""

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Run in a fresh interpreter with MLOT_KERNELS_LIBRARY set; argv[1] is the built library.
CHECK_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch
    import mlot_kernels

    lib = sys.argv[1]
    assert os.path.samefile(mlot_kernels.ops._library.path, lib), (mlot_kernels.ops._library.path, lib)

    x = torch.randn(3, 9, 7, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 6, 7, dtype=torch.float64, requires_grad=True)
    x_lengths = torch.tensor([9, 4, 0])
    y_lengths = torch.tensor([6, 6, 2])
    weights = torch.rand(3, dtype=torch.float64)
    options = dict(temperature=1.5, p=1, n_iters=15, epsilon=0.1)

    results = []
    for fn in (mlot_kernels.sinkhorn_loss, mlot_kernels.ops.reference.sinkhorn_loss):
        loss = fn(x, y, x_lengths, y_lengths, **options)
        grads = torch.autograd.grad((loss * weights).sum(), (x, y))
        results.append((loss.detach(), *grads))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    print("OK")
    """
)


def _run(cmd, **kwargs):
    """subprocess.run(check=True) whose failure shows the command's output."""
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, **kwargs)
    except subprocess.CalledProcessError as e:
        pytest.fail(f"{' '.join(map(str, cmd))} exited with {e.returncode}\n"
                    f"--- stdout ---\n{e.stdout}\n--- stderr ---\n{e.stderr}", pytrace=False)


@pytest.mark.slow
def test_cmake_library_loads_and_matches_reference(tmp_path):
    """The CMake build of csrc/ loads through MLOT_KERNELS_LIBRARY and matches the reference."""
    for tool in ("cmake", "ninja"):
        assert shutil.which(tool), f"{tool} is not on PATH: it is needed to build CMakeLists.txt"
    build = tmp_path / "build"
    _run(["cmake", "-S", str(ROOT), "-B", str(build), "-G", "Ninja",
          "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
         timeout=600)
    _run(["cmake", "--build", str(build)], timeout=1200)
    lib = build / "libmlot_kernels.so"
    assert lib.is_file(), f"the CMake build made no {lib}: {sorted(p.name for p in build.iterdir())}"

    env = dict(os.environ, MLOT_KERNELS_LIBRARY=str(lib))
    result = _run([sys.executable, "-c", CHECK_SCRIPT, str(lib)], cwd=ROOT, env=env, timeout=600)
    assert "OK" in result.stdout, result.stdout + result.stderr


def _build_tree():
    """Paths and modification times of everything under the repository's build/."""
    build = ROOT / "build"
    return {p: p.stat().st_mtime_ns for p in build.rglob("*")} if build.exists() else {}


def test_install_without_compiler_names_what_to_install():
    """Without a C++ compiler setup.py stops at once, saying which compiler to install."""
    before = _build_tree()
    env = dict(os.environ, CXX="no-such-compiler-mlot")
    result = subprocess.run([sys.executable, "setup.py", "build_ext"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    output = result.stderr + result.stdout
    assert result.returncode != 0, output
    assert "no C++ compiler found" in output, output
    assert "g++" in output, output
    assert _build_tree() == before, "setup.py wrote build artifacts before its compiler check"
