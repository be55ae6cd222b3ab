"""The evaluator on builder output gone wrong: damaged shards, a SIGKILL mid-run, shards edited after publishing.

Every bad sample is either an error that names its shard and key, or (with
``--on-error skip``) a count in the results; a killed run resumes to the same
predictions; a shard that is not the one its manifest describes is refused.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from builders.make_shards import build, parse_args
from eval.predictions import predictions_path, read_predictions
from pipeline.shard_format import MANIFEST_NAME
from tests.bad_inputs import make_bad_val_tree, png_header_only
from tests.helpers import read_scores, score_cli
from tests.shard_fixtures import read_members, tar_bytes
from tests.tiny_zoo import tiny_zoo_registered

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("original", "mixed_rand")
MODELS = "tiny_a,tiny_b"
BASE = ["--random-weights", "--device", "cpu", "--workers", "0", "--batch-size", "3", "--models", MODELS]
DAMAGED = "original-000001.tar"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The bad-input corpus built into shards (32 px frames, 4 inputs per shard)."""
    corpus = make_bad_val_tree(tmp_path_factory.mktemp("bad-src"))
    out = tmp_path_factory.mktemp("built")
    config, _ = parse_args(["--source", "imagenet-val", "--images", str(corpus.images), "--annotations",
                            str(corpus.annotations), "--out", str(out), "--variant", ",".join(VARIANTS),
                            "--size", "32", "--resize", "40", "--shard-size", "4", "--no-progress"])
    build(config, progress=False)
    return out


@pytest.fixture(autouse=True)
def _tiny_zoo(tiny_zoo):
    """Every test here scores the tiny rows (tests/tiny_zoo.py)."""


def spec_args(root: Path) -> list[str]:
    return [a for v in VARIANTS for a in ("--shards", str(root / v / MANIFEST_NAME))]


def predictions(out: Path) -> dict[tuple[str, str], list[tuple]]:
    found = {}
    for model in MODELS.split(","):
        for variant in VARIANTS:
            p = read_predictions(predictions_path(out, model, variant))
            found[(model, variant)] = list(
                zip(p.keys, p.label, p.pred, map(tuple, p.top5), p.p_true, p.in9_label, p.in9_pred, strict=True)
            )
    return found


@pytest.fixture(scope="module")
def uninterrupted(built, tmp_path_factory) -> dict:
    with tiny_zoo_registered():
        out = tmp_path_factory.mktemp("uninterrupted")
        assert score_cli(*spec_args(built), "--out", out, *BASE) == 0
    preds = predictions(out)
    assert all(preds.values())
    return preds


def rewrite(folder: Path, name: str, members: list[tuple[str, bytes]], raw: bytes | None = None) -> None:
    """Replace a shard and update its manifest entry, as a careless re-publisher would."""
    path = folder / name
    if raw is None:
        raw = tar_bytes(members)
    path.write_bytes(raw)
    import hashlib

    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    entry = next(e for e in manifest["shards"] if e["name"] == name)
    entry.update(sha256=hashlib.sha256(raw).hexdigest(), bytes=len(raw))
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


def keys_in(members: list[tuple[str, bytes]]) -> list[str]:
    return list(dict.fromkeys(name.partition(".")[0] for name, _ in members))


