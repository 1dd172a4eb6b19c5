"""Every Triton kernel compiles for sm_90 (H100, H200) on this machine, GPU or not, through
benchmarks/kernel_resources.py: the kernels CI runs under the interpreter are also accepted by
the GPU compiler, in both Sinkhorn regimes, with float32, bfloat16 and float64 inputs and both
gradient modes, and ptxas reports their registers and spills. The SASS analysis finds the loops
of small kernels compiled here and counts what they hold; the model's arithmetic is checked on
hand-made counts; --sweep compiles and models the scaling form per warps and chunk rows. The
committed report is its JSON's rendering."""

import argparse
import inspect
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from benchmarks import kernel_resources
from mlot_kernels.ops import sinkhorn_triton, topk_probs_triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(ROOT, "benchmarks", "results", "sm90-kernel-resources")


def _compiler_env():
    return {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}


@pytest.fixture(scope="module")
def quick_resources(tmp_path_factory):
    out = tmp_path_factory.mktemp("resources") / "resources.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.kernel_resources", "--quick",
                           "--json", str(out)], cwd=ROOT, env=_compiler_env(),
                          capture_output=True, text=True)
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


def _loops_over_n_iters(kernel):
    """Whether the kernel's own body (not a helper's) has a for over range(... n_iters ...)."""
    return re.search(r"^\s+for \w+ in range\([^)]*\bn_iters\b", inspect.getsource(kernel.fn),
                     re.M) is not None


@pytest.mark.slow
def test_every_sinkhorn_row_has_counts_and_a_model(quick_resources):
    """Every Sinkhorn kernel's row has its launches' arguments, a main loop whose trips are
    known, counts per trip with exps (MUFU.EX2, or FP64 in float64), and a modelled time; a kernel that loops over n_iters
    itself has that loop as its main loop, run n_iters times (but with DETACH=True, which
    compiles the reverse sweep out)."""
    rows = [row for row in quick_resources["rows"] if row["kernel"] in vars(sinkhorn_triton)]
    assert rows
    for row in rows:
        kernel = getattr(sinkhorn_triton, row["kernel"])
        loops = quick_resources["sass"][row["sass"]]["loops"]
        assert loops and all(loop["range"] for loop in loops), row["kernel"]
        loop = row["main_loop"]
        assert loop["trips"] >= 1 and loop["cycles"] > 0, row
        # float64's exp is a DFMA polynomial, float32's MUFU.EX2
        exps = "fp64" if "DTYPE=f64" in row["specialisation"] else "mufu_ex2"
        assert loop["per_trip"]["instructions"] > 0 and loop["per_trip"].get(exps, 0) > 0, row
        assert loop["instructions_high"] >= loop["per_trip"]["instructions"]
        assert row["launches"] == sum(call["count"] for call in row["calls"]) >= 1
        for call in row["calls"]:
            assert call["model_programs"] >= 1 and call["args"]["K"] == 50, call
            assert 0 < call["model_us"] <= call["model_us_all_branches"], call
        if _loops_over_n_iters(kernel) and "DETACH=True" not in row["specialisation"]:
            assert "n_iters" in loop["range"], (row["kernel"], loop)
            assert loop["trips"] == row["calls"][0]["args"]["n_iters"]
    assert any(_loops_over_n_iters(getattr(sinkhorn_triton, row["kernel"])) for row in rows)
    for row in quick_resources["rows"]:
        assert row["calls"] and row["sass"] < len(quick_resources["sass"]), row


# Small kernels compiled in a subprocess (the interpreter that conftest.py chooses replaces
# triton.language for the whole process), their analyses read back as JSON.

