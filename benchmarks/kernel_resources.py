"""Registers, spills and SASS counts of the Triton kernels, compiled for a CUDA GPU on a machine
without one, with a modelled time per launch.

The launchers of ``mlot_kernels.ops.sinkhorn_triton`` (Sinkhorn) and ``mlot_kernels.ops.topk_probs_triton`` run on
CPU tensors with every ``*_kernel`` swapped for a recorder (nothing is computed), so each
launch a case makes is recorded with its argument types, constexprs, ``num_warps``, grid and
scalar arguments, each argument specialised as the JIT specialises it on a GPU (16-byte
divisibility of addresses and integers, the integer 1 a constant). Each distinct launch is then
compiled by ``triton.compile`` for the target (``sm_90``: H100, H200) and ptxas's own report is
read: registers per thread, spill stores and loads (bytes) and the stack frame. Spilled values
live in local memory, which on the GPU is a round trip through L1 and L2 for every use; these
are compile-time facts, not timings.

The cubin is disassembled (``nvdisasm -g -gi``, once per distinct launch, alongside the next
compilation) and its loops found (``analyse_sass``): a backward ``BRA`` closes a loop, loops
nest by their extent, and the line info of the back edge names the source ``for`` (through the
inlined helpers' call sites) whose ``range`` gives the trip count from the launch's arguments.
A loop body's forward branches from a source ``if`` are choices: taken as the launch's
arguments and the loop variables decide the test, trip by trip, else each trip has a cheapest
and a dearest path. Static counts per trip of the main loop (``main_loop``; per thread):
instructions, MUFU.EX2 and other MUFU, FP32 (FFMA/FADD/FMUL), shared loads/stores with their
bytes, global, atomic and local (spill) traffic. The **model** (``model_launch``, ``MODEL``)
turns the counts into a time per launch: per program, each loop's trips times its cycles per
trip (the largest over the pipes of its count over the pipe's throughput per SM per clock on
H100/H200, plus its nested loops), plus the code outside loops once; programs in waves over 132
SMs at 1.755 GHz. A model from static counts, not a measurement.

    python -m benchmarks.kernel_resources [--arch 90] [--quick] [--out FILE.md] [--json FILE.json]

The cases are the benchmark suites' (benchmarks/sinkhorn_cases.py, benchmarks/topk_cases.py),
the Sinkhorn ones also with bfloat16 inputs. Needs the Triton kernels compiled, not interpreted:
``TRITON_INTERPRET`` must be unset when ``mlot_kernels`` is imported.
"""

import argparse
import ast
import collections
import concurrent.futures
import contextlib
import copy
import dataclasses
import io
import json
import linecache
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.runtime.jit import native_specialize_impl
from triton.compiler import ASTSource

from benchmarks import sinkhorn_cases, topk_cases

_PTXAS = re.compile(r"Used (\d+) registers")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclasses.dataclass(frozen=True)
class Launch:
    """One distinct launch: the kernel, its Triton signature, constexprs, num_warps and the
    arguments' attributes (``tt.divisibility``) as the JIT specialises them."""

    kernel: object  # triton.JITFunction
    signature: tuple  # ((argument name, Triton type), ...)
    constexprs: tuple  # ((name, value), ...)
    num_warps: int
    attrs: tuple = ()  # ((argument index, ((attribute, value), ...)), ...)

    @property
    def name(self):
        return self.kernel.__name__


def _specialise(kernel, index, value):
    """What a launch on the GPU makes of one argument, through the JIT's own specialisation:
    (Triton type, attributes), a tensor (CPU tensors stand in: the JIT reads only their dtype
    and address) or an integer divisible by 16 marked so, the integer 1 ("constexpr", [])."""
    param = kernel.params[index]
    if not isinstance(value, (torch.Tensor, bool, int, float)):
        raise TypeError(f"kernel argument {param.name}: no Triton type for {type(value).__name__}")
    kind, key = native_specialize_impl(BaseBackend, value, param.is_const,
                                       not param.do_not_specialize,
                                       not param.do_not_specialize_on_alignment)
    return kind, BaseBackend.parse_attr(key) if isinstance(key, str) else []


@dataclasses.dataclass(frozen=True)
class Call:
    """One launch's grid and scalar (non-constexpr, non-tensor) arguments."""

    grid: tuple  # programs along each axis
    args: tuple  # ((argument name, int or float), ...)


class _Recorder:
    """Stands in for a JITFunction: ``kernel[grid](...)`` records a :class:`Launch` and its
    :class:`Call`."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, num_warps=4, **kwargs):
            bound = dict(zip(self.kernel.arg_names, args), **kwargs)
            signature, constexprs, scalars, attrs = [], [], [], []
            for i, name in enumerate(self.kernel.arg_names):
                if i in self.kernel.constexprs:
                    signature.append((name, "constexpr"))
                    constexprs.append((name, bound[name]))
                    continue
                kind, attributes = _specialise(self.kernel, i, bound[name])
                signature.append((name, kind))
                if kind == "constexpr":  # the integer 1
                    constexprs.append((name, bound[name]))
                if attributes:
                    attrs.append((i, tuple(tuple(a) for a in attributes)))
                if not isinstance(bound[name], torch.Tensor):
                    scalars.append((name, bound[name]))
            programs = grid(bound) if callable(grid) else grid
            programs = programs if isinstance(programs, tuple) else (programs,)
            programs = tuple(int(g) for g in programs)
            calls = self.launches.setdefault(
                Launch(self.kernel, tuple(signature), tuple(constexprs), num_warps, tuple(attrs)),
                {})
            call = Call(programs, tuple(scalars))
            calls[call] = calls.get(call, 0) + 1
        return launch


@contextlib.contextmanager
def recording():
    """Within the block, the Triton launchers record their launches instead of running them;
    yields the dict whose keys are the distinct :class:`Launch` es, in order, each with a dict
    of its distinct :class:`Call` s and how many times each was made."""
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
    """The launches of the op's forward and backward (both gradient modes) on a Sinkhorn case,
    as (launch, {call: count}) pairs; ``config`` (a
    :class:`mlot_kernels.ops.sinkhorn_triton.Config`) forces a regime."""
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
    return list(launches.items())


def topk_launches(case, temperatures=None, answers=False, dtype=torch.float32):
    """The launches of the topk_probs ops on a topk case with ``dtype`` logits and the case's
    temperature (or ``temperatures``): the public op's (every row, no targets: topk_probs_forward
    and the backward of probs), or with ``answers`` the losses' (answer_topk_probs): answer rows
    every other row (the last sequence one short of the others) and targets on the last three
    quarters of the rows with a hole every fifth, through topk_probs_stats, topk_probs_forward
    and the backward of probs and ce. (launch, {call: count}) pairs."""
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
    return list(launches.items())


def compile_launch(launch, arch=90):
    """Compile for sm_{arch}; ptxas's report as a dict (registers, stack, spill stores/loads)."""
    return _compile(launch, arch)[0]


