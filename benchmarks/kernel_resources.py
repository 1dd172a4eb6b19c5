"""Registers and spills of the Triton kernels, compiled for a CUDA GPU on a machine without one.

The launchers of ``mlot_kernels.ops.sinkhorn_triton`` (Sinkhorn) and ``mlot_kernels.ops.topk_probs_triton`` run on
CPU tensors with every ``*_kernel`` swapped for a recorder (nothing is computed), so each
launch a case makes is recorded with its argument types, constexprs and ``num_warps``. Each
distinct launch is then compiled by ``triton.compile`` for the target (``sm_90``: H100, H200)
and ptxas's own report is read: registers per thread, spill stores and loads (bytes) and the
stack frame. Spilled values live in local memory, which on the GPU is a round trip through L1
and L2 for every use; these are compile-time facts, not timings.

    python -m benchmarks.kernel_resources [--arch 90] [--quick] [--out FILE.md] [--json FILE.json]

The cases are the benchmark suites' (benchmarks/sinkhorn_cases.py, benchmarks/topk_cases.py),
the Sinkhorn ones also with bfloat16 inputs. Needs the Triton kernels compiled, not interpreted:
``TRITON_INTERPRET`` must be unset when ``mlot_kernels`` is imported.
"""

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from benchmarks import sinkhorn_cases, topk_cases

_POINTEE = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16",
            torch.float16: "fp16", torch.int64: "i64", torch.int32: "i32", torch.bool: "i1"}
_PTXAS = re.compile(r"Used (\d+) registers")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclasses.dataclass(frozen=True)
class Launch:
    """One distinct launch: the kernel, its Triton signature, constexprs and num_warps."""

    kernel: object  # triton.JITFunction
    signature: tuple  # ((argument name, Triton type), ...)
    constexprs: tuple  # ((name, value), ...)
    num_warps: int

    @property
    def name(self):
        return self.kernel.__name__


def _triton_type(name, value):
    if isinstance(value, torch.Tensor):
        return "*" + _POINTEE[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"kernel argument {name}: no Triton type for {type(value).__name__}")


