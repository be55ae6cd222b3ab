"""The streaming evaluator end to end: python -m eval.score on tiny generated shards."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval import decode, score, zoo
from eval.predictions import predictions_path, read_predictions
from pipeline.classes import in9_mapping
from pipeline.shard_format import MANIFEST_NAME
from tests.helpers import free_port, read_scores, score_cli, torchrun_launcher
from tests.shard_fixtures import read_members, write_tar, write_variant
from tests.tiny_zoo import tiny_zoo_registered

ROOT = Path(__file__).resolve().parent.parent
MODELS = "tiny_a,tiny_b"  # test registry rows below; decisive logits, so predictions differ per image
BASE = ["--random-weights", "--device", "cpu", "--workers", "0", "--batch-size", "2"]


@pytest.fixture(autouse=True)
def _tiny_zoo(tiny_zoo):
    """Every test here sees the tiny rows (tests/tiny_zoo.py) beside the real registry."""


@pytest.fixture
def shards(tmp_path) -> Path:
    """Two variants, 2 + 1 shards, 5 + 3 samples of 32 px."""
    root = tmp_path / "shards"
    write_variant(root, "original", n_samples=5, per_shard=3, seed=1)
    write_variant(root, "mixed_rand", n_samples=3, per_shard=3, seed=2)
    return root


def spec_args(root: Path) -> list[str]:
    return ["--shards", str(root / "original"), "--shards", str(root / "mixed_rand")]


def scores_rows(out: Path) -> list[dict[str, str]]:
    """scores.csv rows in file order (sorted by model, variant)."""
    return list(read_scores(out).values())


def all_predictions(out: Path) -> dict[tuple[str, str], list[tuple]]:
    found = {}
    for model in MODELS.split(","):
        for variant in ("original", "mixed_rand"):
            p = read_predictions(predictions_path(out, model, variant))
            found[(model, variant)] = list(
                zip(p.keys, p.label, p.pred, map(tuple, p.top5), p.p_true, p.in9_label, p.in9_pred, strict=True)
            )
    return found


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted single-process run that other tests compare against."""
    root = tmp_path_factory.mktemp("ref") / "shards"
    write_variant(root, "original", n_samples=5, per_shard=3, seed=1)
    write_variant(root, "mixed_rand", n_samples=3, per_shard=3, seed=2)
    out = root.parent / "out"
    with tiny_zoo_registered():
        assert score_cli(*spec_args(root), "--models", MODELS, "--out", out, *BASE) == 0
    preds = all_predictions(out)
    assert len({row[2] for rows in preds.values() for row in rows}) > 3  # predictions depend on the image
    return out, preds


def test_scores_and_predictions_per_model_and_variant(reference):
    out, preds = reference
    rows = scores_rows(out)
    assert [(r["model"], r["variant"]) for r in rows] == sorted(preds)
    for row in rows:
        got = preds[(row["model"], row["variant"])]
        n = {"original": 5, "mixed_rand": 3}[row["variant"]]
        assert int(row["n"]) == len(got) == n
        assert [g[0] for g in got] == sorted(g[0] for g in got)
        top1 = 100.0 * np.mean([g[1] == g[2] for g in got])
        assert float(row["top1"]) == pytest.approx(top1, abs=1e-3)
        assert row["weights"] == "random" and row["precision"] == "fp32" and row["device"] == "cpu"
        expected_pre = {"tiny_a": ("48", "bicubic", "0.485 0.456 0.406"), "tiny_b": ("32", "bilinear", "0.5 0.5 0.5")}
        assert (row["input_size"], row["interpolation"], row["mean"]) == expected_pre[row["model"]]
        assert row["skipped"] == "0"
        assert float(row["images_per_s"]) > 0
        mapped = [g for g in got if g[5] >= 0]
        assert mapped and row["in9_top1"] != ""
        for g in got:  # map-argmax: superclass of the 1000-way argmax
            assert g[6] == in9_mapping()[g[2]]
    assert not list(out.glob("predictions/*/.parts/*"))


