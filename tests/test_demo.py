"""``python -m eval.demo`` end to end: the main job on the embedded photos with the bundled real model.

Build (all nine variants with masks), score, the Backgrounds Challenge, the report: each stage's
outputs are where the final message says, and they agree with each other.
"""

from __future__ import annotations

import csv
from pathlib import Path

from eval import demo
from eval.challenge import results as challenge_results


def test_demo_runs_the_whole_chain(tmp_path, capsys):
    work = tmp_path / "demo"
    assert demo.main(["--work", str(work), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    page = work / "report" / "report.html"
    assert f"open in a browser: {page.resolve()}" in out
    with open(work / "results" / "scores.csv", newline="", encoding="utf-8") as fh:
        variants = {row["variant"] for row in csv.DictReader(fh)}
    assert len(variants) == 9
    summary = challenge_results.read_summary(work / "results")["tf_efficientnet_lite0"]
    foregrounds = challenge_results.read_foregrounds(work / "results", "tf_efficientnet_lite0")
    assert summary["label_space"] == "in1k" and int(summary["foregrounds"]) == len(foregrounds) > 0
    vulnerable = sum(r["vulnerable"] == "1" for r in foregrounds)
    assert int(summary["vulnerable"]) == vulnerable
    # a real model on real photos: some foregrounds survive every background, some do not
    assert 0 < vulnerable < len(foregrounds)
    html = page.read_text(encoding="utf-8")
    assert 'id="challenge' in html and "fig_challenge" in html
    assert Path(work / "report" / "fig_challenge.png").stat().st_size > 0