def _compile(launch, arch):
    """ptxas's report and the cubin (bytes)."""
    source = ASTSource(launch.kernel, dict(launch.signature), dict(launch.constexprs),
                       {(i,): [list(a) for a in attributes] for i, attributes in launch.attrs})
    log = io.StringIO()
    with _ptxas_log(), contextlib.redirect_stdout(log):
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": launch.num_warps})
    text = log.getvalue()
    registers, frame = _PTXAS.findall(text), _FRAME.findall(text)
    if len(registers) != 1 or len(frame) != 1:
        raise RuntimeError(f"{launch.name}: could not read ptxas's report:\n{text}")
    stack, stores, loads = map(int, frame[0])
    report = dict(registers=int(registers[0]), stack=stack, spill_stores=stores, spill_loads=loads)
    return report, compiled.asm["cubin"]


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


# ---------------------------------------------------------------- SASS: loops and counts
#
# nvdisasm -g -gi prints, before each run of instructions, their source location as a chain
# ("line 98 inlined at line 230", "line 230 inlined at line 256", "line 256"): the innermost
# line first, then each inlined helper's call site. The chain of a loop's back edge names the
# `for` statement (Triton gives the loop's branch the for's location), and the call sites map
# the helper's parameters to the kernel's arguments, so the loop's range can be evaluated from
# a launch's arguments and constexprs.

_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?:(@!?U?P(?:T|\d))\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_LABEL = re.compile(r"^\s*([.$\w]+):\s*$")
_LOCATION = re.compile(r'//## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')
_TARGET = re.compile(r"`\(([.$\w]+)\)")
_Instr = collections.namedtuple("_Instr", "offset pred op target loc")

# The names a Sinkhorn kernel's iteration loop and feature (K) loops range over (main_loop).
ITERATION_NAMES = ("n_iters",)
FEATURE_NAMES = ("K",)
_FP32 = {"FFMA", "FADD", "FMUL", "FFMA32I", "FADD32I", "FMUL32I"}
_FP64 = {"DFMA", "DADD", "DMUL"}
_GLOBAL = {"LDG": "ldg", "LDGSTS": "ldg", "STG": "stg", "LD": "ld", "ST": "st",
           "ATOM": "atom", "ATOMG": "atom", "RED": "atom", "REDG": "atom"}
_LOCAL = {"LDL": "ldl", "STL": "stl"}
_SHARED = {"LDS": "lds", "LDSM": "lds", "STS": "sts", "STSM": "sts", "ATOMS": "sts"}
COUNT_KEYS = ("instructions", "mufu_ex2", "mufu_other", "fp32", "fp64", "lds", "sts", "lds_bytes",
              "sts_bytes", "ldg", "stg", "ld", "st", "atom", "global_bytes", "ldl", "stl",
              "local_bytes")


def nvdisasm():
    """The nvdisasm Triton ships (its knob), else one on PATH or in /usr/local/cuda/bin."""
    try:
        candidates = [triton.knobs.nvidia.nvdisasm.path]
    except Exception:  # an older Triton, or its binary missing
        candidates = []
    candidates += [shutil.which("nvdisasm"), "/usr/local/cuda/bin/nvdisasm"]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise RuntimeError("benchmarks.kernel_resources: no nvdisasm (Triton's, on PATH or in "
                       "/usr/local/cuda/bin)")


def disassemble(cubin):
    """The cubin's SASS with line info, inlined call sites included (nvdisasm -c -g -gi)."""
    with tempfile.TemporaryDirectory(prefix="kernel-resources-") as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        done = subprocess.run([nvdisasm(), "-c", "-g", "-gi", path], capture_output=True,
                              text=True)
    if done.returncode:
        raise RuntimeError(f"nvdisasm failed: {done.stderr[-2000:]}")
    return done.stdout


def parse_sass(text):
    """nvdisasm's listing as _Instr (offset, predicate, opcode with modifiers, branch target
    offset or None, location chain ((file, line), ...) innermost first), up to the trap loop
    (`BRA` to itself) that ends the function."""
    raw, labels, block, chain, pending = [], {}, [], (), []
    for line in text.splitlines():
        found = _LOCATION.search(line)
        if found:
            block.append(found)
            continue
        if block:
            chain = tuple((b.group(1), int(b.group(2))) for b in block)
            if block[-1].group(3):
                chain += ((block[-1].group(3), int(block[-1].group(4))),)
            block = []
        found = _LABEL.match(line)
        if found:
            pending.append(found.group(1))
            continue
        found = _INSTR.match(line)
        if found:
            offset = int(found.group(1), 16)
            labels.update((label, offset) for label in pending)
            pending = []
            target = _TARGET.search(found.group(4))
            raw.append((offset, found.group(2), found.group(3), target and target.group(1), chain))
    instrs = []
    for offset, pred, op, target, loc in raw:
        target = labels.get(target) if target else None
        if op.split(".")[0] == "BRA" and target == offset:
            break
        instrs.append(_Instr(offset, pred, op, target, loc))
    return instrs


def _width(parts):
    """Bytes per thread of a memory instruction from its modifiers (.64, .128, .U8, ...)."""
    for i, part in enumerate(parts[1:], 1):
        if part in ("64", "F64", "S64", "U64"):
            return 8
        if part == "128":
            return 16
        if part in ("U8", "S8"):
            return 1
        if part in ("U16", "S16"):
            return 2
        if part in ("M88", "MT88"):  # LDSM/STSM: .M88.2 and .M88.4 move 2 and 4 registers
            return 4 * int(parts[i + 1]) if i + 1 < len(parts) and parts[i + 1].isdigit() else 4
    return 4


def count(instrs):
    """Static counts (per thread) of a stretch of SASS: instructions, MUFU.EX2 and other MUFU,
    FP32 (FFMA/FADD/FMUL) and FP64 instructions, shared, global (and atomic) and local memory
    instructions with their bytes. Only the nonzero counts."""
    c = collections.Counter()
    for ins in instrs:
        parts = ins.op.split(".")
        base = parts[0]
        c["instructions"] += 1
        if base == "MUFU":
            c["mufu_ex2" if parts[1:2] == ["EX2"] else "mufu_other"] += 1
        elif base in _FP32:
            c["fp32"] += 1
        elif base in _FP64:
            c["fp64"] += 1
        elif base in _SHARED:
            c[_SHARED[base]] += 1
            c[_SHARED[base] + "_bytes"] += _width(parts)
        elif base in _GLOBAL:
            c[_GLOBAL[base]] += 1
            c["global_bytes"] += _width(parts)
        elif base in _LOCAL:
            c[_LOCAL[base]] += 1
            c["local_bytes"] += _width(parts)
    return {key: c[key] for key in COUNT_KEYS if c[key]}


