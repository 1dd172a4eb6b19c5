"""Markdown summary of a pytest-benchmark JSON from benchmarks/test_sinkhorn_cpu.py or
benchmarks/test_topk_probs_cpu.py: ``python -m benchmarks.summarize RESULTS.json``.

Machine, torch and commit come first, then one table per suite (``extra_info["suite"]``; results
without one are Sinkhorn's) with one row per (case, implementation): the case's shape, the median
wall time of one forward+backward, mlot's speed-up over that implementation (ratio of medians),
the peak extra resident MiB of one step, and a memory column:

- sinkhorn: mlot's peak as a fraction of that implementation's;
- topk_probs: the peak beyond the logits' gradient (which the step returns) as a multiple of the
  logits' size, ``(peak extra - logits MiB) / logits MiB``.
"""

import json
import sys


def _sinkhorn_cells(info, mlot_info):
    mlot_mem, mem = mlot_info.get("peak_extra_mib"), info.get("peak_extra_mib")
    shape = f"{info['batch']}×{info['m']}×{info['n']}×{info['k']}"
    return [shape], [f"{mlot_mem / mem:.3f}" if mlot_mem is not None and mem else "–"]


def _topk_probs_cells(info, mlot_info):
    shape = f"{info['batch']}×{info['length']}×{info['vocab']}"
    ratio = info.get("extra_beyond_grad_per_logits")
    return [shape, str(info["k"])], [f"{ratio:.2f}×" if ratio is not None else "–"]


# suite: (columns before "implementation", memory column, its cells from (info, mlot's info))
SUITES = {
    "sinkhorn": (["B×M×N×K"], "mlot memory", _sinkhorn_cells),
    "topk_probs": (["B×L×V", "k"], "extra beyond the gradient ÷ logits size", _topk_probs_cells),
}


def _table(suite, rows):
    shape_columns, memory_column, cells = SUITES[suite]
    header = ["case", *shape_columns, "implementation", "median ms", "mlot speed-up",
              "peak extra MiB", memory_column]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "---|" * (2 + len(shape_columns)) + "---:|" * 4]
    for case, impls in rows.items():
        mlot_time, mlot_info = impls.get("mlot", (None, {}))
        for impl, (median, info) in impls.items():
            shape, memory = cells(info, mlot_info)
            speedup = f"{median / mlot_time:.1f}×" if mlot_time else "–"
            mem = info.get("peak_extra_mib")
            mem_text = f"{mem:.1f}" if mem is not None else "–"
            lines.append("| " + " | ".join([case, *shape, impl, f"{median * 1e3:.2f}", speedup,
                                             mem_text, *memory]) + " |")
    return lines


def summarize(results):
    """The Markdown text for a loaded pytest-benchmark results dict."""
    machine, commit = results["machine_info"], results.get("commit_info", {})
    cpu = machine.get("cpu", {})
    suites = {}  # suite -> case -> impl -> (median, extra_info)
    for bench in results["benchmarks"]:
        info = bench["extra_info"]
        suite = suites.setdefault(info.get("suite", "sinkhorn"), {})
        suite.setdefault(info["case"], {})[info["impl"]] = (bench["stats"]["median"], info)
    lines = [
        f"CPU: {cpu.get('brand_raw', machine.get('processor', '?'))}, {cpu.get('count', '?')} cores; "
        f"torch {machine.get('torch_version', '?')} ({machine.get('torch_num_threads', '?')} threads); "
        f"Python {machine.get('python_version', '?')}; commit {commit.get('id', '?')[:12]}"
        f"{' (dirty)' if commit.get('dirty') else ''}",
        "",
    ]
    if any(info.get("quick") for rows in suites.values() for case in rows.values()
           for _, info in case.values()):
        lines += ["**MLOT_BENCH_QUICK=1: reduced sizes, not representative.**", ""]
    for i, (suite, rows) in enumerate(suites.items()):
        lines += ([""] if i else []) + _table(suite, rows)
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(summarize(json.load(f)))
