"""The benchmark report (benchmarks/report.py) runs end to end at tiny sizes, and the benchmark
tables of the README and docs/*.md are the ones rendered from the committed results."""

import glob
import importlib
import json
import os
import subprocess
import sys

import pytest

from benchmarks import report as report_module
from benchmarks.summarize import summarize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    done = subprocess.run([sys.executable, "-m", "benchmarks.report", "--device", "cpu", "--quick",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-5000:]
    with open(out / "cpu-report.json") as f:
        # the paths written, one per line (pykeops prints its own warnings on stdout too)
        return out, json.load(f), [line for line in done.stdout.splitlines() if line.startswith(str(out))]


@pytest.mark.slow
def test_quick_report_measures_every_installed_implementation(quick_report):
    """Every section ran; an implementation whose packages are installed is measured on every
    case (nothing is predicted too slow at tiny sizes), with a positive time and the op's rows
    carrying the fractions of the measured ceilings."""
    _, report, _ = quick_report
    assert [s["suite"] for s in report["sections"]] == ["sinkhorn", "sinkhorn_tolerance",
                                                         "topk_probs", "loss", "loss_cost"]
    assert report["ceilings"]["copy_gb_s"] > 0 and report["ceilings"]["matmul_fp32_tflop_s"] > 0
    for section in report["sections"]:
        module, name = report_module.SUITES[section["suite"]]
        table = getattr(importlib.import_module(module), name)
        for row in section["rows"]:
            spec = table[row["impl"]]
            if not spec.available():
                assert row["skipped"].startswith("not installed"), row
                continue
            assert "skipped" not in row, row
            assert row["median_ms"] > 0 and row["peak_extra_mib"] >= 0, row
            baselines = section.get("baselines")
            if baselines is not None:  # ratios to each implementation's own baseline
                assert row.get("baseline") == baselines.get(row["impl"]), row
                assert row.get("time_ratio", 1) > 0 and row["logits_ratio"] >= 0, row
                continue
            assert row["speedup"] > 0, row
            if row["impl"] == "mlot" and section["suite"] != "loss":
                assert row["bandwidth_fraction"] > 0, row
        assert {row["impl"] for row in section["rows"]} == set(table)


@pytest.mark.slow
def test_quick_report_writes_markdown_and_plots(quick_report):
    """The Markdown is the rendering of the JSON; one PNG per section with a sweep."""
    out, report, printed = quick_report
    with open(out / "cpu-report.md") as f:
        assert f.read() == report_module.render(report)
    pngs = sorted(glob.glob(str(out / "cpu-report-*.png")))
    assert [os.path.basename(p) for p in pngs] == sorted(
        f"cpu-report-{s['suite']}.png" for s in report["sections"]
        if any(row["group"] == "sweep" for row in s["rows"]))
    for path in pngs:
        with open(path, "rb") as f:
            assert f.read(8) == PNG_MAGIC
    assert sorted(printed) == sorted([str(out / "cpu-report.json"), str(out / "cpu-report.md"), *pngs])
    assert "incomplete" not in report


def test_report_says_when_it_was_cut_short():
    """A report written after its first section (what a run stopped there leaves) says so;
    a whole one does not."""
    with open(os.path.join(ROOT, "benchmarks", "results", "cpu-report.json")) as f:
        whole = json.load(f)
    partial = dict(whole, sections=whole["sections"][:1], incomplete="1 of 4 sections")
    assert "**Incomplete: 1 of 4 sections" in report_module.render(partial)
    assert "Incomplete" not in report_module.render(whole)


def _table_lines(markdown):
    return [line for line in markdown.splitlines() if line.startswith("| ")]


DOCS = [os.path.join(ROOT, "README.md"),
        *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def _docs():
    """README.md and every docs/*.md, joined: the tables may live in any of them."""
    texts = []
    for path in DOCS:
        with open(path) as f:
            texts.append(f.read())
    return "\n".join(texts)


REPORTS = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*-report.json")))


@pytest.mark.parametrize("path", REPORTS)
def test_docs_have_the_committed_report_tables(path):
    """Every table row rendered from a committed report is in the README or docs/, as rendered."""
    with open(path) as f:
        lines = _table_lines(report_module.render(json.load(f)))
    docs = _docs()
    assert lines and not [line for line in lines if line not in docs]


SUITES = ["sinkhorn", "topk-probs", "loss", "loss-cost"]


@pytest.mark.parametrize("name", SUITES)
def test_docs_have_the_committed_suite_tables(name):
    """Every table row summarised from a committed pytest-benchmark suite is in the README or
    docs/."""
    path = os.path.join(ROOT, "benchmarks", "results", f"cpu-{name}.json")
    with open(path) as f:
        lines = _table_lines(summarize(json.load(f)))
    docs = _docs()
    assert lines and not [line for line in lines if line not in docs]


def _benchmark_tables(markdown):
    """The rows of each table whose header is a benchmark table's (it starts with case, shape and
    implementation, as every rendered report and suite table does)."""
    rows, inside = [], False
    for line in markdown.splitlines():
        if line.startswith("| case | shape | implementation |"):
            inside = True
        elif not line.startswith("|"):
            inside = False
        if inside and line.startswith("| "):  # not the |---| separator, which _table_lines skips
            rows.append(line)
    return rows


@pytest.mark.parametrize("path", DOCS, ids=lambda path: os.path.relpath(path, ROOT))
def test_every_benchmark_row_in_the_docs_is_a_committed_one(path):
    """The other way round: every row of a benchmark table in the README (its results at a
    glance) or a docs file is one rendered from the committed results, so none goes stale."""
    rendered = set()
    for report in REPORTS:
        with open(report) as f:
            rendered.update(_table_lines(report_module.render(json.load(f))))
    for name in SUITES:
        with open(os.path.join(ROOT, "benchmarks", "results", f"cpu-{name}.json")) as f:
            rendered.update(_table_lines(summarize(json.load(f))))
    with open(path) as f:
        rows = _benchmark_tables(f.read())
    assert not [row for row in rows if row not in rendered]
