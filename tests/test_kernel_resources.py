"""Every Triton kernel compiles for sm_90 (H100, H200) on this machine, GPU or not, through
benchmarks/kernel_resources.py: the kernels CI runs under the interpreter are also accepted by
the GPU compiler, in both Sinkhorn regimes, with float32, bfloat16 and float64 inputs and both
gradient modes, and ptxas reports their registers and spills. The committed report is its
JSON's rendering."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import kernel_resources
from mlot_kernels.ops import sinkhorn_triton, topk_probs_triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(ROOT, "benchmarks", "results", "sm90-kernel-resources")


@pytest.fixture(scope="module")
def quick_resources(tmp_path_factory):
    out = tmp_path_factory.mktemp("resources") / "resources.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.kernel_resources", "--quick",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-5000:]
    with open(out) as f:
        return json.load(f)


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90(quick_resources):
    kernels = {name for module in (sinkhorn_triton, topk_probs_triton) for name in vars(module)
               if name.endswith("_kernel")}
    rows = quick_resources["rows"]
    assert {row["kernel"] for row in rows} == kernels
    for row in rows:
        assert 0 < row["registers"] <= 255, row
        assert min(row["spill_stores"], row["spill_loads"], row["stack"]) >= 0, row
    specialisations = " ".join(row["specialisation"] for row in rows)
    for wanted in ("in fp32", "in bf16", "in fp64", "DETACH=True", "DETACH=False", "XA=0", "XA=1",
                   "STD_SCALE=True", "STD_SCALE=False"):
        assert wanted in specialisations


def test_committed_report_is_rendered_from_its_json():
    with open(COMMITTED + ".json") as f:
        result = json.load(f)
    with open(COMMITTED + ".md") as f:
        assert f.read() == kernel_resources.render(result)
    assert result["arch"] == 90 and not result["quick"]
