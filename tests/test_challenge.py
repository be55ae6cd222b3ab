"""The Backgrounds Challenge (``python -m eval.challenge``) on the synthetic world of test_ground_truth.

Two tiny CNNs are trained there: ``fg`` reads the shape (the label's carrier
in its training data), ``bg`` reads the background hue. Here the test images
are built into ``original`` (with masks) and ``only_bg_t`` shards, and the
challenge must (1) find exactly what a direct loop in the style of Noise or
Signal's ``challenge_eval.py`` finds, composite by composite, (2) report what
the world was built to say: ``bg`` is vulnerable on nearly every foreground,
``fg`` on nearly none, and the same check fails when masks, labels or models
are swapped, (3) resume after a kill, split over torchrun ranks, and refuse
foregrounds without masks in one line.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from builders import make_shards
from eval import challenge
from eval.challenge import cli as challenge_cli
from eval.challenge import results
from eval.challenge.search import schedule
from eval.device import In9Mapper
from eval.stream import samples
from pipeline.classes import in9_mapping
from tests.helpers import free_port
from tests.shard_fixtures import read_members, write_manifest, write_tar
from tests.test_ground_truth import (
    FRAME,
    LABELS,
    MEAN,
    SOURCE_SIZE,
    STD,
    _quiet_torchscript,
    registry_row,
    train_model,
    write_registry,
    write_val_tree,
)

ROOT = Path(__file__).resolve().parent.parent
N_IMAGES = 48  # 12 per class; 16 per shard: three foreground and three background shards
BASE = ["--device", "cpu", "--precision", "fp32"]


@functools.cache
def trained(carrier: str) -> torch.nn.Module:
    return train_model(carrier, seed={"fg": 1, "bg": 2}[carrier])


def build(root: Path, images: Path, boxes: Path, variants: tuple[str, ...], masks: bool = True) -> Path:
    shards = root / "shards"
    args = ["--source", "imagenet-val", "--images", str(images), "--annotations", str(boxes), "--out", str(shards),
            "--size", str(FRAME), "--resize", str(SOURCE_SIZE), "--seed", "0", "--shard-size", "16", "--no-progress"]
    for v in variants:
        args += ["--variant", v]
    assert make_shards.main(args + (["--with-masks"] if masks else [])) == 0
    return shards


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("challenge-world")
    models = {"fg": trained("fg"), "bg": trained("bg")}
    (root / "zoo").mkdir()
    registry = write_registry(root / "zoo", models)
    images, boxes = write_val_tree(root / "imagenet", N_IMAGES, seed=3)
    shards = build(root, images, boxes, ("original", "only_bg_t"))
    return {"root": root, "models": models, "registry": registry, "shards": shards, "images": images,
            "boxes": boxes}


def run_challenge(world: dict, out: Path, *extra: str, fg: Path | None = None, bg: Path | None = None,
                  registry: Path | None = None, models: str = "fg,bg") -> int:
    args = ["--foregrounds", str(fg or world["shards"] / "original"),
            "--backgrounds", str(bg or world["shards"] / "only_bg_t"),
            "--registry", str(registry or world["registry"]), "--models", models, "--out", str(out), *BASE, *extra]
    with _quiet_torchscript():
        return challenge.main(args)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def foregrounds(out: Path, model: str) -> dict[str, dict[str, str]]:
    return {r["key"]: r for r in results.read_foregrounds(out, model)}


# ---------------------------------------------------------------- an independent loop, in their style


def their_predictions(model: torch.nn.Module, fg, backgrounds: list[np.ndarray]) -> np.ndarray:
    """ImageNet-9 predictions on ``bg * (1 - mask) + mask * fg`` for a list of backgrounds, as their code
    computes them: float composites, normalised, the 1000-way argmax mapped through in_to_in9."""
    mapping = np.asarray(in9_mapping())
    mean = np.asarray(MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(STD, np.float32).reshape(1, 3, 1, 1)
    image = fg.image.numpy().astype(np.float32)
    mask = (fg.mask.numpy() > 127).astype(np.float32)[None]
    comp = np.stack([bg * (1 - mask) + mask * image for bg in backgrounds])
    with torch.no_grad():
        return mapping[model(torch.from_numpy((comp / 255.0 - mean) / std)).argmax(1).numpy()]


def their_loop(model: torch.nn.Module, world: dict, batch: int = 32) -> dict[str, tuple[int | None, int | None]]:
    """Noise or Signal's challenge written out: every foreground against the backgrounds in order, in batches
    of 32, stopping at the first misclassified composite (an IN-9 prediction of -1 is wrong too).
    Returns key -> (index of the first fooling background or None, the prediction then)."""
    backgrounds = [s.image.numpy().astype(np.float32) for s in samples(str(world["shards"] / "only_bg_t"))]
    found: dict[str, tuple[int | None, int | None]] = {}
    for fg in samples(str(world["shards"] / "original"), masks=True):
        found[fg.key] = (None, None)
        for start in range(0, len(backgrounds), batch):
            pred = their_predictions(model, fg, backgrounds[start : start + batch])
            wrong = np.flatnonzero(pred != fg.in9_label)
            if wrong.size:
                found[fg.key] = (start + int(wrong[0]), int(pred[wrong[0]]))
                break
    return found


def background_keys(world: dict) -> list[str]:
    return [s.key for s in samples(str(world["shards"] / "only_bg_t"))]


def test_matches_their_loop_composite_by_composite(world, tmp_path):
    out = tmp_path / "out"
    assert run_challenge(world, out, "--batch-size", "7") == 0
    keys = background_keys(world)
    for model in ("fg", "bg"):
        ours = foregrounds(out, model)
        theirs = their_loop(world["models"][model], world)
        assert ours.keys() == theirs.keys()
        for key, (first, pred) in theirs.items():
            row = ours[key]
            assert row["vulnerable"] == ("1" if first is not None else "0"), (model, key)
            assert row["fooled_by"] == (keys[first] if first is not None else ""), (model, key)
            assert int(row["tried"]) == (first + 1 if first is not None else len(keys)), (model, key)
            assert int(row["pred"]) == (pred if pred is not None else -1), (model, key)
    # Both outcomes occur, so the comparison saw vulnerable and robust foregrounds alike.
    vulnerable = [r["vulnerable"] for m in ("fg", "bg") for r in foregrounds(out, m).values()]
    assert "0" in vulnerable and "1" in vulnerable


def test_exhaustive_equals_early_stop_and_counts_every_pair(world, tmp_path):
    early, full = tmp_path / "early", tmp_path / "full"
    assert run_challenge(world, early, "--batch-size", "256") == 0
    assert run_challenge(world, full, "--batch-size", "5", "--exhaustive") == 0
    bgs = list(samples(str(world["shards"] / "only_bg_t")))
    fgs = list(samples(str(world["shards"] / "original"), masks=True))
    pixels = [b.image.numpy().astype(np.float32) for b in bgs]
    for model in ("fg", "bg"):
        assert foregrounds(early, model) == foregrounds(full, model)
        matrix = np.stack([their_predictions(world["models"][model], f, pixels) for f in fgs])
        labels = np.asarray([f.in9_label for f in fgs])
        rows = read_csv(results.challenge_dir(full) / model / results.BACKGROUNDS_NAME)
        assert [r["key"] for r in rows] == [b.key for b in bgs]
        for j, (bg, row) in enumerate(zip(bgs, rows, strict=True)):
            others = labels != bg.in9_label
            assert int(row["trials"]) == int(others.sum())
            assert int(row["hits"]) == int((matrix[others, j] == bg.in9_label).sum()), (model, bg.key)
            assert int(row["fooled"]) == int((matrix[:, j] != labels).sum()), (model, bg.key)
        strongest = read_csv(results.challenge_dir(full) / model / results.STRONGEST_NAME)
        for c in {r["class"] for r in strongest}:
            rates = [float(r["attack_success_rate"]) for r in strongest if r["class"] == c]
            best = max(float(r["attack_success_rate"]) for r in rows if r["in9_label"] == c and r["trials"] != "0")
            assert rates == sorted(rates, reverse=True) and rates[0] == best
    n_pairs = len(fgs) * len(bgs)
    assert int(results.read_summary(full)["bg"]["composites"]) == n_pairs
    # Early stop: the bg model is fooled almost at once, so it costs a small share of the pairs.
    assert int(results.read_summary(early)["bg"]["composites"]) < n_pairs / 4


# ---------------------------------------------------------------- ground truth, and the check failing on swaps


def check_ground_truth(out: Path) -> dict[str, float]:
    """What the world was built to say: the background reader falls to nearly every background, the shape
    reader to nearly none. Returns the challenge accuracies (%)."""
    summary = results.read_summary(out)
    acc = {m: float(summary[m]["challenge_accuracy"]) for m in ("fg", "bg")}
    assert acc["bg"] < 10.0, ("bg is vulnerable on nearly every foreground", acc)
    assert acc["fg"] > 80.0, ("fg survives nearly every background", acc)
    for m in ("fg", "bg"):  # the interval holds the value and is inside [0, 100]
        assert 0.0 <= float(summary[m]["ci_low"]) <= acc[m] <= float(summary[m]["ci_high"]) <= 100.0
        assert int(summary[m]["foregrounds"]) == N_IMAGES
    return acc


def test_ground_truth(world, tmp_path):
    out = tmp_path / "out"
    assert run_challenge(world, out) == 0
    acc = check_ground_truth(out)
    # The background that fooled bg is of another class, and bg answered that class: it followed the background.
    rows = foregrounds(out, "bg").values()
    assert all(r["fooled_by_in9_label"] != r["in9_label"] for r in rows)
    assert sum(r["pred"] == r["fooled_by_in9_label"] for r in rows) >= 0.9 * len(rows)
    assert acc["fg"] - acc["bg"] > 70.0


def rewrite_variant(src: Path, dst: Path, change) -> Path:
    """A copy of a variant folder with every sample's members passed through ``change(index, members)``."""
    dst.mkdir(parents=True)
    entries, index = [], 0
    for tar in sorted(src.glob("*.tar")):
        by_key: dict[str, dict[str, bytes]] = {}
        for name, data in read_members(tar):
            key, _, ext = name.partition(".")
            by_key.setdefault(key, {})[ext] = data
        members = []
        for key, sample in by_key.items():
            members += [(f"{key}.{ext}", data) for ext, data in change(index, sample).items()]
            index += 1
        sha, nbytes = write_tar(dst / tar.name, members)
        entries.append({"name": tar.name, "sha256": sha, "bytes": nbytes, "count": len(by_key)})
    config = json.loads((src / "manifest.json").read_text())["config"]
    write_manifest(dst, "original", entries, config)
    return dst


