"""Smoke tests of the challenge benchmarks: both sides run, agree, and every figure is reported.

Speed targets are not asserted (they depend on the machine); the benchmarks print them.
"""

from __future__ import annotations

import contextlib
import io
import json
import math

from bench import challenge_bench, gpu_eval
from eval import zoo


def test_challenge_bench_ours_and_theirs_agree(tmp_path):
    before = list(zoo.load_registry())
    results = json.loads(json.dumps(challenge_bench.run_bench(10, 10, 64, challenge_bench.SMALL_MODEL, 32, 0)))
    assert results["same_vulnerable_foregrounds"] is True
    for side in ("ours", "theirs"):
        assert results[side]["foregrounds"] == 10 and results[side]["composites"] > 0
        assert math.isfinite(results[side]["wall_s"]) and results[side]["wall_s"] > 0
    # a fifth of the foregrounds are of the superclass the biased model answers: they survive, the rest fall
    assert results["ours"]["challenge_accuracy"] == results["theirs"]["challenge_accuracy"] == 20.0
    # they stop at the end of a batch of 32 (here: after all 10 backgrounds), we at the composite that fools
    assert results["theirs"]["composites"] == 100 and results["ours"]["composites"] < 100
    assert results["their_composites_over_ours"] > 1 and isinstance(results["target"]["pass"], bool)
    assert list(zoo.load_registry()) == before  # the biased model was registered for the run only


def test_gpu_eval_quick_runs_the_challenge_on_the_cpu():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert gpu_eval.main(["--quick", "--no-sweep", "--device", "cpu"]) == 0
    summary = json.loads(out.getvalue())
    assert not any(model_id.endswith("_one_superclass") for model_id in zoo.load_registry())
    challenge = summary["challenge"]
    assert challenge["foregrounds"] == challenge["backgrounds"] == 10
    assert challenge["challenge_accuracy"] == 20.0 and challenge["composites"] > 0
    assert challenge["theirs_projected_wall_s"] > 0 and challenge["speedup_projected"] > 0
