"""Smoke test of the planning benchmark: a tiny run reports every figure, each one finite.

The 2-minute / 4 GiB target is not asserted here (it depends on the
machine); the benchmark itself prints PASS/MISS.
"""

from __future__ import annotations

import json
import math

from bench.plan_bench import STAGES, format_table, main, run_bench


def numbers(value, path=""):
    """Every number in a JSON value, with where it is."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from numbers(v, f"{path}[{i}]")


def test_bench_reports_every_figure_finite(tmp_path):
    results = run_bench([150, 300], probe_files=12, cache=tmp_path, use_tracemalloc=True, log=lambda m: None)
    results = json.loads(json.dumps(results, allow_nan=False))  # what --json writes: no NaN or Infinity
    assert set(results["sizes"]) == {"150", "300"}
    for n, row in results["sizes"].items():
        assert row["records"] == int(n) and row["counts"]["records"] == int(n)
        assert 0 < row["planned"] <= int(n) and row["counts"]["chunks"] >= 1
        assert row["counts"]["assignments"] > 0 and row["prep_complete"] is True
        assert set(row["seconds"]) == set(STAGES) == set(row["cpu_seconds"]) == set(row["peak_rss_mib_after"])
        assert all(row["seconds"][s] > 0 for s in STAGES)
        assert row["probe_files_s_extrapolated"] > 0 and row["records_per_s"] > 0
        assert row["planning_s_projected"] > row["seconds"]["plan"]
        assert row["peak_rss_mib"] >= row["peak_rss_mib_after"]["plan"] >= row["baseline_rss_mib"] > 0
        assert row["counts"]["plan_tracemalloc_peak_bytes"] > 0
    assert results["tree"]["files"] == 12 and results["tree"]["probe_per_s"] > 0
    assert results["tree"]["voc_read_per_s"] > 0 and results["val_voc_read_s_extrapolated"] > 0
    target = results["target"]
    assert target["records"] == 300 and isinstance(target["pass"], bool) and target["at_target_size"] is False
    figures = list(numbers(results))
    assert len(figures) > 40 and all(math.isfinite(v) and v >= 0 for _, v in figures), figures
    table = format_table(results)
    assert ("PASS" in table) != ("MISS" in table)
    assert len(table.splitlines()) == 2 + 2 + 3  # head, rule, one row per size, three notes


def test_cli_rejects_bad_input(capsys):
    for argv in (["--records", "12,x"], ["--records", "0"], ["--variant", "nope"], ["--probe-files", "0"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("plan_bench: error:") and len(err.strip().splitlines()) == 1