def _exp_loop(x_ptr, out_ptr, n_iters, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    acc = tl.zeros([BLOCK], tl.float32)
    for t in range(n_iters):
        acc += tl.exp(x * t)
    tl.store(out_ptr + offs, acc)


def _branchy(x_ptr, out_ptr, n_iters, every, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    acc = tl.zeros([BLOCK], tl.float32)
    for t in range(n_iters):
        acc = acc * x + t
        if t % every == 0:
            acc = tl.exp(acc)
        else:
            acc = tl.log(acc)
    tl.store(out_ptr + offs, acc)


_PROBES = [("_exp_loop", 1024, 4), ("_exp_loop", 2048, 4), ("_exp_loop", 2048, 8),
           ("_branchy", 1024, 4)]


def _probe(path):
    """Compile the probe kernels for sm_90 (no interpreter) and write their analyses to path."""
    out = []
    for name, block, warps in _PROBES:
        kernel = triton.runtime.JITFunction(globals()[name])
        scalars = (("n_iters", "i32"),) + ((("every", "i32"),) if name == "_branchy" else ())
        signature = (("x_ptr", "*fp32"), ("out_ptr", "*fp32"), *scalars, ("BLOCK", "constexpr"))
        launch = kernel_resources.Launch(kernel, signature, (("BLOCK", block),), warps)
        _, cubin = kernel_resources._compile(launch, 90)
        out.append(kernel_resources.analyse_cubin(cubin))
    with open(path, "w") as f:
        json.dump(out, f)


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    out = tmp_path_factory.mktemp("probes") / "probes.json"
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from tests.test_kernel_resources import _probe; "
         "_probe(sys.argv[1])", str(out)], cwd=ROOT, env=_compiler_env(), capture_output=True,
        text=True)
    assert done.returncode == 0, done.stderr[-5000:]
    with open(out) as f:
        return dict(zip(_PROBES, json.load(f)))


def _for_line(fn):
    lines, first = inspect.getsourcelines(fn)
    return first + next(i for i, line in enumerate(lines) if line.lstrip().startswith("for "))


@pytest.mark.slow
def test_sass_loop_and_counts_of_an_exp_loop(probes):
    """One exp per element per trip: MUFU.EX2 per thread per trip = BLOCK / (32 x warps); the
    loop is found at its for, with its range; the loads and stores are outside it."""
    where = f"test_kernel_resources.py:{_for_line(_exp_loop)}"
    for (name, block, warps), analysis in probes.items():
        if name != "_exp_loop":
            continue
        (loop,) = analysis["loops"]
        assert (loop["where"], loop["range"], loop["parent"]) == (where, "range(n_iters)", None)
        assert kernel_resources.main_loop(analysis) == 0
        (body,) = loop["blocks"]
        assert body["counts"]["mufu_ex2"] == block // (32 * warps)
        assert body["counts"]["fp32"] >= body["counts"]["mufu_ex2"]
        assert not {"ldg", "stg", "ldl", "stl", "lds", "sts"} & body["counts"].keys()
        assert analysis["outside"]["ldg"] >= 1 and analysis["outside"]["stg"] >= 1
        names = dict(n_iters=7, BLOCK=block)
        assert kernel_resources.trips(loop["range"], names) == 7
        counts = kernel_resources.main_loop_counts(analysis, 0, names, warps)
        assert counts["per_trip"] == body["counts"] and counts["trips"] == 7
        model = kernel_resources.model_launch(analysis, names, warps, programs=1)
        cycles = (kernel_resources.model_cycles(analysis["outside"], warps)[0]
                  + 7 * kernel_resources.model_cycles(body["counts"], warps)[0])
        assert model["cycles"] == round(cycles) and model["waves"] == 1
        assert model["us"] == model["us_all_branches"] == round(cycles / 1755, 3)


@pytest.mark.slow
def test_sass_if_else_in_a_loop_is_two_paths(probes):
    """An if/else in the loop: two arms, one per trip. With `every` unknown each trip is a free
    choice: the cheapest path takes the exp arm, the dearest the log arm (libdevice's log is
    FFMAs), and the exp arm's 8 MUFU.EX2 per thread are on one of them only. With every = 3
    the test decides each trip: t % 3 == 0 on 4 of the 10 trips, the exp arm there."""
    analysis = probes[("_branchy", 1024, 4)]
    (loop,) = analysis["loops"]
    assert loop["var"] == "t" and len(loop["blocks"]) >= 3
    (choice,) = [b["if"] for b in loop["blocks"] if "if" in b]
    assert choice["at"] == f"test_kernel_resources.py:{_for_line(_branchy) + 2}"
    assert choice["test"] == "t % every == 0" and choice["then"] is not None
    names = dict(n_iters=10, BLOCK=1024)
    free = kernel_resources.loop_costs(analysis, names, 4)[0]
    low, high = free["low"], free["high"]
    assert low["counts"]["instructions"] < high["counts"]["instructions"]
    assert low["counts"].get("mufu_ex2", 0) == 8 and high["counts"].get("mufu_ex2", 0) == 0
    main = kernel_resources.main_loop_counts(analysis, 0, names, 4)
    assert main["per_trip"] == low["counts"]
    assert main["instructions_high"] == high["counts"]["instructions"]
    model = kernel_resources.model_launch(analysis, names, 4, programs=1)
    assert model["us"] < model["us_all_branches"]
    decided = kernel_resources.loop_costs(analysis, dict(names, every=3), 4)[0]
    for mode in ("low", "high"):
        assert decided[mode]["total"] == 4 * low["cycles"] + 6 * high["cycles"]
        assert decided[mode]["counts"] == high["counts"]  # the typical trip: the log arm


