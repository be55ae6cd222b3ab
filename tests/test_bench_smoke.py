"""Smoke test of the builder benchmark: every measurement runs and every ratio is reported.

Speed targets are not asserted here (they depend on the machine); the
benchmark itself prints PASS/MISS.
"""

from __future__ import annotations

import json
import math

from bench.builder_bench import TARGETS, format_table, main, run_bench
from bench.make_tree import make_tree, tree_dir


def test_make_tree_is_cached_and_sized(tmp_path):
    images, boxes = make_tree(tmp_path, 5, n_classes=3)
    files = sorted(p.name for p in images.iterdir())
    assert len(files) == 5 and len(list((boxes / "val").glob("*.xml"))) == 5
    stamp = (images / files[0]).stat().st_mtime_ns
    make_tree(tmp_path, 5, n_classes=3)  # reused, not rewritten
    assert (images / files[0]).stat().st_mtime_ns == stamp
    assert (tree_dir(tmp_path, 5, 3) / "DONE").exists()


def test_bench_reports_every_ratio(tmp_path):
    # four classes: even the 6-source build has a partner for every class relation (mixed_same, mixed_next)
    results = run_bench(n=12, workers=2, quick=True, cache=tmp_path / "trees", n_naive=3, n_classes=4,
                        log=lambda m: None)
    results = json.loads(json.dumps(results))  # what --json writes
    assert set(results["targets"]) == set(TARGETS)
    for name, row in results["targets"].items():
        assert math.isfinite(row["value"]) and row["value"] > 0, name
        assert isinstance(row["pass"], bool)
    assert results["scaling"]["shards_identical"] is True
    assert set(results["rss"]) == {"6", "12"}
    assert all(r["peak_rss_mib"] > 0 for r in results["rss"].values())
    assert "MISS" in format_table(results) or "PASS" in format_table(results)


def test_cli_rejects_bad_input(capsys):
    assert main(["--n", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("builder_bench: error:") and len(err.strip().splitlines()) == 1