class _Source:
    """A Python file's syntax tree, looked up by the line numbers of the SASS's line info."""

    _cache = {}

    @classmethod
    def of(cls, path):
        """The file as this process imported it (linecache: the lines inspect, and so Triton,
        read), else as it is now; None if unreadable."""
        if path not in cls._cache:
            try:
                cls._cache[path] = cls("".join(linecache.getlines(path)))
            except (SyntaxError, ValueError):
                cls._cache[path] = None
        return cls._cache[path]

    def __init__(self, text):
        nodes = list(ast.walk(ast.parse(text)))
        self.lines = text.splitlines()
        self.functions = [n for n in nodes if isinstance(n, ast.FunctionDef)]
        self.fors = {n.lineno: n for n in nodes if isinstance(n, ast.For)}
        self.ifs = {line: n for n in nodes if isinstance(n, ast.If)
                    for line in range(n.lineno, n.test.end_lineno + 1)}

    def function_at(self, line):
        inside = [f for f in self.functions if f.lineno <= line <= f.end_lineno]
        return max(inside, key=lambda f: f.lineno, default=None)


def _name(node):
    if isinstance(node, ast.Name):
        return node.id
    return node.attr if isinstance(node, ast.Attribute) else None


def _is_length(node):
    """A call of this project's `_length(ptr, b, full, has)` (the length, clamped to full)."""
    return isinstance(node, ast.Call) and _name(node.func) == "_length" and len(node.args) >= 3


def _bindings(function):
    """name -> expression for the names `function` binds exactly once: `name = expr`, and a
    length from `_length(ptr, b, full, has)` (`n, ok = _length(...)`, `_length(...)[0]`),
    which stands for its upper bound `full` (a shorter valid length shortens the loop). A cast
    of a name to itself (`m = m.to(tl.int32)`, also in a tuple) is not a new binding."""
    found = collections.defaultdict(list)

    def bind(target, value):
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and (
                value.func.attr == "to"):
            value = value.func.value  # x.to(dtype): the value of x
        if isinstance(value, ast.Subscript) and _is_length(value.value):
            value = value.value.args[2]
        if isinstance(target, ast.Name):
            if not (isinstance(value, ast.Name) and value.id == target.id):
                found[target.id].append(None if _is_length(value) else value)
        elif isinstance(target, ast.Tuple):
            if isinstance(value, ast.Tuple) and len(value.elts) == len(target.elts):
                for elt, part in zip(target.elts, value.elts):
                    bind(elt, part)
                return
            for i, elt in enumerate(target.elts):
                if isinstance(elt, ast.Name):
                    found[elt.id].append(value.args[2] if i == 0 and _is_length(value) else None)
    for node in ast.walk(function):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                bind(target, node.value)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)) and isinstance(node.target, ast.Name):
            found[node.target.id].append(None)
        elif isinstance(node, ast.For):
            for target in ast.walk(node.target):
                if isinstance(target, ast.Name):
                    found[target.id].append(None)
    return {name: values[0] for name, values in found.items()
            if len(values) == 1 and values[0] is not None}


def _substitute(expr, mapping):
    """A copy of expr with its names in mapping replaced by (copies of) their expressions."""
    class Substitute(ast.NodeTransformer):
        def visit_Name(self, node):
            return copy.deepcopy(mapping[node.id]) if node.id in mapping else node
    return Substitute().visit(copy.deepcopy(expr))


def _within_function(expr, function):
    """expr with the names `function` binds once replaced (a few rounds)."""
    params = {a.arg for a in function.args.args}
    bindings = {k: v for k, v in _bindings(function).items() if k not in params}
    for _ in range(4):
        if not {n.id for n in ast.walk(expr) if isinstance(n, ast.Name)} & bindings.keys():
            break
        expr = _substitute(expr, bindings)
    return expr


def _call_site(function, line, callee):
    for node in ast.walk(function):
        if (isinstance(node, ast.Call) and node.lineno <= line <= node.end_lineno
                and _name(node.func) == callee.name):
            return node
    return None


def _to_kernel(expr, chain):
    """expr, written in the function holding chain[0], in the names of the outermost function of
    the chain (the kernel): through each call site, a helper's parameters become the call's
    arguments and the names a function binds once their values. None where a call site cannot
    be found."""
    path, line = chain[0]
    source = _Source.of(path)
    function = source and source.function_at(line)
    if function is None:
        return None
    for path, line in chain[1:]:
        expr = _within_function(expr, function)
        caller_source = _Source.of(path)
        caller = caller_source and caller_source.function_at(line)
        call = caller and _call_site(caller, line, function)
        if call is None:
            return None
        params = [a.arg for a in function.args.args]
        mapping = dict(zip(params[len(params) - len(function.args.defaults):],
                           function.args.defaults))
        mapping.update(zip(params, call.args))
        mapping.update((kw.arg, kw.value) for kw in call.keywords if kw.arg)
        expr = _substitute(expr, {k: v for k, v in mapping.items() if k in params})
        function = caller
    return _within_function(expr, function)


def loop_range(chain):
    """The source of a SASS loop from its back edge's location chain: (file:line, the for
    statement's text, its range as an expression in the kernel's arguments and constexprs, or
    None where a name or a call site could not be followed)."""
    if not chain:
        return None, None, None
    path, line = chain[0]
    source = _Source.of(path)
    node = source and source.fors.get(line)
    where = f"{os.path.basename(path)}:{line}"
    if node is None:
        return where, None, None
    text = source.lines[line - 1].strip().rstrip(":")
    it = node.iter
    if not (isinstance(it, ast.Call) and _name(it.func) == "range" and 1 <= len(it.args) <= 3):
        return where, text, None
    expr = _to_kernel(ast.Call(func=ast.Name("range", ast.Load()), args=list(it.args),
                               keywords=[]), chain)
    return where, text, None if expr is None else ast.unparse(expr)