def inverted_mask(_: int, sample: dict[str, bytes]) -> dict[str, bytes]:
    import io

    mask = np.asarray(Image.open(io.BytesIO(sample["mask.png"])))
    buf = io.BytesIO()
    Image.fromarray((255 - mask).astype(np.uint8)).save(buf, format="PNG")
    return {**sample, "mask.png": buf.getvalue()}


def relabelled(label_of):
    """A ``change`` that gives sample i the ImageNet class ``label_of(i, label)`` in both .cls and .json."""

    def change(i: int, sample: dict[str, bytes]) -> dict[str, bytes]:
        meta = json.loads(sample["json"])
        label = label_of(i, int(sample["cls"]))
        meta["label"], meta["in9_label"] = label, in9_mapping()[label]
        return {**sample, "cls": str(label).encode(), "json": json.dumps(meta).encode()}

    return change


def shifted_label(_: int, label: int) -> int:
    return LABELS[(LABELS.index(label) + 1) % len(LABELS)]


def test_check_fails_when_masks_labels_or_models_are_swapped(world, tmp_path):
    original = world["shards"] / "original"
    swaps = {
        "masks inverted": {"fg": rewrite_variant(original, tmp_path / "inverted", inverted_mask)},
        "labels shifted": {"fg": rewrite_variant(original, tmp_path / "shifted", relabelled(shifted_label))},
    }
    swapped = tmp_path / "swapped.json"
    rows = [registry_row("fg", str(Path(world["registry"]).parent / "bg.pt"), 0),
            registry_row("bg", str(Path(world["registry"]).parent / "fg.pt"), 0)]
    swapped.write_text(json.dumps({"format": 1, "note": "fg and bg swapped", "models": rows}))
    swaps["models swapped"] = {"registry": swapped}
    for what, change in swaps.items():
        out = tmp_path / what.replace(" ", "-")
        assert run_challenge(world, out, **change) == 0, what
        with pytest.raises(AssertionError):
            check_ground_truth(out)


