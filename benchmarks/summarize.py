"""Markdown summary of a pytest-benchmark JSON from benchmarks/test_sinkhorn_cpu.py:
``python -m benchmarks.summarize RESULTS.json``.

One row per (case, implementation): the median wall time of one forward+backward, mlot's
speed-up over that implementation (ratio of medians), the peak extra resident MiB of one step,
and mlot's peak as a fraction of that implementation's. Machine, torch and commit come first.
"""

import json
import sys


def summarize(results):
    """The Markdown text for a loaded pytest-benchmark results dict."""
    machine, commit = results["machine_info"], results.get("commit_info", {})
    cpu = machine.get("cpu", {})
    rows = {}
    for bench in results["benchmarks"]:
        info = bench["extra_info"]
        rows.setdefault(info["case"], {})[info["impl"]] = (bench["stats"]["median"], info)
    lines = [
        f"CPU: {cpu.get('brand_raw', machine.get('processor', '?'))}, {cpu.get('count', '?')} cores; "
        f"torch {machine.get('torch_version', '?')} ({machine.get('torch_num_threads', '?')} threads); "
        f"Python {machine.get('python_version', '?')}; commit {commit.get('id', '?')[:12]}"
        f"{' (dirty)' if commit.get('dirty') else ''}",
        "",
    ]
    if any(info.get("quick") for case in rows.values() for _, info in case.values()):
        lines += ["**MLOT_BENCH_QUICK=1: reduced sizes, not representative.**", ""]
    lines += ["| case | B×M×N×K | implementation | median ms | mlot speed-up | peak extra MiB | mlot memory |",
              "|---|---|---|---:|---:|---:|---:|"]
    for case, impls in rows.items():
        mlot_time, mlot_info = impls.get("mlot", (None, {}))
        mlot_mem = mlot_info.get("peak_extra_mib")
        for impl, (median, info) in impls.items():
            shape = f"{info['batch']}×{info['m']}×{info['n']}×{info['k']}"
            speedup = f"{median / mlot_time:.1f}×" if mlot_time else "–"
            mem = info.get("peak_extra_mib")
            fraction = f"{mlot_mem / mem:.3f}" if mlot_mem is not None and mem else "–"
            mem_text = f"{mem:.1f}" if mem is not None else "–"
            lines.append(f"| {case} | {shape} | {impl} | {median * 1e3:.2f} | {speedup} | {mem_text} | {fraction} |")
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(summarize(json.load(f)))
