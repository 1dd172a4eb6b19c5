"""The side-by-side report: the project's ops and their peers, measured in one run on one device.

    python -m benchmarks.report [--device cpu|cuda] [--out benchmarks/results] [--quick]
                                [--sections SUITE,...]

writes ``<tag>-report.json`` (every measurement, the versions, the device's ceilings),
``<tag>-report.md`` (the tables, rendered from the JSON by :func:`render`) and one PNG per section,
``<tag>-report-<suite>.png`` (median time and peak extra memory against sequence length), where
``<tag>`` is ``cpu`` or the GPU's name. Sections:

- ``sinkhorn``: one forward+backward of the Sinkhorn loss at an equal iteration count (20,
  unit marginals, L1 cost, epsilon 0.1, temperature 2): the op and every peer of
  benchmarks/sinkhorn_cases.py ``IMPLS`` (the released loop, batched log-domain eager, the same
  under torch.compile, POT's batched and single-problem log-domain solvers), over sequence
  lengths at B=8, K=50, then 16 variable answer lengths (and on CUDA the long case B=4,
  M=N=4096);
- ``sinkhorn_tolerance``: time to tolerance where a peer cannot fix its iteration count
  (GeomLoss's epsilon-scaling): with probability marginals, the op at the fewest iterations whose
  plan's marginal error is at most TOL, GeomLoss (tensorized, and online when pykeops is
  installed) at the first scaling that reaches TOL (benchmarks/tolerance.py). GeomLoss's p=1
  cost is the Euclidean norm, the op's L1: the same tolerance, not the same problem;
- ``topk_probs``: the op against eager softmax-sort-gather, over sequence lengths at B=8,
  V=32000 (k=50, sequence ranking), and one std-scaled case;
- ``loss``: MultiLevelOTLoss('official') against the released code's loss, over sequence
  lengths at B=8 with the paper's vocabularies;
- ``loss_cost``: the whole loss at a realistic size (benchmarks/loss_cost_cases.py): plain
  cross-entropy from the logits, each preset and ULD from the logits (compared with plain
  cross-entropy), each from hidden states (compared with both output layers' matmuls plus
  the logits path, which it replaces), and TRL GOLD's ULDLoss from the logits, configured as
  ``uld_loss`` and with GOLD's own alignment (compared with ``uld_loss``).

``--sections`` runs only the named sections (comma-separated suites, e.g. ``loss_cost``): a
partial report, so it needs an ``--out`` other than the committed results.

Every row is the median of at least ``MIN_ROUNDS`` timed steps after a warm-up step (which also
compiles what torch.compile compiles) and the peak extra memory of one step
(benchmarks/memory.py: a fresh process per row on CPU, two at once after the section's timings;
``max_memory_allocated`` on CUDA). A peer
whose step is predicted to take longer than ``MAX_STEP_S`` (its last time, scaled as the op's
time grew) is skipped and the row says so; a step that fails (out of memory) is reported as such.
On every device the op's rows also give the fraction of the measured copy bandwidth and float32
matmul rate their modelled work reaches (benchmarks/ceilings.py). Where a cases module names a
baseline per implementation (``BASELINES``), the ratios are to that baseline instead of to the op. ``--quick`` runs tiny sizes
(the CI smoke test); its numbers mean nothing.
"""

import argparse
import concurrent.futures
import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
from typing import NamedTuple

import torch

from benchmarks import ceilings
from benchmarks.memory import ROOT, SUITES, case_steps, peak_extra_mib
from benchmarks.timing import median_seconds

TOL, QUICK_TOL = 1e-5, 1e-3
MIN_ROUNDS = 3
TARGET_S = {"cpu": 1.0, "cuda": 1.0}
MAX_STEP_S = {"cpu": 4.0, "cuda": 5.0}
REFERENCE = "mlot"  # the implementation every ratio is taken against


class Section(NamedTuple):
    suite: str  # a key of benchmarks.memory.SUITES
    title: str
    x_label: str  # the plots' x axis: a case's ``x``
    cases: list  # [(name, group, x, case dict)]; group 'sweep' rows are plotted
    note: str


def _sweeps(device_type, quick):
    if quick:
        return dict(sinkhorn=(8, 16), topk=(8, 16), loss=(16, 32))
    if device_type == "cuda":
        return dict(sinkhorn=(128, 256, 512, 1024, 2048, 4096), topk=(256, 512, 1024, 2048, 4096),
                    loss=(256, 512, 1024, 2048))
    return dict(sinkhorn=(128, 256, 512), topk=(128, 256, 512), loss=(64, 128))