def test_foregrounds_outside_imagenet9_are_counted_not_searched(world, tmp_path, capsys):
    outside = 518  # crash helmet: not one of the 370 ImageNet-9 classes
    fg = rewrite_variant(world["shards"] / "original", tmp_path / "some-outside",
                         relabelled(lambda i, label: outside if i % 4 == 0 else label))
    out = tmp_path / "out"
    assert run_challenge(world, out, fg=fg, models="fg") == 0
    summary = results.read_summary(out)["fg"]
    assert (int(summary["foregrounds"]), int(summary["outside_label_space"])) == (N_IMAGES - 12, 12)
    assert "12 foreground(s) outside the 370 ImageNet-9 classes were left out" in capsys.readouterr().err
    assert run_challenge(world, tmp_path / "in1k", "--label-space", "in1k", fg=fg, models="fg") == 0
    in1k = results.read_summary(tmp_path / "in1k")["fg"]
    assert (int(in1k["foregrounds"]), int(in1k["outside_label_space"])) == (N_IMAGES, 0)


# ---------------------------------------------------------------- resume, torchrun, bad input


def test_resume_after_a_kill_searches_each_foreground_once(world, tmp_path, monkeypatch, capsys):
    reference = tmp_path / "reference"
    assert run_challenge(world, reference) == 0
    out = tmp_path / "out"

    class Killed(Exception):
        pass

    def die_after_first(ref) -> None:
        raise Killed(ref.name)

    monkeypatch.setattr(challenge_cli, "after_shard_hook", die_after_first)
    with pytest.raises(Killed):
        run_challenge(world, out)
    monkeypatch.setattr(challenge_cli, "after_shard_hook", None)
    parts = {m: list((results.challenge_dir(out) / m / results.PARTS_DIR).glob("*.json")) for m in ("fg", "bg")}
    assert [p.name.startswith("original-000000") for ps in parts.values() for p in ps] == [True, True]
    committed = sum(json.loads(ps[0].read_text())["composites"] for ps in parts.values())
    total = sum(int(results.read_summary(reference)[m]["composites"]) for m in ("fg", "bg"))
    capsys.readouterr()
    assert run_challenge(world, out) == 0
    # The resumed run scored only what the killed one had not committed, and the results are the same.
    assert f"scored {total - committed} composites" in capsys.readouterr().out
    for model in ("fg", "bg"):
        assert foregrounds(out, model) == foregrounds(reference, model)
    assert run_challenge(world, out) == 0  # everything committed: nothing is searched again
    assert "composites in" not in capsys.readouterr().out