def damage(folder: Path, defect: str) -> tuple[str | None, int]:
    """Damage ``DAMAGED`` in ``folder``; returns (key the error must name or None, samples lost)."""
    path = folder / DAMAGED
    members = read_members(path)
    keys = keys_in(members)
    if defect.startswith("truncated_tar"):  # cut inside a member's data, or inside a header
        raw = path.read_bytes()
        with tarfile.open(path) as tar:
            third = tar.getmembers()[len(members) // 2]
        cut = third.offset_data + 100 if defect.endswith("data") else third.offset + 100
        path.write_bytes(raw[:cut])  # an interrupted download: the manifest still describes the whole shard
        return None, 0  # the key named is one being read; the loss is counted, not listed
    if defect == "missing_cls":
        rewrite(folder, DAMAGED, [m for m in members if m[0] != f"{keys[1]}.cls"])
        return keys[1], 1
    if defect == "undecodable_jpg":
        rewrite(folder, DAMAGED, [(n, b"\xff\xd8 not really a jpeg" * 4 if n == f"{keys[1]}.jpg" else d)
                                  for n, d in members])
        return keys[1], 1
    if defect == "duplicate_key":  # the last sample carries the first one's key
        rewrite(folder, DAMAGED, [(n.replace(keys[-1], keys[0]), d) for n, d in members])
        return keys[0], 1
    if defect == "decompression_bomb":  # a .jpg member whose header claims 30000x30000 pixels
        rewrite(folder, DAMAGED, [(n, png_header_only(30000, 30000) if n == f"{keys[1]}.jpg" else d)
                                  for n, d in members])
        return keys[1], 1
    raise ValueError(defect)


@pytest.mark.parametrize("defect", [
    "truncated_tar_in_data",
    # Python's tarfile reads a header cut short as a clean end of archive: the reader must
    # notice the missing end-of-archive blocks, or a download stopped between samples is lost.
    "truncated_tar_in_header",
    "missing_cls",
    "undecodable_jpg",
    "duplicate_key",
    "decompression_bomb",
])
def test_damaged_shard_is_an_error_naming_shard_and_key_or_a_skip_count(built, tmp_path, capsys, defect):
    root = Path(shutil.copytree(built, tmp_path / "shards"))
    original = json.loads((root / "original" / MANIFEST_NAME).read_text())
    shard_keys = keys_in(read_members(root / "original" / DAMAGED))
    key, lost = damage(root / "original", defect)
    out = tmp_path / "out"
    args = ["--shards", root / "original", "--out", out, *BASE]
    assert score_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error:"), err
    assert DAMAGED in err, err
    assert f"key {key}" in err if key else any(f"key {k}" in err for k in shard_keys), err
    if defect == "decompression_bomb":
        assert "900000000 pixels" in err and "exceeds" in err
    assert not predictions_path(out, "tiny_a", "original").exists()

    if defect.startswith("truncated_tar"):
        # a cut transfer cannot be verified: it contributes nothing whatever --on-error says, and a rerun
        # once the shard is whole again scores it like any other
        assert score_cli(*args, "--on-error", "skip") == 2
        assert DAMAGED in capsys.readouterr().err
        assert not predictions_path(out, "tiny_a", "original").exists()
        shutil.copy(built / "original" / DAMAGED, root / "original" / DAMAGED)
        assert score_cli(*args) == 0
        rows = read_scores(out)
        assert all(int(rows[(m, "original")]["n"]) == original["totals"]["samples"] for m in MODELS.split(","))
        return
    assert score_cli(*args, "--on-error", "skip") == 0
    rows = read_scores(out)
    for model in MODELS.split(","):
        row = rows[(model, "original")]
        assert int(row["n"]) + int(row["skipped"]) == original["totals"]["samples"]
        assert int(row["skipped"]) >= 1
        if lost:
            assert int(row["skipped"]) == lost
        scored = set(read_predictions(predictions_path(out, model, "original")).keys)
        if key is not None and defect != "duplicate_key":
            assert key not in scored


LAUNCHER = """
import os, signal, sys
sys.path.insert(0, {root!r})
from tests.tiny_zoo import install_tiny_zoo
install_tiny_zoo()
from eval import decode as eval_decode, score

what, limit = sys.argv[1], int(sys.argv[2])
seen = [0]

def tick(*_):
    seen[0] += 1
    if seen[0] >= limit:
        os.kill(os.getpid(), signal.SIGKILL)

if what == "shards":
    score.after_shard_hook = tick
else:
    decode = eval_decode.decode_image
    def counting(data):
        tick()
        return decode(data)
    eval_decode.decode_image = counting
sys.exit(score.main(sys.argv[3:]))
"""


@pytest.mark.parametrize("what, limit", [("shards", 2), ("images", 7)])
def test_killed_evaluator_resumes_to_the_same_predictions(built, uninterrupted, tmp_path, what, limit):
    launcher = tmp_path / "score_then_die.py"
    launcher.write_text(LAUNCHER.format(root=str(ROOT)))
    out = tmp_path / "out"
    argv = [*spec_args(built), "--out", str(out), *BASE]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, str(launcher), what, str(limit), *argv], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    parts = list(out.glob("predictions/*/.parts/*.json"))
    assert len(parts) == (2 * (limit - 1) + 2 if what == "shards" else 2)  # every model, per committed shard
    assert not list(out.glob("predictions/*/*.csv"))
    assert score_cli(*argv) == 0
    assert predictions(out) == uninterrupted
    assert not list(out.glob("predictions/*/.parts/*"))


def test_shard_edited_after_its_manifest_is_refused_unless_no_verify(built, uninterrupted, tmp_path, capsys):
    root = Path(shutil.copytree(built, tmp_path / "shards"))
    path = root / "mixed_rand" / "mixed_rand-000000.tar"
    members = read_members(path)
    edited = [(n, reencode(d) if n.endswith(".jpg") else d) for n, d in members]  # same samples, new pixels
    path.write_bytes(tar_bytes(edited))  # same sample count, different bytes; manifest untouched
    out = tmp_path / "out"
    args = [*spec_args(root), "--out", out, *BASE]
    assert score_cli(*args) == 2
    err = capsys.readouterr().err
    assert "mixed_rand-000000.tar" in err and ("sha256" in err or "bytes" in err), err
    assert not predictions_path(out, "tiny_a", "mixed_rand").exists()

    assert score_cli(*args, "--no-verify") == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "--no-verify" in err
    got = predictions(out)
    assert got[("tiny_a", "original")] == uninterrupted[("tiny_a", "original")]
    assert [r[0] for r in got[("tiny_a", "mixed_rand")]] == [r[0] for r in uninterrupted[("tiny_a", "mixed_rand")]]
    assert got[("tiny_a", "mixed_rand")] != uninterrupted[("tiny_a", "mixed_rand")]  # the edit was scored


def reencode(jpeg: bytes) -> bytes:
    """The same picture, brightened and saved again: a plausible edit that changes every byte count."""
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(int)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels + 60, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=70)
    return buf.getvalue()
