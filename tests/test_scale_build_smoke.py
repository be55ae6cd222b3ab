"""Smoke test of the dataset-scale build benchmark: a tiny tree, every figure reported and consistent.

No time is asserted (it depends on the machine); the benchmark reports it.
"""

from __future__ import annotations

import math

from bench import scale_build


def test_scale_build_reports_every_variant_and_a_projection(tmp_path):
    results = scale_build.run_bench(40, 20, 1, ("imagenet9",), tmp_path / "trees", tmp_path / "work", 30.0,
                                    log=lambda m: None)
    row = results["recipes"]["imagenet9"]
    assert set(row["variants"]) == {"original", "only_fg", "only_bg_b", "only_bg_t", "no_fg", "mixed_same",
                                    "mixed_rand", "mixed_next"}
    # the in9 classes of a 1000-class tree: some, not all, of its 40 images
    assert 0 < row["sources_accepted"] == row["variants"]["original"]["samples"] < 40
    assert row["bytes_total"] == sum(v["bytes"] for v in row["variants"].values()) > 0
    assert row["images_per_s_per_core"] > 0 and row["peak_rss_mib"] > row["baseline_peak_rss_mib"] / 2 > 0
    projection = row["projection"]
    assert math.isclose(projection["accepted_fraction"], row["sources_accepted"] / 40, rel_tol=1e-3)
    # more cores, less time; train is ~11x val
    assert projection["val_64_cores_min"] <= projection["val_16_cores_min"] < projection["train_with_boxes_16_cores_min"]
    assert not (tmp_path / "work" / "imagenet9").exists()


def test_cli_rejects_bad_sizes(capsys):
    assert scale_build.main(["--n", "0"]) == 2
    assert capsys.readouterr().err.startswith("scale_build: error:")