def test_other_settings_are_set_aside_not_overwritten(world, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_challenge(world, out, models="fg") == 0
    assert run_challenge(world, out, "--label-space", "in1k", models="fg") == 0
    kept = list((results.challenge_dir(out) / "fg" / results.REPLACED_DIR).glob("*.json"))
    assert len(kept) == 3  # one per foreground shard
    assert "were replaced; the old ones are kept" in capsys.readouterr().err
    assert results.read_summary(out)["fg"]["label_space"] == "in1k"


def test_torchrun_two_ranks_equal_one(world, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert run_challenge(world, reference) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "eval.challenge",
           "--foregrounds", str(world["shards"] / "original"), "--backgrounds", str(world["shards"] / "only_bg_t"),
           "--registry", str(world["registry"]), "--models", "fg,bg", "--out", str(out), *BASE]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # foreground shards 0 and 2 (16 + 16) to rank 0, shard 1 to rank 1
    assert "rank 0/2: searched 32 foregrounds" in proc.stderr
    assert "rank 1/2: searched 16 foregrounds" in proc.stderr
    for model in ("fg", "bg"):
        assert foregrounds(out, model) == foregrounds(reference, model)


def test_foregrounds_without_masks_are_a_one_line_error(world, tmp_path, capsys):
    plain = build(tmp_path, world["images"], world["boxes"], ("original",), masks=False)
    rc = run_challenge(world, tmp_path / "out", fg=plain / "original", models="fg")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and "\n" not in err
    assert "--with-masks" in err and "no masks" in err


def test_missing_default_shards_are_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert challenge.main(["--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "shards/original" in err


def test_bad_options_are_one_line_errors(world, tmp_path, capsys):
    assert run_challenge(world, tmp_path / "out", "--batch-size", "0") == 2
    assert "--batch-size" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert run_challenge(world, tmp_path / "file") == 2
    assert "is a file" in capsys.readouterr().err


# ---------------------------------------------------------------- the pieces


def test_schedule_walks_each_foreground_through_the_backgrounds_in_order():
    next_bg = np.array([0, 3, 7])
    fg, bg, start = schedule(next_bg, [0, 1, 2], n_backgrounds=8, batch_size=12, start=0)
    # runs: as long as what each withstood (at least 1), at most 12 // 3 = 4, at most what is left
    assert fg.tolist() == [0, 1, 1, 1, 2] and bg.tolist() == [0, 3, 4, 5, 7]
    fg, bg, start = schedule(np.zeros(5, np.int64), [0, 1, 2, 3, 4], n_backgrounds=8, batch_size=3, start=3)
    assert fg.tolist() == [3, 4, 0] and bg.tolist() == [0, 0, 0] and start == 1


def test_nine_way_heads_answer_in_imagenet9():
    mapper = In9Mapper(torch.device("cpu"))
    logits = torch.tensor([[0.0, 3.0, 1.0, 0, 0, 0, 0, 0, 0], [5.0, 0, 0, 0, 0, 0, 0, 0, 1.0]])
    assert mapper.predict(logits, logits.argmax(1), "map-argmax").tolist() == [1, 0]
    wide = torch.zeros(2, 10)
    assert (mapper.predict(wide, wide.argmax(1), "map-argmax") < -1).all()  # neither head: not computed