def test_decode_once_for_several_models(shards, tmp_path, monkeypatch):
    calls = []
    real = decode.decode_image

    def counting(data):
        calls.append(len(data))
        return real(data)

    monkeypatch.setattr(decode, "decode_image", counting)
    assert score_cli(*spec_args(shards), "--models", MODELS, "--out", tmp_path / "out", *BASE) == 0
    assert len(calls) == 8  # 5 + 3 samples, two models


class Killed(Exception):
    pass


def test_resume_after_kill_matches_uninterrupted_run(reference, shards, tmp_path, monkeypatch):
    out = tmp_path / "out"
    committed = []

    def die_after_first(sid: str) -> None:
        committed.append(sid)
        raise Killed

    monkeypatch.setattr(score, "after_shard_hook", die_after_first)
    with pytest.raises(Killed):
        score_cli(*spec_args(shards), "--models", MODELS, "--out", out, *BASE)
    assert len(list(out.glob("predictions/*/.parts/*.json"))) == 2  # first shard, both models
    assert not list(out.glob("predictions/*/*.csv"))

    monkeypatch.setattr(score, "after_shard_hook", None)
    calls = []
    real = decode.decode_image
    monkeypatch.setattr(decode, "decode_image", lambda data: calls.append(1) or real(data))
    assert score_cli(*spec_args(shards), "--models", MODELS, "--out", out, *BASE) == 0
    assert len(calls) == 8 - 3  # the committed shard is not read again
    assert all_predictions(out) == reference[1]

    calls.clear()
    assert score_cli(*spec_args(shards), "--models", MODELS, "--out", out, *BASE) == 0
    assert calls == []  # every (model, variant) complete: nothing to read
    assert len(scores_rows(out)) == 4


def test_new_model_on_complete_results_scores_only_that_model(reference, shards, tmp_path):
    out = tmp_path / "out"
    assert score_cli(*spec_args(shards), "--models", "tiny_a", "--out", out, *BASE) == 0
    before = (predictions_path(out, "tiny_a", "original")).stat().st_mtime_ns
    assert score_cli(*spec_args(shards), "--models", MODELS, "--out", out, *BASE) == 0
    assert (predictions_path(out, "tiny_a", "original")).stat().st_mtime_ns == before
    assert all_predictions(out) == reference[1]


def test_key_in_two_shards_is_an_exactly_once_error(tmp_path, capsys):
    root = tmp_path / "shards"
    write_variant(root, "original", n_samples=2, per_shard=2, key_prefix="a", manifest=False)
    other = write_variant(tmp_path / "more", "original", n_samples=2, per_shard=2, key_prefix="a", manifest=False)
    shutil.move(other / "original-000000.tar", root / "original" / "original-000001.tar")
    rc = score_cli("--shards", root / "original", "--models", "tiny_b", "--out", tmp_path / "out", *BASE)
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "a0000" in err and "twice" in err and "\n" not in err


def test_manifest_count_mismatch_is_an_error(shards, tmp_path, capsys):
    manifest_file = shards / "original" / MANIFEST_NAME
    manifest = json.loads(manifest_file.read_text())
    manifest["shards"][1]["count"] = 3
    manifest["totals"]["samples"] = 6
    manifest_file.write_text(json.dumps(manifest))
    rc = score_cli(*spec_args(shards), "--models", "tiny_b", "--out", tmp_path / "out", *BASE)
    assert rc == 2
    assert "original-000001.tar: read 2 samples, manifest says 3" in capsys.readouterr().err