class _Recorder:
    """Stands in for a JITFunction: ``kernel[grid](...)`` records a :class:`Launch`."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, num_warps=4, **kwargs):
            bound = dict(zip(self.kernel.arg_names, args), **kwargs)
            signature, constexprs = [], []
            for i, name in enumerate(self.kernel.arg_names):
                if i in self.kernel.constexprs:
                    signature.append((name, "constexpr"))
                    constexprs.append((name, bound[name]))
                else:
                    signature.append((name, _triton_type(name, bound[name])))
            self.launches.setdefault(
                Launch(self.kernel, tuple(signature), tuple(constexprs), num_warps), None)
        return launch


@contextlib.contextmanager
def recording():
    """Within the block, the Triton launchers record their launches instead of running them;
    yields the dict whose keys are the distinct :class:`Launch` es, in order."""
    from mlot_kernels.ops import sinkhorn_triton, topk_probs_triton

    launches, saved = {}, []
    for module in (sinkhorn_triton, topk_probs_triton):
        for name, kernel in vars(module).items():
            if name.endswith("_kernel"):
                if not isinstance(kernel, triton.runtime.JITFunction):
                    raise RuntimeError(f"{module.__name__}.{name} is not a compiled Triton kernel "
                                       "(is TRITON_INTERPRET set?)")
                saved.append((module, name, kernel))
    try:
        for module, name, kernel in saved:
            setattr(module, name, _Recorder(kernel, launches))
        yield launches
    finally:
        for module, name, kernel in saved:
            setattr(module, name, kernel)


def sinkhorn_launches(case, dtype=torch.float32, config=None):
    """The launches of the op's forward and backward (both gradient modes) on a Sinkhorn case;
    ``config`` (a :class:`mlot_kernels.ops.sinkhorn_triton.Config`) forces a regime."""
    from mlot_kernels.ops import sinkhorn_triton

    x, y, x_lengths, y_lengths = sinkhorn_cases.make_inputs(dict(case, device="cpu"))
    x, y = x.detach().to(dtype), y.detach().to(dtype)
    options = dict(epsilon=case["epsilon"], temperature=case["temperature"], p=1,
                   unit_marginals=case["unit_marginals"], config=config)
    with recording() as launches:
        loss, f_hist, g_hist = sinkhorn_triton.sinkhorn_forward(x, y, x_lengths, y_lengths,
                                                           n_iters=case["n_iters"], **options)
        for detach_plan in (False, True):
            sinkhorn_triton.sinkhorn_backward(torch.ones_like(loss), x, y, x_lengths, y_lengths, f_hist,
                                         g_hist, detach_plan=detach_plan, **options)
    return list(launches)


def topk_launches(case, temperatures=None, answers=False, dtype=torch.float32):
    """The launches of the topk_probs ops on a topk case with ``dtype`` logits and the case's
    temperature (or ``temperatures``): the public op's (every row, no targets: topk_probs_forward
    and the backward of probs), or with ``answers`` the losses' (answer_topk_probs): answer rows
    every other row (the last sequence one short of the others) and targets on the last three
    quarters of the rows with a hole every fifth, through topk_probs_stats, topk_probs_forward
    and the backward of probs and ce."""
    from mlot_kernels.ops import topk_probs_triton

    logits = topk_cases.make_inputs(dict(case, device="cpu"))[0].detach().to(dtype)
    B, L, V = logits.shape
    temperatures = [case["temperature"]] if temperatures is None else list(temperatures)
    options = (temperatures, case["std_scale"], case["ranking"])
    rows = lengths = targets = None
    if answers:
        A = L // 2
        rows = 2 * torch.arange(A) + torch.arange(B)[:, None] % 2
        lengths = torch.full((B,), A)
        lengths[-1] = A - 1
        position = torch.arange(L).expand(B, L)
        targets = ((7 * position + torch.arange(B)[:, None]) % V).masked_fill(
            (position < L // 4) | (position % 5 == 4), -100)
    with recording() as launches:
        if answers:
            topk_probs_triton.topk_probs_stats(logits, rows, lengths, targets, *options)
        probs, indices, ce, row_stats = topk_probs_triton.topk_probs_forward(
            logits, rows, lengths, targets, case["k"], *options)
        topk_probs_triton.topk_probs_backward(torch.ones_like(probs), torch.ones_like(ce) if answers
                                        else None, logits, rows, lengths, targets, probs,
                                        indices, row_stats, *options)
    return list(launches)


def compile_launch(launch, arch=90):
    """Compile for sm_{arch}; ptxas's report as a dict (registers, stack, spill stores/loads)."""
    source = ASTSource(launch.kernel, dict(launch.signature), dict(launch.constexprs))
    log = io.StringIO()
    with _ptxas_log(), contextlib.redirect_stdout(log):
        triton.compile(source, target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": launch.num_warps})
    text = log.getvalue()
    registers, frame = _PTXAS.findall(text), _FRAME.findall(text)
    if len(registers) != 1 or len(frame) != 1:
        raise RuntimeError(f"{launch.name}: could not read ptxas's report:\n{text}")
    stack, stores, loads = map(int, frame[0])
    return dict(registers=int(registers[0]), stack=stack, spill_stores=stores, spill_loads=loads)


@contextlib.contextmanager
def _ptxas_log():
    """Triton's compiler prints ptxas's -v report (knobs.nvidia.dump_ptxas_log) and compiles even
    where its cache holds the kernel (knobs.compilation.always_compile)."""
    knobs = ((triton.knobs.nvidia, "dump_ptxas_log"), (triton.knobs.compilation, "always_compile"))
    saved = [getattr(group, name) for group, name in knobs]
    try:
        for group, name in knobs:
            setattr(group, name, True)
        yield
    finally:
        for (group, name), value in zip(knobs, saved):
            setattr(group, name, value)


def _describe(launch):
    keep = ("DTYPE", "SOFTMAX", "DETACH", "WRITE_POT", "WRITE_NORM", "H_OWN", "ADJOINT", "XA",
            "BM", "BN", "BO", "BT", "STD_SCALE", "N_T", "HAS_TGT", "CE_SHARES", "HAS_G", "HAS_CE",
            "BLOCK_V")
    constexprs = dict(launch.constexprs)
    inputs = [t for name, t in launch.signature if name in ("x_ptr", "own_ptr", "z_ptr")]
    parts = [f"in {inputs[0][1:]}"] if inputs else []
    parts += [f"{key}={_short(constexprs[key])}" for key in keep if key in constexprs]
    return " ".join(parts)


def _short(value):
    return str(value).replace("triton.language.", "").replace("fp32", "f32").replace("fp64", "f64")


def cases(quick=False):
    """(case name, launches) for every case: the Sinkhorn ones in float32 and bfloat16, then
    topk_probs. --quick, the CI check, adds float64 (the GPU gradchecks' dtype) and forces the
    long case into the tiled regime with 16 x 8 tiles."""
    from mlot_kernels.ops.sinkhorn_triton import Config

    out = []
    dtypes = (torch.float32, torch.bfloat16) + ((torch.float64,) if quick else ())
    for name, case in sinkhorn_cases.named_cases("cuda", quick).items():
        config = Config(onchip=False, block_own=16, block_other=8) if quick and name == "long" else None
        for dtype in dtypes:
            out.append((f"sinkhorn {name} {sinkhorn_cases.shape(case)} "
                        f"{str(dtype).removeprefix('torch.')}", sinkhorn_launches(case, dtype, config)))
    for name, case in topk_cases.named_cases("cuda", quick).items():
        shape = f"{case['batch']}×{case['length']}×{case['vocab']}"
        out.append((f"topk_probs {name} {shape}", topk_launches(case)))
        out.append((f"topk_probs {name} {shape} answer rows, targets, T=1",
                    topk_launches(case, answers=True)))
        for dtype in (torch.float32,) + ((torch.float64,) if quick else ()):
            out.append((f"topk_probs {name} {shape} answer rows, targets, T=2,1 "
                        f"{str(dtype).removeprefix('torch.')}",
                        topk_launches(case, (2.0, 1.0), answers=True, dtype=dtype)))
    return out


def measure(arch=90, quick=False):
    """A row per (case, distinct launch): its kernel, specialisation, warps and ptxas's report."""
    compiled, rows = {}, []
    for case_name, launches in cases(quick):
        for launch in launches:
            if launch not in compiled:
                compiled[launch] = compile_launch(launch, arch)
            rows.append(dict(case=case_name, kernel=launch.name, specialisation=_describe(launch),
                             warps=launch.num_warps, **compiled[launch]))
    return dict(arch=arch, quick=quick, triton=triton.__version__, torch=torch.__version__,
                rows=rows)


def render(result):
    """Markdown: one table per case."""
    command = ("python -m benchmarks.kernel_resources" + (" --quick" if result["quick"] else "") +
               (f" --arch {result['arch']}" if result["arch"] != 90 else ""))
    lines = [f"# Triton kernels compiled for sm_{result['arch']}: registers and spills", "",
             f"triton {result['triton']}, torch {result['torch']}; `{command}`. "
             "Spills and stack in bytes per thread; no GPU was used.", ""]
    case = None
    for row in result["rows"]:
        if row["case"] != case:
            lines += [] if case is None else [""]
            case = row["case"]
            lines += [f"## {case}", "",
                      "| kernel | specialisation | warps | registers | spill stores | spill loads | stack |",
                      "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        lines.append(f"| {row['kernel']} | {row['specialisation']} | {row['warps']} | "
                     f"{row['registers']} | {row['spill_stores']} | {row['spill_loads']} | "
                     f"{row['stack']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90)")
    parser.add_argument("--quick", action="store_true", help="the suites' small quick cases")
    parser.add_argument("--out", help="write the Markdown report to this file")
    parser.add_argument("--json", help="write the rows as JSON to this file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET"):
        sys.exit("benchmarks.kernel_resources: unset TRITON_INTERPRET (the kernels must compile)")
    result = measure(args.arch, args.quick)
    text = render(result)
    print(text, end="")
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
            fh.write("\n")


if __name__ == "__main__":
    main()