def _evaluate(node, names):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.Name):
        return names[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand, names)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return not _evaluate(node.operand, names)
    if isinstance(node, ast.BinOp):
        a, b = _evaluate(node.left, names), _evaluate(node.right, names)
        ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
               ast.FloorDiv: lambda: a // b, ast.Mod: lambda: a % b, ast.BitAnd: lambda: a & b,
               ast.BitOr: lambda: a | b}
        if type(node.op) in ops:
            return ops[type(node.op)]()
    if isinstance(node, ast.BoolOp):
        values = [bool(_evaluate(v, names)) for v in node.values]
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.Compare) and len(node.ops) == 1:
        a, b = _evaluate(node.left, names), _evaluate(node.comparators[0], names)
        ops = {ast.Eq: a == b, ast.NotEq: a != b, ast.Lt: a < b, ast.LtE: a <= b, ast.Gt: a > b,
               ast.GtE: a >= b}
        if type(node.ops[0]) in ops:
            return ops[type(node.ops[0])]
    if isinstance(node, ast.Call) and _name(node.func) in ("cdiv", "min", "max", "minimum",
                                                            "maximum") and len(node.args) == 2:
        a, b = (_evaluate(arg, names) for arg in node.args)
        return {"cdiv": lambda: -(-a // b), "min": lambda: min(a, b), "max": lambda: max(a, b),
                "minimum": lambda: min(a, b), "maximum": lambda: max(a, b)}[_name(node.func)]()
    raise ValueError(f"cannot evaluate {ast.unparse(node)}")


def trips(range_text, names):
    """The trip count of `range(...)` (kernel-level text, as loop_range gives it) for the
    launch's arguments and constexprs `names`; None if it cannot be evaluated."""
    span = _range_args(range_text, names) if range_text else None
    return None if span is None else len(range(*span))


def _is_branch(ins):
    return ins.op.split(".")[0] == "BRA"


def _if_of(ins):
    """(chain level, file, If node) of the source `if` a branch comes from: a location of its
    chain (the innermost, or a call site, as for a helper called in the test) is the test of
    an if statement, and the innermost is not a for (a guard skipping a loop of no trips).
    None for any other branch."""
    if not ins.loc:
        return None
    first = _Source.of(ins.loc[0][0])
    if first is not None and ins.loc[0][1] in first.fors:
        return None
    for level, (path, line) in enumerate(ins.loc):
        source = _Source.of(path)
        if source is not None and line in source.ifs:
            return level, path, source.ifs[line]
    return None


def _lines(statements):
    return (statements[0].lineno, statements[-1].end_lineno) if statements else None


def _if_choice(ins, successors):
    """What the model needs of a branch from a source `if`, given the instructions of its two
    successor blocks: ``at`` (file:line), ``then`` (0 or 1: the successor in the if's body and
    not its else, by their line info; None if unclear) and ``test``, in the kernel's names (or
    None)."""
    level, path, node = _if_of(ins)
    body, orelse = _lines(node.body), _lines(node.orelse)

    def sides(block):
        lines = {line for i in block for p, line in i.loc if p == path}
        inside = any(body[0] <= line <= body[1] for line in lines)
        outside = any(orelse[0] <= line <= orelse[1] for line in lines) if orelse else any(
            not node.lineno <= line <= body[1] for line in lines)
        return inside, outside
    found = [sides(block) for block in successors]
    then = [k for k, (inside, outside) in enumerate(found) if inside and not outside]
    other = [k for k, (inside, outside) in enumerate(found) if outside and not inside]
    if len(then) != 1 and len(other) == 1:
        then = [1 - other[0]]
    test = _to_kernel(node.test, ins.loc[level:])
    return dict(at=f"{os.path.basename(path)}:{node.lineno}",
                then=then[0] if len(then) == 1 else None,
                test=None if test is None else ast.unparse(test))


def analyse_sass(text):
    """The loops of a kernel's SASS and its static counts, as a JSON-able dict:
    ``instructions`` (the whole kernel), ``outside`` (the counts of the code in no loop) and
    ``loops``, in order, each with ``where`` (file:line of its for; ``via``, the call sites'
    lines), ``source`` (the statement), ``range`` (in the kernel's arguments and constexprs, or
    None), ``var`` (the for's variable), ``parent`` (index), ``depth`` and ``blocks``: its body
    (one trip) as basic blocks in order, each ``{"counts": ...}`` or ``{"loop": child}`` with
    ``next``, the blocks it may go on to (the last block holds the back edge), and for a choice
    ``if`` (``_if_choice``: where, which successor is the if's body, its test).

    A loop is a backward BRA (its target the loop's first instruction; several back edges to
    one target make one loop, to the last); loops nest by their extent. In a body a forward
    branch from a source `if` (``_if_of``) is a choice between its target and the next block;
    an unconditional branch goes to its target; any other branch (a compiler's: a guard
    skipping a loop of no trips, a branch around an atomic or a slow path, a loop exit) is taken
    to fall through, so its code counts. The code outside loops is all counted once."""
    instrs = parse_sass(text)
    index = {ins.offset: i for i, ins in enumerate(instrs)}
    ends = {}
    for i, ins in enumerate(instrs):
        target = index.get(ins.target) if ins.target is not None else None
        if _is_branch(ins) and target is not None and target < i:
            ends[target] = max(ends.get(target, i), i)
    spans = sorted(ends.items())
    parents, owner = [], [None] * len(instrs)
    for k, (start, end) in enumerate(spans):
        enclosing = [j for j in range(k) if spans[j][0] <= start and end <= spans[j][1]]
        parents.append(max(enclosing) if enclosing else None)
        for i in range(start, end + 1):
            owner[i] = k
    depth = []
    for parent in parents:
        depth.append(0 if parent is None else depth[parent] + 1)

    def child_of(k, i):  # the child of loop k whose extent holds instruction i
        c = owner[i]
        while c is not None and parents[c] != k:
            c = parents[c]
        return c

    def blocks(k):
        start, end = spans[k]
        units, i = [], start  # (first instruction, child loop or None)
        while i <= end:
            c = None if owner[i] == k else child_of(k, i)
            units.append((i, c))
            i = i + 1 if c is None else spans[c][1] + 1
        unit_at = {first: u for u, (first, _) in enumerate(units)}

        def target_unit(ins):
            t = index.get(ins.target) if ins.target is not None else None
            return unit_at.get(t) if t is not None and start < t <= end else None
        leaders = {0}
        for u, (i, c) in enumerate(units):
            if c is not None:
                leaders |= {u, u + 1}
            elif _is_branch(instrs[i]) and i != end:
                leaders.add(u + 1)
                if target_unit(instrs[i]) is not None:
                    leaders.add(target_unit(instrs[i]))
        leaders = sorted(u for u in leaders if u < len(units))
        block_of = {u: b for b, u in enumerate(leaders)}

        def block_instrs(b):  # the instructions of block b, a nested loop's all
            last = (leaders[b + 1] if b + 1 < len(leaders) else len(units)) - 1
            first_i, last_i = units[leaders[b]][0], units[last][0]
            if units[last][1] is not None:
                last_i = spans[units[last][1]][1]
            return instrs[first_i:last_i + 1]
        out = []
        for b, first in enumerate(leaders):
            last = (leaders[b + 1] if b + 1 < len(leaders) else len(units)) - 1
            i, c = units[last]
            fall = [b + 1] if b + 1 < len(leaders) else []
            if c is not None:
                block, after = dict(loop=c), fall
            else:
                block = dict(counts=count(instrs[j] for j, _ in units[first:last + 1]))
                ins, after = instrs[i], fall
                target = target_unit(ins) if _is_branch(ins) and i != end else None
                if target is not None and ins.pred is None:
                    after = [block_of[target]]
                elif target is not None and fall and _if_of(ins) is not None:
                    after = fall + [block_of[target]]
                    choice = _if_choice(ins, [block_instrs(a) for a in after])
                    if choice["then"] is not None:
                        choice["then"] = after[choice["then"]]
                    block["if"] = choice
            block["next"] = after
            out.append(block)
        return out

    loops = []
    for k, (start, end) in enumerate(spans):
        where, source, range_text = loop_range(instrs[end].loc)
        node = None
        if instrs[end].loc and _Source.of(instrs[end].loc[0][0]) is not None:
            node = _Source.of(instrs[end].loc[0][0]).fors.get(instrs[end].loc[0][1])
        var = node.target.id if node is not None and isinstance(node.target, ast.Name) else None
        loops.append(dict(where=where, via=[line for _, line in instrs[end].loc[1:]],
                          source=source, range=range_text, var=var, parent=parents[k],
                          depth=depth[k], blocks=blocks(k)))
    return dict(instructions=len(instrs), outside=count(ins for ins, k in zip(instrs, owner)
                                                          if k is None), loops=loops)


def analyse_cubin(cubin):
    return analyse_sass(disassemble(cubin))


def _range_names(loop):
    if not loop["range"]:
        return set()
    tree = ast.parse(loop["range"], mode="eval")
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}


