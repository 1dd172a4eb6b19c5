"""Markdown summary of a pytest-benchmark JSON from the suites (benchmarks/test_sinkhorn.py,
test_topk_probs.py, test_loss.py): ``python -m benchmarks.summarize RESULTS.json``.

Machine, torch and commit come first, then one table per suite with one row per
(case, implementation): the case's shape, the median wall time of the forward, the backward and
the forward+backward, mlot's forward+backward speed-up over that implementation (ratio of
medians) and the peak extra MiB of one forward+backward (benchmarks/memory.py); for topk_probs
also the peak beyond the logits' gradient (which the step returns) as a multiple of the logits'
size. A suite whose cases module names a baseline per implementation (``BASELINES``: the
whole-loss cost, benchmarks/loss_cost_cases.py) gives instead each implementation's
forward+backward time and peak memory divided by its baseline's, and the peak in student-logits
sizes.
"""

import importlib
import json
import sys

from benchmarks.memory import SUITES
from benchmarks.steps import MODES


def _baseline_table(suite, rows, baselines):
    shape = importlib.import_module(SUITES[suite][0]).shape
    header = ["case", "shape", "implementation", *(f"{mode.replace('_', '+')} ms" for mode in MODES),
              "compared with", "time ÷ its", "peak extra MiB", "memory ÷ its",
              "peak ÷ student logits"]
    lines = [f"**{suite}**", "", "| " + " | ".join(header) + " |",
             "|---|---|---|" + "---:|" * 3 + "---|" + "---:|" * 4]
    for case, impls in rows.items():
        for impl, modes in impls.items():
            info = next(iter(modes.values()))[1]
            fb = modes.get("forward_backward")
            times = [f"{modes[mode][0] * 1e3:.2f}" if mode in modes else "–" for mode in MODES]
            base = impls.get(baselines.get(impl), {}).get("forward_backward")
            ratios = ["–", "–"]
            if fb and base:
                ratios = [f"{fb[0] / base[0]:.2f}×",
                          f"{fb[1]['peak_extra_mib'] / base[1]['peak_extra_mib']:.2f}×"]
            memory = f"{fb[1]['peak_extra_mib']:.1f}" if fb else "–"
            logits = f"{fb[1]['peak_extra_mib'] / fb[1]['student_logits_mib']:.2f}×" if fb else "–"
            lines.append("| " + " | ".join([case, shape(info["params"]), impl, *times,
                                             baselines.get(impl, "–"), ratios[0], memory,
                                             ratios[1], logits]) + " |")
    return lines


def _table(suite, rows):
    module = importlib.import_module(SUITES[suite][0])
    if hasattr(module, "BASELINES"):
        return _baseline_table(suite, rows, module.BASELINES)
    shape = module.shape
    topk = suite == "topk_probs"
    header = ["case", "shape", "implementation", *(f"{mode.replace('_', '+')} ms" for mode in MODES),
              "mlot speed-up", "peak extra MiB", *(["beyond the gradient ÷ logits"] if topk else [])]
    lines = [f"**{suite}**", "", "| " + " | ".join(header) + " |",
             "|---|---|---|" + "---:|" * (len(header) - 3)]
    for case, impls in rows.items():
        mlot = impls.get("mlot", {}).get("forward_backward")
        for impl, modes in impls.items():
            info = next(iter(modes.values()))[1]
            fb = modes.get("forward_backward")
            times = [f"{modes[mode][0] * 1e3:.2f}" if mode in modes else "–" for mode in MODES]
            speedup = f"{fb[0] / mlot[0]:.1f}×" if fb and mlot else "–"
            memory = f"{fb[1]['peak_extra_mib']:.1f}" if fb else "–"
            extra = []
            if topk:
                ratio = fb[1].get("extra_beyond_grad_per_logits") if fb else None
                extra = [f"{ratio:.2f}×" if ratio is not None else "–"]
            lines.append("| " + " | ".join([case, shape(info["params"]), impl, *times, speedup,
                                             memory, *extra]) + " |")
    return lines


def summarize(results):
    """The Markdown text for a loaded pytest-benchmark results dict."""
    machine, commit = results["machine_info"], results.get("commit_info", {})
    cpu = machine.get("cpu", {})
    suites = {}  # suite -> case -> impl -> mode -> (median s, extra_info)
    for bench in results["benchmarks"]:
        info = bench["extra_info"]
        suites.setdefault(info["suite"], {}).setdefault(info["case"], {}).setdefault(
            info["impl"], {})[info["mode"]] = (bench["stats"]["median"], info)
    devices = {info["device"] for rows in suites.values() for case in rows.values()
               for modes in case.values() for _, info in modes.values()}
    lines = [
        f"Device: {', '.join(sorted(devices))}; CPU: {cpu.get('brand_raw', machine.get('processor', '?'))}, "
        f"{cpu.get('count', '?')} cores; torch {machine.get('torch_version', '?')} "
        f"({machine.get('torch_num_threads', '?')} threads); Python {machine.get('python_version', '?')}; "
        f"commit {commit.get('id', '?')[:12]}{' (dirty)' if commit.get('dirty') else ''}",
        "",
    ]
    if any(info.get("quick") for rows in suites.values() for case in rows.values()
           for modes in case.values() for _, info in modes.values()):
        lines += ["**MLOT_BENCH_QUICK=1: reduced sizes, not representative.**", ""]
    for i, (suite, rows) in enumerate(suites.items()):
        lines += ([""] if i else []) + _table(suite, rows)
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(summarize(json.load(f)))