def test_model_arithmetic_on_hand_made_counts():
    """model_cycles: the largest pipe's time times the warps (at least 4 for the
    sub-partitions' pipes: issue, FP32, MUFU, FP64); model_launch: the code outside
    loops once, each loop's trips times its body (the cheapest or dearest path through a choice)
    and its nested loops, ⌈programs / 132⌉ waves at 1.755 GHz."""
    m = kernel_resources
    # per warp: issue 100/4 = 25, FP32 40*32/128 = 10, MUFU 10*32/16 = 20, shared 64*32/128 = 16,
    # memory 16*32/64 = 8 cycles
    counts = dict(instructions=100, fp32=40, mufu_ex2=10, lds_bytes=64, global_bytes=16)
    assert m.model_cycles(counts, 8) == (200, "issue")
    # 2 warps use 2 of the 4 sub-partitions: MUFU 20 x 4, not 20 x 2; shared memory is the SM's
    assert m.model_cycles(dict(instructions=40, mufu_ex2=6, mufu_other=4), 2) == (80, "mufu")
    assert m.model_cycles(dict(instructions=4, lds_bytes=64), 2) == (32, "shared")
    assert m.model_cycles(dict(instructions=4, lds_bytes=32, sts_bytes=32), 1) == (16, "shared")
    assert m.model_cycles(dict(instructions=4, ldl=2, local_bytes=16, global_bytes=16), 1) == (
        16, "memory")
    assert m.model_cycles(dict(instructions=4, fp64=8), 1) == (16, "fp64")

    loop = dict(where="k.py:1", via=[], source="for t in range(n_iters)", depth=0)
    analysis = dict(instructions=0, outside=dict(instructions=40), loops=[
        dict(loop, range="range(n_iters)", parent=None, blocks=[
            dict(counts=dict(instructions=8), next=[1, 2]),  # a choice: the if arm or not
            dict(counts=dict(instructions=4, mufu_ex2=4), next=[2]),
            dict(loop=1, next=[])]),
        dict(loop, range="range(0, K, 16)", parent=0, depth=1, blocks=[
            dict(counts=dict(instructions=8, fp32=8), next=[])])])
    names = dict(n_iters=10, K=50)  # the nested loop: 4 trips
    # 4 warps: nested 4 trips x 8 = 32 cycles; the cheapest trip 8 + 32 = 40, the dearest
    # max(12/4, 4*32/16) x 4 = 32, + 32 = 64; outside 40
    costs = m.loop_costs(analysis, names, 4)
    assert costs[1]["trips"] == 4 and costs[1]["low"]["total"] == 32
    assert (costs[0]["low"]["cycles"], costs[0]["high"]["cycles"]) == (40, 64)
    result = m.model_launch(analysis, names, 4, programs=264)
    assert result == dict(programs=264, waves=2, cycles=440, us=round(2 * 440 / 1755, 3),
                          us_all_branches=round(2 * 680 / 1755, 3))
    main = m.main_loop_counts(analysis, 0, names, 4)
    assert main["per_trip"] == dict(instructions=8 + 4 * 8, fp32=4 * 8)
    assert (main["trips"], main["outer"], main["instructions_high"]) == (10, 1, 12 + 32)
    assert m.main_loop(analysis) == 0
    assert m.model_launch(analysis, dict(K=50), 4, 1)["us"] is None  # n_iters unknown
    decide = lambda text, names: m._decide(m._parse(text), names)  # noqa: E731
    assert decide("(t == 1) | (absorbed > 0)", dict(t=1)) is True
    assert decide("(t == 1) | (absorbed > 0)", dict(t=2)) is None
    assert decide("(n_iters == 0) & (absorbed > 0)", dict(n_iters=3)) is False
    assert decide("not n_iters - s > 1", dict(n_iters=3, s=2)) is True
    assert m.trips("range(1, n_iters + 1)", dict(n_iters=20)) == 20
    assert m.trips("range(0, OTH, BT)", dict(OTH=100, BT=64)) == 2