def main_loop(analysis):
    """The index of the kernel's main loop (None without loops). The rule: of the loops whose
    range names n_iters (Sinkhorn iteration loops), the outermost; else of those whose range
    names no K (loops over tiles, chunks or the vocabulary rather than the features), the
    outermost; else of all loops (only K loops, or the source unknown). Ties go to the most
    MUFU.EX2 in the loop's body and nested loops (static counts), then to the most
    instructions, then to the first."""
    loops = analysis["loops"]

    def inclusive(k, key):
        return sum(block["counts"].get(key, 0) if "counts" in block else
                   inclusive(block["loop"], key) for block in loops[k]["blocks"])
    for test in (lambda loop: _range_names(loop) & set(ITERATION_NAMES),
                 lambda loop: loop["range"] and not _range_names(loop) & set(FEATURE_NAMES),
                 lambda loop: True):
        chosen = [k for k, loop in enumerate(loops) if test(loop)]
        if chosen:
            return min(chosen, key=lambda k: (loops[k]["depth"], -inclusive(k, "mufu_ex2"),
                                              -inclusive(k, "instructions"), k))
    return None


# ---------------------------------------------------------------- the model
#
# Throughputs per SM per clock on sm_90 (H100 SXM5, H200: 132 SMs): the CUDA C++ Programming
# Guide's arithmetic-instruction throughput table for compute capability 9.0 (32-bit
# add/multiply/multiply-add 128 results, 64-bit 64, exp2/log2/reciprocal/rsqrt/sin/cos
# 16 results, i.e. MUFU 4 per SMSP); one warp instruction issued per clock by each of the 4
# SM sub-partitions' schedulers (NVIDIA's Hopper architecture whitepaper); shared memory 32
# banks of 4 bytes, 128 B per clock; global and local (spill) traffic 64 B per clock, an assumed
# figure for L1-resident data (L2 and DRAM are slower: H200's 4.8 TB/s is ~21 B per clock per
# SM at 1.755 GHz). Clock: 1.755 GHz (the H100 SXM5's maximum boost is 1.98 GHz: times x 0.89).

MODEL = dict(device="H100 SXM5 / H200 (sm_90)", sms=132, clock_ghz=1.755, issue=4, fp32=128,
             mufu=16, fp64=64, shared_bytes=128, global_bytes=64)