def _tolerance_settings(case, tol):
    """The case with the op's iterations and GeomLoss's scaling that reach ``tol``."""
    from benchmarks.sinkhorn_cases import make_inputs
    from benchmarks.tolerance import iterations_to_tolerance, scaling_to_tolerance

    x, y, x_lengths, y_lengths = (t if t is None else t.detach() for t in make_inputs(case))
    options = dict(epsilon=case["epsilon"], temperature=case["temperature"], tol=tol)
    n_iters = iterations_to_tolerance(x, y, x_lengths, y_lengths, **options)
    scaling = (scaling_to_tolerance(x, y, x_lengths, y_lengths, **options)
               if importlib.util.find_spec("geomloss") else None)
    return dict(case, n_iters=n_iters, scaling=scaling)


def plan(device, quick, sections=None):
    """The report's sections on ``device`` (those whose suite is in ``sections``, unless None)."""
    from benchmarks import loss_cases, loss_cost_cases, sinkhorn_cases, topk_cases

    kind = torch.device(device).type
    sweeps, tol = _sweeps(kind, quick), QUICK_TOL if quick else TOL
    batch = 2 if quick else 8
    iters = dict(n_iters=3) if quick else {}
    sinkhorn = [(f"L={n}", "sweep", n, sinkhorn_cases.make_case(batch, n, device=device, **iters))
                for n in sweeps["sinkhorn"]]
    sinkhorn.append(("variable", "variable", None, sinkhorn_cases.make_case(
        2 * batch, 16 if quick else 256, seed=2, lengths="variable", device=device, **iters)))
    long_cases = [("long", "long", None, sinkhorn_cases.make_case(4, 4096, seed=1, device=device))
                  ] if kind == "cuda" and not quick else []
    tolerance = [(name, group, x, _tolerance_settings(dict(case, unit_marginals=False), tol))
                 for name, group, x, case in sinkhorn
                 if sections is None or "sinkhorn_tolerance" in sections]
    vocab = 1000 if quick else 32000
    topk = [(f"L={n}", "sweep", n, topk_cases.make_case(batch, n, vocab, device=device))
            for n in sweeps["topk"]]
    mid = sweeps["topk"][len(sweeps["topk"]) // 2]
    topk.append((f"L={mid} std", "std", None, topk_cases.make_case(
        batch, mid, vocab, seed=1, std_scale=True, device=device)))
    vocabs = dict(v_student=300, v_teacher=200) if quick else {}
    loss = [(f"T={n}", "sweep", n, loss_cases.make_case(batch, n, device=device, **vocabs))
            for n in sweeps["loss"]]
    cost = [(name, "cost", None, case)
            for name, case in loss_cost_cases.named_cases(device, quick).items()]
    planned = [
        Section("sinkhorn", "Sinkhorn loss, 20 iterations", "M = N (B=8, K=50)",
                sinkhorn + long_cases,
                "One forward+backward, epsilon 0.1, temperature 2, unit marginals, L1 cost: every "
                "implementation computes the same values and gradients "
                "(tests/test_benchmark_peers.py). 'variable': 16 answer lengths drawn from a "
                "log-normal (median 24 tokens), the batch padded to its longest; the op and the "
                "per-sequence peers skip the padding, the batched peers mask it."),
        Section("sinkhorn_tolerance", f"Sinkhorn loss to a marginal error of {tol:g}",
                "M = N (B=8, K=50)", tolerance,
                "GeomLoss cannot run a given number of iterations (epsilon-scaling), so each "
                "implementation runs the fewest iterations (the op) or the first scaling of "
                "0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99 (GeomLoss) whose plan has "
                f"max(|P1 - a|_1, |P'1 - b|_1) <= {tol:g} with probability marginals a, b "
                "(benchmarks/tolerance.py). GeomLoss's p=1 cost is the Euclidean norm, the op's "
                "L1: equal tolerance, not the same problem."),
        Section("topk_probs", "topk_probs (k=50, sequence ranking)", "L (B=8, V=32000)", topk,
                "One forward+backward of (probs * w).sum() with respect to the float32 logits. "
                "The peak includes the logits' gradient, which the step returns (as large as "
                "the logits)."),
        Section("loss", "The whole loss: MultiLevelOTLoss('official') vs the released code's",
                "T (B=8, V 50272/32000)", loss,
                "One forward+backward of the total loss (cross-entropy + distillation) with "
                "respect to the student's logits; answers of log-normal lengths (median 24)."),
        Section("loss_cost", "The whole loss's cost against plain cross-entropy and against "
                "the output layers it replaces", "", cost,
                "One forward+backward of the total loss (cross-entropy + distillation) with "
                "respect to the student's inputs (its logits, or its hidden states and output "
                "embedding; the teacher frozen), answers of fixed lengths after a prompt. 'time "
                "÷ its' and 'memory ÷ its' divide by the baseline's median time and peak extra "
                "memory, measured in the same run; the last column is the peak in sizes of the "
                "student's float32 logits [B, T, V_S]."),
    ]
    return [section for section in planned if sections is None or section.suite in sections]


def _measure_row(section, name, group, x, case, impl, spec, kind, predicted_s, ceiling):
    cases = importlib.import_module(SUITES[section.suite][0])
    row = dict(case=name, group=group, x=x, shape=cases.shape(case), impl=impl,
               setting=_setting(section.suite, impl, case))
    if not spec.available():
        return dict(row, skipped=f"not installed: {', '.join(spec.needs)}")
    if impl.startswith("geomloss") and case.get("scaling") is None:
        return dict(row, skipped="no scaling of the ladder reached the tolerance")
    if predicted_s is not None and predicted_s > MAX_STEP_S[kind]:
        return dict(row, skipped=f"predicted {predicted_s:.0f} s per step > {MAX_STEP_S[kind]:.0f} s")
    try:
        seconds, rounds = median_seconds(case_steps(section.suite, impl, case).forward_backward,
                                         TARGET_S[kind], MIN_ROUNDS)
    except (torch.OutOfMemoryError, MemoryError) as error:
        return dict(row, skipped=f"failed: {type(error).__name__}")
    finally:
        if kind == "cuda":
            torch.cuda.empty_cache()
    row.update(median_ms=seconds * 1e3, rounds=rounds)
    if impl == REFERENCE:
        row.update(ceilings.fractions(cases.work(case), seconds, ceiling))
    return row


def _measure_memory(section, measured, kind):
    """Each timed row's ``peak_extra_mib`` (``measured``: (row, case) pairs), after the
    section's timings: on CPU each probe is a fresh process (benchmarks/memory.py) and two run at
    once, which changes no peak (each is its own process's) and halves the wait; on CUDA one at
    a time, in this process. A probe out of memory marks its row failed."""
    def probe(pair):
        row, case = pair
        try:
            return peak_extra_mib(section.suite, row["impl"], case)
        except (torch.OutOfMemoryError, MemoryError) as error:
            return error
        finally:
            if kind == "cuda":
                torch.cuda.empty_cache()

    with concurrent.futures.ThreadPoolExecutor(2 if kind == "cpu" else 1) as pool:
        for (row, _), mib in zip(measured, pool.map(probe, measured)):
            if isinstance(mib, BaseException):
                for key in ("median_ms", "rounds", "bandwidth_fraction", "arithmetic_fraction"):
                    row.pop(key, None)
                row["skipped"] = f"failed: {type(mib).__name__}"
            else:
                row["peak_extra_mib"] = mib


def _setting(suite, impl, case):
    if suite == "sinkhorn_tolerance" and impl.startswith("geomloss"):
        return f"scaling {case['scaling']}" if case.get("scaling") else "–"
    if "n_iters" in case:
        return f"{case['n_iters']} iterations"
    return ""


def run_section(section, kind, ceiling, log):
    """The section's rows: every implementation on every case, with the ratios to the op's (or
    to each implementation's baseline, where the cases module names them)."""
    cases_module, table = SUITES[section.suite]
    module = importlib.import_module(cases_module)
    impls = getattr(module, table)
    baselines = getattr(module, "BASELINES", None)
    rows, last = [], {}  # last: impl -> (its seconds, the op's seconds) on its last measured case
    measured = []  # the timed rows and their cases, for the memory probes
    for name, group, x, case in section.cases:
        reference = None
        for impl, spec in impls.items():
            predicted = None
            if impl in last and reference:
                seconds, ref_seconds = last[impl]
                predicted = seconds * reference / ref_seconds
            row = _measure_row(section, name, group, x, case, impl, spec, kind, predicted, ceiling)
            if "median_ms" in row:
                if impl == REFERENCE:
                    reference = row["median_ms"] / 1e3
                last[impl] = (row["median_ms"] / 1e3, reference)
                measured.append((row, case))
            log(f"{section.suite} {name} {impl}: " + (
                row.get("skipped") or f"{row['median_ms']:.2f} ms"))
            rows.append(row)
    _measure_memory(section, measured, kind)
    for row, _ in measured:
        log(f"{section.suite} {row['case']} {row['impl']}: " + (
            row.get("skipped") or f"{row['peak_extra_mib']:.1f} MiB"))
    for index, (*_, case) in enumerate(section.cases):
        case_rows = {r["impl"]: r for r in rows[index * len(impls):(index + 1) * len(impls)]}
        if baselines is not None:
            _baseline_ratios(case_rows, baselines, module.student_logits_mib(case))
            continue
        ref_row = case_rows[REFERENCE]
        for row in case_rows.values():
            if "median_ms" in row and "median_ms" in ref_row:
                row["speedup"] = row["median_ms"] / ref_row["median_ms"]
                row["memory_ratio"] = (ref_row["peak_extra_mib"] / row["peak_extra_mib"]
                                       if row["peak_extra_mib"] > 0 else None)
    return dict(suite=section.suite, title=section.title, x_label=section.x_label,
                note=section.note, computes={impl: spec.computes for impl, spec in impls.items()},
                rows=rows, baselines=baselines)


def _baseline_ratios(case_rows, baselines, logits_mib):
    """Each row's time and peak memory over its baseline's, and its peak in logits sizes."""
    for impl, row in case_rows.items():
        if "median_ms" not in row:
            continue
        row["logits_ratio"] = row["peak_extra_mib"] / logits_mib
        base = case_rows.get(baselines.get(impl))
        if base is not None and "median_ms" in base:
            row.update(baseline=base["impl"], time_ratio=row["median_ms"] / base["median_ms"],
                       baseline_memory_ratio=row["peak_extra_mib"] / base["peak_extra_mib"])


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _device_name(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                     platform.processor() or "unknown CPU")
    return f"{model}, {os.cpu_count()} cores"


def _commit():
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short=12", "HEAD")
    if not head:
        return None
    return head + (" (dirty)" if git("status", "--porcelain", "--untracked-files=no") else "")


def tag(device):
    """The results' file prefix: 'cpu' or the GPU's name in lower case with dashes."""
    if torch.device(device).type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def run(device, quick=False, log=print, on_section=None, sections=None):
    """The report dict for ``device`` (only the sections whose suite is in ``sections``, unless
    None). ``on_section`` gets the report so far after each section (with ``incomplete`` saying
    how many sections it has until the last)."""
    kind = torch.device(device).type
    meta = dict(
        device=_device_name(device), torch=torch.__version__, threads=torch.get_num_threads(),
        python=platform.python_version(), commit=_commit(), quick=quick,
        date=datetime.date.today().isoformat(),
        versions={pkg: _version(pkg) for pkg in ("triton", "pot", "geomloss", "pykeops", "trl")},
        command="python -m benchmarks.report --device " + kind + (" --quick" if quick else "")
        + (" --sections " + ",".join(sections) if sections else ""),
    )
    ceiling = ceilings.measure(device, quick)
    log(f"ceilings: {ceiling}")
    planned, done = plan(device, quick, sections), []
    for section in planned:
        done.append(run_section(section, kind, ceiling, log))
        report = dict(meta=meta, ceilings=ceiling, sections=list(done))
        if len(done) < len(planned):
            report["incomplete"] = f"{len(done)} of {len(planned)} sections"
        if on_section:
            on_section(report)
    return report


def _cell(value, fmt):
    """``value`` formatted (a trailing '×' of ``fmt`` is kept), or '–' for None."""
    suffix = "×" if fmt.endswith("×") else ""
    return "–" if value is None else format(value, fmt.rstrip("×")) + suffix


def render(report):
    """The Markdown of a report dict: a header, then per section its note, what each
    implementation computes, and one table."""
    meta, ceiling = report["meta"], report["ceilings"]
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
    lines = [
        f"Device: {meta['device']}; torch {meta['torch']} ({meta['threads']} threads), {versions}; "
        f"Python {meta['python']}; commit {meta['commit']}; {meta['date']}. "
        f"Command: `{meta['command']}`.",
        "",
        f"Measured ceilings: copy {ceiling['copy_gb_s']:.1f} GB/s ({ceiling['copy_mib']} MiB "
        f"buffer, read + write), float32 matmul {ceiling['matmul_fp32_tflop_s']:.3f} TFLOP/s "
        f"(n = {ceiling['matmul_n']}).",
    ]
    if meta["quick"]:
        lines += ["", "**--quick: tiny sizes, not representative.**"]
    if report.get("incomplete"):
        lines += ["", f"**Incomplete: {report['incomplete']}; the run stopped before the rest.**"]
    for section in report["sections"]:
        lines += ["", f"#### {section['title']}", "", section["note"], ""]
        lines += [f"- `{impl}`: {text}" for impl, text in section["computes"].items()]
        if section.get("baselines") is not None:
            lines += [""] + _render_baselines(section)
            continue
        lines += ["", "| case | shape | implementation | setting | median ms | mlot speed-up "
                      "| peak extra MiB | mlot memory ÷ its | % of copy bandwidth "
                      "| % of fp32 matmul rate |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for row in section["rows"]:
            if "median_ms" not in row:
                cells = [row["skipped"], "", "", "", "", ""]
            else:
                bw, ar = row.get("bandwidth_fraction"), row.get("arithmetic_fraction")
                cells = [f"{row['median_ms']:.2f}", _cell(row.get("speedup"), ".1f") + "×",
                         f"{row['peak_extra_mib']:.1f}", _cell(row.get("memory_ratio"), ".3f"),
                         _cell(None if bw is None else 100 * bw, ".1f"),
                         _cell(None if ar is None else 100 * ar, ".1f")]
            lines.append("| " + " | ".join([row["case"], row["shape"], row["impl"],
                                             row["setting"] or "–", *cells]) + " |")
    return "\n".join(lines) + "\n"


def _render_baselines(section):
    lines = ["| case | shape | implementation | median ms | compared with | time ÷ its "
             "| peak extra MiB | memory ÷ its | peak ÷ student logits |",
             "|---|---|---|---:|---|---:|---:|---:|---:|"]
    for row in section["rows"]:
        if "median_ms" not in row:
            cells = [row["skipped"], "", "", "", "", ""]
        else:
            cells = [f"{row['median_ms']:.2f}", row.get("baseline", "–"),
                     _cell(row.get("time_ratio"), ".2f×"), f"{row['peak_extra_mib']:.1f}",
                     _cell(row.get("baseline_memory_ratio"), ".2f×"),
                     _cell(row.get("logits_ratio"), ".2f×")]
        lines.append("| " + " | ".join([row["case"], row["shape"], row["impl"], *cells]) + " |")
    return lines


def plot(section, path):
    """Median time and peak extra memory against sequence length, one line per implementation
    (the 'sweep' rows), log-log; False when the section has no sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for row in section["rows"]:
        if row["group"] == "sweep" and "median_ms" in row:
            series.setdefault(row["impl"], []).append((row["x"], row["median_ms"], row["peak_extra_mib"]))
    if not series:
        return False
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    for impl, points in series.items():
        xs, ms, mib = zip(*points)
        ax_time.plot(xs, ms, marker="o", label=impl)
        ax_mem.plot(xs, [max(v, 1e-2) for v in mib], marker="o", label=impl)
    for ax, ylabel in ((ax_time, "median ms, forward+backward"), (ax_mem, "peak extra MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(section["x_label"])
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_time.legend(fontsize=8)
    fig.suptitle(section["title"])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write(report, out, prefix):
    """Writes ``<prefix>-report.json``, ``.md`` and the plots under ``out``; returns the paths."""
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, f"{prefix}-report")
    paths = [base + ".json", base + ".md"]
    with open(paths[0], "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    with open(paths[1], "w") as f:
        f.write(render(report))
    for section in report["sections"]:
        path = f"{base}-{section['suite']}.png"
        if plot(section, path):
            paths.append(path)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when a GPU is visible)")
    default_out = os.path.join(ROOT, "benchmarks", "results")
    parser.add_argument("--out", default=default_out)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--sections", type=lambda text: [s for s in text.split(",") if s],
                        help=f"only these sections, comma-separated, of {','.join(SUITES)} (a "
                             "partial report: needs --out)")
    args = parser.parse_args(argv)
    unknown = [s for s in args.sections or () if s not in SUITES]
    if unknown:
        parser.error(f"--sections: unknown {','.join(unknown)}; the sections are "
                     f"{','.join(SUITES)}")
    if args.sections and os.path.abspath(args.out) == default_out:
        parser.error("--sections writes a partial report: give an --out other than the "
                     "committed results")
    try:
        kind = torch.device(args.device).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda (cuda:N), got {args.device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    prefix, written = tag(args.device), []

    def checkpoint(report):  # after every section: a run cut short keeps the sections it finished
        written[:] = write(report, args.out, prefix)

    run(args.device, args.quick, log=lambda text: print(text, file=sys.stderr, flush=True),
        on_section=checkpoint, sections=args.sections)
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
