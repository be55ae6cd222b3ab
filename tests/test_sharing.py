"""Shards shared over the network: build, serve over HTTP, verify and score by URL, and nothing in them runs.

A collaborator's shards and manifest are data. Scoring them through a URL
must give exactly the predictions of the local copy; a manifest fetched from
elsewhere may not name a ``pipe:`` command; tar members other than images,
labels, provenance and masks are never decoded, least of all unpickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from builders.make_shards import build, parse_args
from eval.predictions import predictions_path, read_predictions
from pipeline.shard_format import MANIFEST_NAME
from tests.bad_inputs import make_bad_val_tree
from tests.helpers import score_cli
from tests.http_server import static_server
from tests.shard_fixtures import read_members, tar_bytes

ROOT = Path(__file__).resolve().parent.parent
MODELS = "tiny_a,tiny_b"
BASE = ["--random-weights", "--device", "cpu", "--workers", "0", "--batch-size", "3", "--models", MODELS]


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> tuple[Path, str]:
    """A build of the bad-input corpus, served by ``python -m http.server`` on 127.0.0.1: (folder, base URL)."""
    corpus = make_bad_val_tree(tmp_path_factory.mktemp("bad-src"))
    out = tmp_path_factory.mktemp("site")
    config, _ = parse_args(["--source", "imagenet-val", "--images", str(corpus.images), "--annotations",
                            str(corpus.annotations), "--out", str(out), "--variant", "original,mixed_rand",
                            "--size", "32", "--resize", "40", "--shard-size", "4", "--no-progress"])
    build(config, progress=False)
    with static_server(out) as server:
        yield out, server.base


@pytest.fixture(autouse=True)
def _tiny_zoo(tiny_zoo):
    """Every test here scores the tiny rows (tests/tiny_zoo.py)."""


def predictions(out: Path, variant: str) -> dict[str, list[tuple]]:
    found = {}
    for model in MODELS.split(","):
        p = read_predictions(predictions_path(out, model, variant))
        found[model] = list(zip(p.keys, p.label, p.pred, map(tuple, p.top5), p.p_true, p.in9_label, p.in9_pred,
                                strict=True))
    return found


def verify_cli(target: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "builders.verify", target], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_round_trip_over_http_scores_exactly_like_the_local_copy(served, tmp_path):
    folder, base = served
    url = f"{base}/mixed_rand/{MANIFEST_NAME}"
    checked = verify_cli(url)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.startswith("OK")

    assert score_cli("--shards", url, "--out", tmp_path / "remote", *BASE) == 0
    assert score_cli("--shards", folder / "mixed_rand" / MANIFEST_NAME, "--out", tmp_path / "local", *BASE) == 0
    remote, local = predictions(tmp_path / "remote", "mixed_rand"), predictions(tmp_path / "local", "mixed_rand")
    manifest = json.loads((folder / "mixed_rand" / MANIFEST_NAME).read_text())
    assert all(len(rows) == manifest["totals"]["samples"] for rows in local.values())
    assert remote == local


def test_a_damaged_download_is_refused(served, tmp_path, capsys):
    """A shard that differs from its manifest on the server: verify names it, the evaluator refuses it."""
    folder, base = served
    site = Path(shutil.copytree(folder / "original", folder / "original_damaged"))
    try:
        with tarfile.open(site / "original-000000.tar") as tar:
            first = tar.getmembers()[0]
        assert first.size % 512, "the first member needs padding to flip"
        data = bytearray((site / "original-000000.tar").read_bytes())
        data[first.offset_data + first.size] ^= 0x01  # in the padding: every sample still reads, the bytes differ
        (site / "original-000000.tar").write_bytes(bytes(data))
        url = f"{base}/original_damaged/{MANIFEST_NAME}"
        checked = verify_cli(url)
        assert checked.returncode == 1 and "original-000000.tar" in checked.stdout and "sha256" in checked.stdout
        assert score_cli("--shards", url, "--out", tmp_path / "out", *BASE) == 2
        err = capsys.readouterr().err
        assert "original-000000.tar" in err and "sha256" in err, err
    finally:
        shutil.rmtree(site)


def test_pipe_only_from_the_command_line_never_from_a_fetched_manifest(served, tmp_path, capsys):
    folder, base = served
    marker = tmp_path / "pwned"
    site = folder / "hostile"
    site.mkdir()
    try:
        manifest = json.loads((folder / "mixed_rand" / MANIFEST_NAME).read_text())
        first = dict(manifest["shards"][0])
        manifest["shards"] = [{**first, "name": f"pipe:touch {marker}; cat {folder}/mixed_rand/{first['name']}"}]
        manifest["totals"]["samples"] = first["count"]
        (site / MANIFEST_NAME).write_text(json.dumps(manifest))
        url = f"{base}/hostile/{MANIFEST_NAME}"
        assert score_cli("--shards", url, "--out", tmp_path / "out", *BASE) == 2
        err = capsys.readouterr().err
        assert "pipe:" in err and "refusing" in err, err
        checked = verify_cli(url)
        assert checked.returncode != 0 and "refusing" in checked.stdout + checked.stderr
        assert not marker.exists()
    finally:
        shutil.rmtree(site)

    # the same shard through a pipe: the user typed it, so it runs, and scores like the file itself
    shard = folder / "mixed_rand" / first["name"]
    assert score_cli("--shards", f"pipe:cat {shard}", "--out", tmp_path / "piped", *BASE) == 0
    assert score_cli("--shards", shard, "--out", tmp_path / "plain", *BASE) == 0
    piped, plain = predictions(tmp_path / "piped", "mixed_rand"), predictions(tmp_path / "plain", "mixed_rand")
    assert len(plain["tiny_a"]) == first["count"] and piped == plain


class _Payload:
    """Unpickling this creates ``path``: proof that a reader deserialised a member."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_executable_members_are_never_loaded(served, tmp_path, monkeypatch):
    folder, base = served
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    torch_buf = io.BytesIO()
    torch.save({"x": _Payload(marker)}, torch_buf)
    npy_buf = io.BytesIO()
    np.save(npy_buf, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    site = Path(shutil.copytree(folder / "mixed_rand", folder / "booby_trapped"))
    try:
        name = json.loads((site / MANIFEST_NAME).read_text())["shards"][0]["name"]
        members = read_members(site / name)
        trapped = []
        for member, data in members:
            trapped.append((member, data))
            key, _, ext = member.partition(".")
            if ext == "jpg":  # inside every sample, between its image and its label
                trapped += [(f"{key}.pyd", payload), (f"{key}.pth", torch_buf.getvalue()),
                            (f"{key}.npy", npy_buf.getvalue()), (f"{key}.pickle", payload)]
        trapped.append(("__reduce__.pkl", payload))
        raw = tar_bytes(trapped)
        (site / name).write_bytes(raw)
        manifest = json.loads((site / MANIFEST_NAME).read_text())
        manifest["shards"][0].update(sha256=hashlib.sha256(raw).hexdigest(), bytes=len(raw))
        (site / MANIFEST_NAME).write_text(json.dumps(manifest))

        def refuse(*args, **kwargs):
            raise AssertionError("a shard member was deserialised")

        for module, attr in ((pickle, "loads"), (pickle, "load"), (torch, "load"), (np, "load")):
            monkeypatch.setattr(module, attr, refuse)
        url = f"{base}/booby_trapped/{MANIFEST_NAME}"
        assert score_cli("--shards", url, "--out", tmp_path / "trapped", *BASE) == 0
        monkeypatch.undo()  # the tiny rows are registered, not patched: they stay
        checked = verify_cli(url)
        assert "unexpected member" in checked.stdout  # reported, not read
        assert not marker.exists()
        assert score_cli("--shards", folder / "mixed_rand" / MANIFEST_NAME, "--out", tmp_path / "clean", *BASE) == 0
        assert predictions(tmp_path / "trapped", "mixed_rand") == predictions(tmp_path / "clean", "mixed_rand")
    finally:
        shutil.rmtree(site)