def test_sha_mismatch_refused_unless_no_verify(shards, tmp_path, capsys):
    manifest_file = shards / "mixed_rand" / MANIFEST_NAME
    manifest = json.loads(manifest_file.read_text())
    manifest["shards"][0]["sha256"] = "f" * 64
    manifest_file.write_text(json.dumps(manifest))
    args = [*spec_args(shards), "--models", "tiny_b", "--out", tmp_path / "out", *BASE]
    assert score_cli(*args) == 2
    err = capsys.readouterr().err
    assert "mixed_rand-000000.tar" in err and "sha256" in err
    assert not predictions_path(tmp_path / "out", "tiny_b", "mixed_rand").exists()
    assert score_cli(*args, "--no-verify") == 0
    assert "WARNING" in capsys.readouterr().err
    assert predictions_path(tmp_path / "out", "tiny_b", "mixed_rand").exists()


def test_bad_shard_exit_2_or_skip_counted(tmp_path, capsys):
    folder = write_variant(tmp_path / "shards", "original", n_samples=3, per_shard=3)
    path = folder / "original-000000.tar"
    members = [m for m in read_members(path) if m[0] != "img0001.cls"]
    sha, nbytes = write_tar(path, members)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["shards"][0].update(sha256=sha, bytes=nbytes)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    args = ["--shards", folder, "--models", "tiny_b", "--out", tmp_path / "out", *BASE]
    assert score_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert "original-000000.tar" in err and "img0001" in err and ".cls" in err and "\n" not in err
    assert score_cli(*args, "--on-error", "skip") == 0
    (row,) = scores_rows(tmp_path / "out")
    assert row["n"] == "2" and row["skipped"] == "1"


def test_all_samples_skipped_still_gives_a_row(tmp_path):
    folder = write_variant(tmp_path / "shards", "only_fg", n_samples=2, per_shard=2, manifest=False)
    path = folder / "only_fg-000000.tar"
    write_tar(path, [m for m in read_members(path) if not m[0].endswith(".cls")])
    out = tmp_path / "out"
    assert score_cli("--shards", folder, "--models", "tiny_b", "--on-error", "skip", "--out", out, *BASE) == 0
    (row,) = scores_rows(out)
    assert (row["variant"], row["n"], row["skipped"], row["top1"]) == ("only_fg", "0", "2", "")


def test_limit_scores_at_most_n_per_shard(shards, tmp_path):
    out = tmp_path / "out"
    assert score_cli(*spec_args(shards), "--models", "tiny_b", "--limit", "1", "--out", out, *BASE) == 0
    assert {r["variant"]: r["n"] for r in scores_rows(out)} == {"original": "2", "mixed_rand": "1"}
    # a full run afterwards rescoring everything (limited results are not reused)
    assert score_cli(*spec_args(shards), "--models", "tiny_b", "--out", out, *BASE) == 0
    assert {r["variant"]: r["n"] for r in scores_rows(out)} == {"original": "5", "mixed_rand": "3"}


def test_unknown_model_and_missing_weights_are_one_line_errors(shards, tmp_path, capsys):
    out = tmp_path / "out"
    assert score_cli(*spec_args(shards), "--models", "mobilenet_v3_smal", "--out", out, "--device", "cpu") == 2
    err = capsys.readouterr().err.strip()
    assert "mobilenet_v3_small" in err and "\n" not in err
    assert score_cli(*spec_args(shards), "--models", "squeezenet1_1", "--out", out, "--device", "cpu") == 2
    err = capsys.readouterr().err.strip()
    assert "squeezenet1_1" in err and "--weights-dir" in err and "\n" not in err
    rc = score_cli(*spec_args(shards), "--models", "squeezenet1_1", "--skip-unavailable", "--out", out, "--device", "cpu")
    assert rc == 2 and "no model left" in capsys.readouterr().err


def test_skip_unavailable_scores_the_rest(shards, tmp_path, tiny_zoo):
    def no_weights(spec, *, pretrained, weights_dir):
        raise zoo.WeightsUnavailable("weights for tiny_b not found offline: put tiny_b.pth in --weights-dir")

    out = tmp_path / "out"
    args = [*spec_args(shards), "--models", MODELS, "--out", out, "--device", "cpu", "--workers", "0"]
    with zoo.registered(tiny_zoo["tiny_b"], factory=no_weights, replace=True):
        assert score_cli(*args) == 2
        assert score_cli(*args, "--skip-unavailable") == 0
    assert {r["model"] for r in scores_rows(out)} == {"tiny_a"}