def test_loop_range_follows_helpers_to_the_kernel_arguments():
    """A loop in a helper (_softmax_stats' range(0, K, BLOCK_K), called through
    _onchip_problem) and the tiled kernels' loop over range(0, oth_n, BT), oth_n a _length."""
    path = sinkhorn_triton.__file__
    source = kernel_resources._Source.of(path)

    def line_of(function, text):
        lines, first = inspect.getsourcelines(function.fn if hasattr(function, "fn") else function)
        return first + next(i for i, line in enumerate(lines) if text in line)
    stats = line_of(sinkhorn_triton._softmax_stats, "for k0 in range(0, K, BLOCK_K)")
    problem = line_of(sinkhorn_triton._onchip_problem, "_softmax_stats(x_ptr")
    kernel = line_of(sinkhorn_triton._onchip_forward_kernel, "= _onchip_problem(")
    chain = [(path, stats), (path, problem), (path, kernel)]
    where, text, expr = kernel_resources.loop_range(chain)
    assert (text, expr) == ("for k0 in range(0, K, BLOCK_K)", "range(0, K, BLOCK_K)")
    tiled = line_of(sinkhorn_triton._tiled_half_step_kernel, "for j0 in range(0, oth_n, BT)")
    assert kernel_resources.loop_range([(path, tiled)])[2] == "range(0, OTH, BT)"
    assert source is not None and kernel_resources.loop_range([(path, 1)])[2] is None


def test_recorded_launch_is_specialised_as_the_jit_does():
    """A launch on the GPU marks a tensor at a 16-byte-aligned address and an integer divisible
    by 16 with tt.divisibility 16, and compiles the integer 1 in as a constant; the recorded
    launch, which the report compiles, says the same (an unaligned view and 33 stay plain)."""
    kernel = triton.runtime.JITFunction(_branchy)
    launches = {}
    x = torch.randn(64)
    kernel_resources._Recorder(kernel, launches)[(1,)](x, x[1:], 32, 1, BLOCK=16)
    kernel_resources._Recorder(kernel, launches)[(1,)](x[1:], x, 33, 2, BLOCK=16)
    first, second = launches
    assert dict(first.signature) == {"x_ptr": "*fp32", "out_ptr": "*fp32", "n_iters": "i32",
                                     "every": "constexpr", "BLOCK": "constexpr"}
    assert dict(first.constexprs) == {"every": 1, "BLOCK": 16}
    assert first.attrs == ((0, (("tt.divisibility", 16),)), (2, (("tt.divisibility", 16),)))
    assert dict(second.signature)["every"] == "i32" and dict(second.constexprs) == {"BLOCK": 16}
    assert second.attrs == ((1, (("tt.divisibility", 16),)),)


def test_committed_report_is_rendered_from_its_json():
    with open(COMMITTED + ".json") as f:
        result = json.load(f)
    with open(COMMITTED + ".md") as f:
        assert f.read() == kernel_resources.render(result)
    assert result["arch"] == 90 and not result["quick"]


@pytest.mark.slow
def test_scaling_sweep_compiles_and_models_each_spec(tmp_path):
    """--sweep: per (warps, chunk rows) spec the scaling form's forward and both backward modes,
    compiled, with the chunk the launch used (0: chunk_rows's default), registers, spill stores
    and a modelled time."""
    out = tmp_path / "sweep.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.kernel_resources", "--sweep", "4,0",
                           "4,8", "--sweep-size", "16", "--json", str(out)], cwd=ROOT,
                          env=_compiler_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-5000:]
    assert "| warps | chunk rows | kernel |" in done.stdout
    with open(out) as f:
        rows = json.load(f)
    default = sinkhorn_triton.chunk_rows(16, 16, 4, torch.float32)
    assert [(row["warps"], row["chunk_rows"]) for row in rows] == [(4, default)] * 3 + [(4, 8)] * 3
    for spec in (rows[:3], rows[3:]):
        assert [(row["kernel"], row["detach"]) for row in spec] == [
            ("_scaling_forward_kernel", None), ("_scaling_backward_kernel", False),
            ("_scaling_backward_kernel", True)]
    for row in rows:
        assert 0 < row["registers"] <= 255 and row["spill_stores"] >= 0 and row["model_us"] > 0


def test_sweep_spec_names_what_it_expects():
    assert kernel_resources._spec("8,16") == (8, 16)
    for bad in ("8", "8,x", "8,16,2"):
        with pytest.raises(argparse.ArgumentTypeError,
                           match=r"a spec is WARPS,CHUNK_ROWS \(0: the default chunk\), got "):
            kernel_resources._spec(bad)