def model_cycles(counts, warps, model=MODEL):
    """Modelled cycles on one SM for one pass over a stretch of code with static (per thread)
    `counts`, run by `warps` warps: the largest over the pipes of its warp instructions (counts
    x warps) over the pipe's throughput per SM per clock; with the pipe that bounds it. The
    issue slots, FP32, MUFU and FP64 units belong to the 4 sub-partitions, a warp to one of
    them: those pipes take ceil(warps / 4) warps at a quarter of the SM's rate, so fewer than
    4 warps leave units idle. Shared memory and L1 serve the whole SM."""
    get = lambda key: counts.get(key, 0)  # noqa: E731
    per_partition = -(-warps // 4) * 4  # warps' worth of cycles on the busiest sub-partition
    pipes = dict(
        issue=per_partition * get("instructions") / model["issue"],
        fp32=per_partition * get("fp32") * 32 / model["fp32"],
        mufu=per_partition * (get("mufu_ex2") + get("mufu_other")) * 32 / model["mufu"],
        fp64=per_partition * get("fp64") * 32 / model["fp64"],
        shared=warps * (get("lds_bytes") + get("sts_bytes")) * 32 / model["shared_bytes"],
        memory=warps * (get("global_bytes") + get("local_bytes")) * 32 / model["global_bytes"])
    bound = max(pipes, key=pipes.get)
    return pipes[bound], bound


def _path(blocks, cost, pick, forced):
    """The blocks of the cheapest (pick=min) or dearest (max) path from the first block to the
    last by `cost` per block, a block in `forced` going only to its successor there; all
    blocks if the last cannot be reached."""
    best, previous = [None] * len(blocks), [None] * len(blocks)
    best[0] = cost(0)
    for b, block in enumerate(blocks):
        for s in [forced[b]] if b in forced else block["next"]:
            if best[b] is not None and s > b:
                value = best[b] + cost(s)
                if best[s] is None or pick(value, best[s]) != best[s]:
                    best[s], previous[s] = value, b
    if best[-1] is None:
        return list(range(len(blocks)))
    path = [len(blocks) - 1]
    while previous[path[-1]] is not None:
        path.append(previous[path[-1]])
    return path[::-1]


def _decide(node, names):
    """An if's test for a launch: True, False, or None where it cannot be evaluated; `|`,
    `&`, `or`, `and` and `not` decide with an unknown operand where the known one suffices
    (`(t == 1) | (absorbed > 0)` is true for t = 1)."""
    logic = (isinstance(node, ast.BoolOp) or isinstance(node, ast.BinOp)
             and isinstance(node.op, (ast.BitOr, ast.BitAnd)))
    if logic:
        parts = node.values if isinstance(node, ast.BoolOp) else [node.left, node.right]
        values = [_decide(part, names) for part in parts]
        any_of = isinstance(node.op, (ast.Or, ast.BitOr))
        if (True if any_of else False) in values:
            return any_of
        return None if None in values else not any_of
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        value = _decide(node.operand, names)
        return None if value is None else not value
    try:
        return bool(_evaluate(node, names))
    except (KeyError, ValueError, TypeError, ZeroDivisionError):
        return None


def _parse(text):
    return ast.parse(text, mode="eval").body if text else None


def _range_args(range_text, names):
    """(start, stop, step) of a range for `names`, or None."""
    try:
        args = [_evaluate(arg, names) for arg in _parse(range_text).args]
    except (AttributeError, KeyError, ValueError, TypeError, ZeroDivisionError, SyntaxError):
        return None
    start, stop, step = (0, args[0], 1) if len(args) == 1 else (*args, 1)[:3]
    if not all(isinstance(v, int) for v in (start, stop, step)) or step <= 0:
        return None
    return start, stop, step


# a loop of more trips than this has its trips' decisions sampled: the first two, the last two
_ENUMERATED_TRIPS = 4096


def loop_costs(analysis, names, warps, model=MODEL):
    """Per loop, for a launch with arguments and constexprs `names`: None where its or a nested
    loop's trips are unknown, else ``trips`` and, for the ``low`` (the cheapest path through
    the body's undecided choices) and ``high`` (dearest) cases: ``cycles`` of a typical trip
    (the largest pipe time of the path's own code, plus its nested loops' totals), ``total``
    over the trips, ``counts`` of a typical trip (nested loops included at their trips) and
    ``counts_total``. A choice whose if's test the launch's arguments and the loop variables
    decide (`n_iters == 0`; `t == 1` for t the variable of this loop or one around it) takes
    that side, trip by trip: the trips are grouped by how their tests and nested ranges come
    out, and the typical trip is the commonest group's."""
    loops = analysis["loops"]
    kids = [[j for j, loop in enumerate(loops) if loop["parent"] == k] for k in range(len(loops))]
    tests = [[_parse(b["if"]["test"]) if "if" in b and b["if"]["then"] is not None else None
              for b in loop["blocks"]] for loop in loops]

    def subtree(k):
        return [k] + [j for c in kids[k] for j in subtree(c)]

    def mentioned(k):  # the names in the tests and nested ranges of loop k's subtree
        nodes = [t for j in subtree(k) for t in tests[j] if t is not None]
        nodes += [_parse(loops[j]["range"]) for j in subtree(k)[1:] if loops[j]["range"]]
        return {n.id for node in nodes for n in ast.walk(node) if isinstance(n, ast.Name)}
    seen = [mentioned(k) for k in range(len(loops))]
    memo = {}

    def cost(k, names, mode):
        key = (k, mode, tuple(sorted((n, names[n]) for n in seen[k] | set(_range_names(loops[k]))
                                     if n in names)))
        if key not in memo:
            memo[key] = _cost(k, names, mode)
        return memo[key]

    def _cost(k, names, mode):
        loop, blocks, pick = loops[k], loops[k]["blocks"], min if mode == "low" else max
        span = _range_args(loop["range"], names)
        if span is None:
            return None
        values = range(*span)
        groups = {}  # signature -> [a trip value, trips]
        var = loop.get("var")
        if var and var in seen[k] and len(values):
            sample = values if len(values) <= _ENUMERATED_TRIPS else [
                values[0], values[1], values[len(values) // 2], values[-2], values[-1]]
            for v in sample:
                inner = dict(names, **{var: v})
                signature = tuple(_decide(t, inner) for j in subtree(k) for t in tests[j]
                                  if t is not None) + tuple(
                    trips(loops[j]["range"], inner) for j in subtree(k)[1:])
                groups.setdefault(signature, [v, 0])[1] += 1
            if len(sample) < len(values):  # the unsampled trips go with the middle one
                groups[next(sig for sig, (v, _) in groups.items()
                            if v == values[len(values) // 2])][1] += len(values) - len(sample)
        else:
            groups[None] = [None, len(values)]
        total, counts_total, typical = 0.0, collections.Counter(), None
        for value, runs in groups.values():
            inner = names if value is None else dict(names, **{var: value})
            forced = {}
            for b, block in enumerate(blocks):
                decided = None if tests[k][b] is None else _decide(tests[k][b], inner)
                if decided is not None:
                    then = block["if"]["then"]
                    forced[b] = then if decided else next(s for s in block["next"] if s != then)
            nested = {}
            for block in blocks:
                if "loop" in block:
                    nested[block["loop"]] = cost(block["loop"], inner, mode)
                    if nested[block["loop"]] is None:
                        return None

            def block_cost(b):
                if "loop" in blocks[b]:
                    return nested[blocks[b]["loop"]]["total"]
                return model_cycles(blocks[b]["counts"], warps, model)[0]
            own, counts, inside = collections.Counter(), collections.Counter(), 0.0
            for b in _path(blocks, block_cost, pick, forced):
                if "loop" in blocks[b]:
                    inside += nested[blocks[b]["loop"]]["total"]
                    counts.update(nested[blocks[b]["loop"]]["counts_total"])
                else:
                    own.update(blocks[b]["counts"])
                    counts.update(blocks[b]["counts"])
            cycles = model_cycles(own, warps, model)[0] + inside
            total += runs * cycles
            for key, v in counts.items():
                counts_total[key] += runs * v
            if typical is None or runs > typical[0]:
                typical = (runs, cycles, dict(counts))
        if typical is None:
            typical = (0, 0.0, {})
        return dict(trips=len(values), cycles=typical[1], total=total, counts=typical[2],
                    counts_total=dict(counts_total))

    out = []
    for k in range(len(loops)):
        low, high = cost(k, names, "low"), cost(k, names, "high")
        out.append(None if low is None or high is None else
                   dict(trips=low["trips"], low=low, high=high))
    return out


def model_launch(analysis, names, warps, programs, model=MODEL):
    """The modelled time of one launch: per program, the code outside loops once plus each
    outermost loop's trips times its cycles per trip (``loop_costs``), in waves of
    model["sms"] programs at model["clock_ghz"]. ``us`` takes each trip's cheapest path through
    the source `if` s of the loops' bodies that the launch's arguments do not decide,
    ``us_all_branches`` the dearest. The program's
    cycles (cheapest), the waves and both times in µs (None where a loop's trips are unknown)."""
    costs = loop_costs(analysis, names, warps, model)
    outermost = [k for k, loop in enumerate(analysis["loops"]) if loop["parent"] is None]
    waves = -(-programs // model["sms"])
    if any(costs[k] is None for k in outermost):
        return dict(programs=programs, waves=waves, cycles=None, us=None, us_all_branches=None)
    outside = model_cycles(analysis["outside"], warps, model)[0]
    low, high = (outside + sum(costs[k][mode]["total"] for k in outermost)
                 for mode in ("low", "high"))
    scale = waves / (model["clock_ghz"] * 1e3)
    return dict(programs=programs, waves=waves, cycles=round(low), us=round(low * scale, 3),
                us_all_branches=round(high * scale, 3))


def main_loop_counts(analysis, k, names, warps, model=MODEL):
    """Loop k per trip for a launch: ``trips``, ``outer`` (how many times its parents run it),
    ``per_trip`` (the counts of the cheapest path, nested loops included at their trips),
    ``instructions_high`` (the dearest path's instructions), the model's ``cycles`` per trip and
    the pipe that bounds its counts (None throughout where trips are unknown)."""
    loops, costs = analysis["loops"], loop_costs(analysis, names, warps, model)
    outer, parent = 1, loops[k]["parent"]
    while parent is not None and outer is not None:
        outer = None if costs[parent] is None else outer * costs[parent]["trips"]
        parent = loops[parent]["parent"]
    if costs[k] is None:
        return dict(trips=None, outer=outer, per_trip={}, instructions_high=None, cycles=None,
                    bound=None)
    low, high = costs[k]["low"], costs[k]["high"]
    return dict(trips=costs[k]["trips"], outer=outer, per_trip=low["counts"],
                instructions_high=high["counts"].get("instructions", 0),
                cycles=round(low["cycles"]), bound=model_cycles(low["counts"], warps, model)[1])


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
    """(case name, launches) for every case: the Sinkhorn ones in float32 and bfloat16, an
    on-chip case in the log-domain form too (and, beside the suite's cases, the on-chip regime's
    largest problem, 256 x 256, in both forms), then topk_probs. --quick, the CI check, adds
    float64 (the GPU gradchecks' dtype) and forces the long case into the tiled regime with
    16 x 8 tiles."""
    from mlot_kernels.ops.sinkhorn_triton import Config, choose_config

    out = []
    dtypes = (torch.float32, torch.bfloat16) + ((torch.float64,) if quick else ())
    named = sinkhorn_cases.named_cases("cuda", quick)
    if not quick:
        named["onchip-largest"] = sinkhorn_cases.make_case(4, 256, seed=3, device="cuda")
    for name, case in named.items():
        config = Config(onchip=False, block_own=16, block_other=8) if quick and name == "long" else None
        forms = [("", config)]
        m, n = (int(size) for size in sinkhorn_cases.shape(case).split("×")[1:3])
        if config is None and choose_config(m, n).onchip:
            forms.append((", log-domain form", choose_config(m, n, scaling=False)))
        for dtype in dtypes:
            for form, form_config in forms:
                out.append((f"sinkhorn {name} {sinkhorn_cases.shape(case)} "
                            f"{str(dtype).removeprefix('torch.')}{form}",
                            sinkhorn_launches(case, dtype, form_config)))
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


def _names(launch, call):
    """The values a loop's range may name: the call's scalar arguments and the constexprs."""
    names = {k: v for k, v in launch.constexprs if isinstance(v, (int, float))}
    names.update(call.args)
    return names


def measure(arch=90, quick=False):
    """A row per (case, distinct launch): its kernel, specialisation, warps, ptxas's report, its
    calls (grid, scalar arguments, count, modelled time) and its main loop's counts per trip;
    ``sass``, indexed by the rows, holds each distinct launch's loops and counts. The
    disassembly of one launch runs while the next compiles."""
    compiled, pending = {}, {}
    workers = max(1, min(4, (os.cpu_count() or 2) - 1))  # a core kept for the compilation
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        all_cases = cases(quick)
        for _, launches in all_cases:
            for launch, _ in launches:
                if launch not in compiled:
                    compiled[launch], cubin = _compile(launch, arch)
                    pending[launch] = pool.submit(analyse_cubin, cubin)
        index = {launch: i for i, launch in enumerate(pending)}
        sass = [future.result() for future in pending.values()]
    rows = []
    for case_name, launches in all_cases:
        for launch, calls in launches:
            analysis = sass[index[launch]]
            row = dict(case=case_name, kernel=launch.name, specialisation=_describe(launch),
                       warps=launch.num_warps, **compiled[launch], sass=index[launch],
                       launches=sum(calls.values()), calls=[])
            for call, n in calls.items():
                model = model_launch(analysis, _names(launch, call), launch.num_warps,
                                     math.prod(call.grid))
                row["calls"].append(dict(grid=list(call.grid), args=dict(call.args), count=n,
                                         **{"model_" + k: v for k, v in model.items()}))
            k = main_loop(analysis)
            if k is not None:
                loop = analysis["loops"][k]
                first = next(iter(calls))
                row["main_loop"] = dict(
                    loop=k, where=loop["where"], source=loop["source"], range=loop["range"],
                    **main_loop_counts(analysis, k, _names(launch, first), launch.num_warps))
            rows.append(row)
    return dict(arch=arch, quick=quick, triton=triton.__version__, torch=torch.__version__,
                model=MODEL, rows=rows, sass=sass)


def scaling_sweep(size, specs, dtype=torch.float32, arch=90):
    """The on-chip scaling form's launches (forward, both backward modes) on a square case of
    side ``size`` (B = 8 up to 128, as the paper's, else 4, as the 256 x 256 case of
    :func:`cases`), compiled once per ``(num_warps, chunk_rows)`` spec (chunk_rows 0: the
    default, :func:`mlot_kernels.ops.sinkhorn_triton.chunk_rows`): a row per spec and launch with
    the chunk's rows BR, the registers, spill stores and the modelled µs per launch."""
    from mlot_kernels.ops.sinkhorn_triton import Config

    case = sinkhorn_cases.make_case(8 if size <= 128 else 4, size, seed=3, device="cuda")
    rows = []
    for warps, chunk in specs:
        config = Config(onchip=True, num_warps=warps, chunk_rows=chunk or None)
        for launch, calls in sinkhorn_launches(case, dtype, config):
            compiled, cubin = _compile(launch, arch)
            call = next(iter(calls))
            model = model_launch(analyse_cubin(cubin), _names(launch, call), warps,
                                 math.prod(call.grid))
            constexprs = dict(launch.constexprs)
            rows.append(dict(warps=warps, chunk_rows=constexprs["BR"], kernel=launch.name,
                             detach=constexprs.get("DETACH"), registers=compiled["registers"],
                             spill_stores=compiled["spill_stores"], model_us=model["us"]))
    return rows


def render_sweep(rows):
    lines = ["| warps | chunk rows | kernel | registers | spill stores | model µs/launch |",
             "| ---: | ---: | --- | ---: | ---: | ---: |"]
    for row in rows:
        kernel = row["kernel"] + (" (DETACH)" if row["detach"] else "")
        lines.append(f"| {row['warps']} | {row['chunk_rows']} | {kernel} | {row['registers']} | "
                     f"{row['spill_stores']} | {_cell(row['model_us'])} |")
    return "\n".join(lines) + "\n"


def _spec(text):
    try:
        warps, chunk = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a spec is WARPS,CHUNK_ROWS (0: the default chunk), got "
                                         f"{text!r}") from None
    return warps, chunk


def _cell(value, digits=1):
    if value is None:
        return "?"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _times(row, key):
    values = sorted({call[key] for call in row["calls"]}, key=lambda v: (v is None, v))
    if not values:
        return "–"
    if None in values:
        return "?"
    return _cell(values[0]) if len(values) == 1 else f"{_cell(values[0])}–{_cell(values[-1])}"


def _model_cells(row):
    """model µs per launch (with the conditional code on every trip, where it differs),
    launches, and model µs over all of the row's launches."""
    low, high = _times(row, "model_us"), _times(row, "model_us_all_branches")
    per_launch = low if high == low else f"{low} ({high})"
    total = None
    if all(call["model_us"] is not None for call in row["calls"]):
        total = sum(call["count"] * call["model_us"] for call in row["calls"])
    return per_launch, str(row["launches"]), _cell(total)


def _count_cells(counts):
    get = lambda key: counts.get(key, 0)  # noqa: E731
    return [*(str(get(key)) for key in ("instructions", "mufu_ex2", "mufu_other", "fp32")),
            f"{get('lds')}, {get('sts')} ({get('lds_bytes') + get('sts_bytes')})",
            f"{get('ldg') + get('ld')}, {get('stg') + get('st')}, {get('atom')} "
            f"({get('global_bytes')})",
            f"{get('ldl')}, {get('stl')} ({get('local_bytes')})"]


def render(result):
    """Markdown: one table per case of registers and spills and, where the result has them
    (not in reports from before the SASS counts), one of the main loop's counts and the model."""
    command = ("python -m benchmarks.kernel_resources" + (" --quick" if result["quick"] else "") +
               (f" --arch {result['arch']}" if result["arch"] != 90 else ""))
    counted = "sass" in result
    lines = [f"# Triton kernels compiled for sm_{result['arch']}: registers and spills"
             + (", SASS counts and a modelled time" if counted else ""), "",
             f"triton {result['triton']}, torch {result['torch']}; `{command}`. "
             "Spills and stack in bytes per thread; no GPU was used.", ""]
    if counted:
        m = result["model"]
        lines += [
            "Second table per case: the kernel's main loop (`main_loop`: the outermost loop over "
            "`n_iters`, else the outermost not over `K`, else the one with the most MUFU.EX2), "
            "its trips (× the runs of the loops around it) and static counts per thread for one "
            "trip (the commonest kind), nested loops included at their trips, on the cheapest "
            "path through the source `if` s of the body that the launch's arguments and the loop "
            "variables do not decide (`n_iters == 0` and `t == 1` are decided): instructions, MUFU.EX2, other MUFU, FP32 "
            "(FFMA/FADD/FMUL); shared loads, stores (bytes); global loads, stores, atomics "
            "(bytes); local (spill) loads, stores (bytes); *dearest*: the instructions of the "
            f"dearest path. **Model, not a measurement**: {m['device']}, per SM per clock "
            f"{m['issue']} warp instructions issued, {m['fp32']} FP32, {m['mufu']} MUFU and "
            f"{m['fp64']} FP64 results, {m['shared_bytes']} B shared, {m['global_bytes']} B "
            "global or local (the first four in 4 sub-partitions, one per warp: fewer than 4 "
            "warps leave some idle); a stretch of code takes its largest pipe time, a loop its trips "
            "times that of its body and nested loops, a program its code outside loops once "
            f"and its loops, a launch ⌈programs / {m['sms']}⌉ programs' time at "
            f"{m['clock_ghz']} GHz. No latency, dependency, occupancy or cache-miss effects. "
            "*model µs/launch*: each trip on its cheapest path (in parentheses, its dearest, "
            "where that differs), every trip counted; *model µs, all*: the row's launches added (a case's launches "
            "are its forward's and both backward modes').", ""]
    by_case = {}
    for row in result["rows"]:
        by_case.setdefault(row["case"], []).append(row)
    for n, (case, rows) in enumerate(by_case.items()):
        lines += ([] if n == 0 else [""]) + [
            f"## {case}", "",
            "| kernel | specialisation | warps | registers | spill stores | spill loads | stack |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for row in rows:
            lines.append(f"| {row['kernel']} | {row['specialisation']} | {row['warps']} | "
                         f"{row['registers']} | {row['spill_stores']} | {row['spill_loads']} | "
                         f"{row['stack']} |")
        if not counted:
            continue
        lines += ["", "| kernel | specialisation | main loop | trips | instr. | MUFU.EX2 | "
                  "MUFU other | FP32 | LDS, STS (B) | LDG, STG, atom (B) | LDL, STL (B) | dearest "
                  "| model bound | model µs/launch | launches | model µs, all |",
                  "| --- | --- | --- | " + "---: | " * 9 + "--- | ---: | ---: | ---: |"]
        for row in rows:
            loop = row.get("main_loop")
            if loop is None:
                cells = ["–"] * 2 + ["–"] * 7 + ["–", "–"]
            else:
                trip = _cell(loop["trips"])
                if loop["outer"] != 1:
                    trip += f" ×{_cell(loop['outer'])}"
                cells = [f"line {loop['where'].split(':')[-1]} `{loop['range'] or loop['source']}`",
                         trip, *_count_cells(loop["per_trip"]),
                         _cell(loop["instructions_high"]), loop["bound"] or "?"]
            lines.append("| " + " | ".join([row["kernel"], row["specialisation"], *cells,
                                            *_model_cells(row)]) + " |")
    return "\n".join(lines) + "\n"


def to_json(result):
    """The result as JSON text: indented, but each kernel's analysis in ``sass`` on one line."""
    if "sass" not in result:
        return json.dumps(result, indent=1) + "\n"
    text = json.dumps(dict(result, sass=[]), indent=1)
    if result["sass"]:
        analyses = ",\n  ".join(json.dumps(a, separators=(",", ":")) for a in result["sass"])
        text = text.replace('"sass": []', '"sass": [\n  ' + analyses + "\n ]")
    return text + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90)")
    parser.add_argument("--quick", action="store_true", help="the suites' small quick cases")
    parser.add_argument("--out", help="write the Markdown report to this file")
    parser.add_argument("--json", help="write the rows as JSON to this file")
    parser.add_argument("--sweep", nargs="+", type=_spec, metavar="WARPS,CHUNK_ROWS",
                        help="instead of the report: the on-chip scaling form compiled and "
                             "modelled per spec (chunk rows 0: the default)")
    parser.add_argument("--sweep-size", type=int, default=128,
                        help="the sweep's square problem side (default 128)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET"):
        sys.exit("benchmarks.kernel_resources: unset TRITON_INTERPRET (the kernels must compile)")
    if args.sweep:
        rows = scaling_sweep(args.sweep_size, args.sweep, arch=args.arch)
        print(render_sweep(rows), end="")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(rows, fh, indent=1)
        return
    result = measure(args.arch, args.quick)
    text = render(result)
    print(text, end="")
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(to_json(result))


if __name__ == "__main__":
    main()