def test_in9_restrict_rule_predicts_a_superclass(shards, tmp_path):
    out = tmp_path / "out"
    assert score_cli(*spec_args(shards), "--models", "tiny_b", "--in9-rule", "restrict", "--out", out, *BASE) == 0
    preds = read_predictions(predictions_path(out, "tiny_b", "original"))
    assert ((preds.in9_pred >= 0) & (preds.in9_pred < 9)).all()
    mapping = np.array(in9_mapping())
    assert (preds.in9_label == mapping[preds.label]).all()


def test_default_spec_is_demo_shards_in_working_folder(shards, tmp_path, monkeypatch):
    monkeypatch.chdir(shards.parent)
    assert score.default_shard_specs() == ["shards/mixed_rand/", "shards/original/"]
    assert score_cli("--models", "mobilenet_v3_small", "--out", "res", *BASE) == 0
    assert {r["variant"] for r in scores_rows(Path("res"))} == {"original", "mixed_rand"}
    monkeypatch.chdir(tmp_path / "shards" / "original")
    assert score_cli("--models", "mobilenet_v3_small", "--out", "res", *BASE) == 2


def test_predictions_match_a_plain_loop(tmp_path):
    """Peer check: the streaming path equals PIL -> ToTensor -> Normalize -> model per image."""
    from torchvision.transforms import functional as TF

    folder = write_variant(tmp_path / "shards", "original", n_samples=6, per_shard=3, size=32, fmt="png")
    out = tmp_path / "out"
    assert score_cli("--shards", folder, "--models", "tiny_b", "--out", out, *BASE) == 0
    got = read_predictions(predictions_path(out, "tiny_b", "original"))
    assert len(got) == 6 and len(set(got.pred)) > 1

    spec = zoo.resolve_models("tiny_b")[0]
    cfg = zoo.preprocess_config(spec)
    model = zoo.build_model(spec, pretrained=False)
    members = {**dict(read_members(folder / "original-000000.tar")), **dict(read_members(folder / "original-000001.tar"))}
    for i, key in enumerate(got.keys):
        image = Image.open(io.BytesIO(members[f"{key}.png"])).convert("RGB")
        x = TF.normalize(TF.to_tensor(image), cfg["mean"], cfg["std"]).unsqueeze(0)
        with torch.inference_mode():
            logits = model(x)[0]
        probs = logits.softmax(dim=0)
        assert logits.topk(5).indices.tolist() == got.top5[i].tolist()
        assert float(probs[got.label[i]]) == pytest.approx(got.p_true[i], rel=1e-4, abs=1e-9)


def test_torchrun_two_processes_equal_one(reference, shards, tmp_path):
    out = tmp_path / "out"
    launcher = torchrun_launcher(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        str(launcher), *spec_args(shards), "--models", MODELS, "--out", str(out), *BASE,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tiny_a" in proc.stdout  # rank 0's summary
    # shards 0, 2 (3 + 3 samples) to rank 0, shard 1 (2 samples) to rank 1
    assert "rank 0/2: read 6 images from 2 shards" in proc.stderr
    assert "rank 1/2: read 2 images from 1 shards" in proc.stderr
    got = all_predictions(out)
    expected = reference[1]
    assert got.keys() == expected.keys()
    for pair, rows in expected.items():
        assert [r[:4] + r[5:] for r in got[pair]] == [r[:4] + r[5:] for r in rows]
        assert [r[4] for r in got[pair]] == pytest.approx([r[4] for r in rows], rel=1e-4)
    assert len(scores_rows(out)) == 4
    assert not list(out.glob("predictions/*/.parts"))
