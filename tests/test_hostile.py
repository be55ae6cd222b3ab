"""The readers' hostile corpus: what a collaborator's shards, a network or a second run can do, and what must happen.

Nothing is written outside ``--out``, nothing in a shard reaches an
interpreter, bytes that cannot be verified are never committed, results are
never silently dropped, no wait exceeds its deadline, and every failure is one
line naming the input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import EpsImagePlugin

from builders.verify import verify
from eval import stream, zoo
from eval.predictions import predictions_path, read_predictions
from pipeline.locks import exclusive
from pipeline.shard_format import MANIFEST_NAME, META_FIELDS, ShardSpecError, StreamError, resolve_shards
from pipeline.shard_format.transport import TransferPolicy
from tests.helpers import free_port, read_scores, score_cli, torchrun_launcher
from tests.shard_fixtures import (
    encode_image,
    make_sample,
    random_pixels,
    read_members,
    tar_bytes,
    write_tar,
    write_variant,
)
from tests.tiny_zoo import TinyNet, tiny_specs

ROOT = Path(__file__).resolve().parent.parent
BASE = ["--random-weights", "--device", "cpu", "--workers", "0", "--batch-size", "2"]
FAST = TransferPolicy(stall_timeout_s=2, grace_s=1, min_rate=2000, retries=2, backoff_s=0.01)


@pytest.fixture(autouse=True)
def _tiny_zoo(tiny_zoo):
    """Scoring tests here use the tiny rows (tests/tiny_zoo.py)."""


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def republish(folder: Path, name: str, raw: bytes) -> None:
    """Replace a shard and make its manifest entry agree: what a hostile sender controls."""
    (folder / name).write_bytes(raw)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    entry = next(e for e in manifest["shards"] if e["name"] == name)
    entry.update(sha256=hashlib.sha256(raw).hexdigest(), bytes=len(raw))
    manifest["totals"]["bytes"] = sum(e["bytes"] for e in manifest["shards"])
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


# --------------------------------------------------------------------------- files outside --out, interpreters


@pytest.mark.parametrize("variant", ["../../escaped", "/tmp/bgcheck-escaped-abs", "original/../../x", "ORIGINAL"])
def test_a_variant_in_a_sample_never_becomes_a_path(tmp_path, variant):
    members = []
    rng = np.random.default_rng(0)
    for i in range(2):
        sample = make_sample(f"k{i}", "original", 7, encode_image(random_pixels(rng, 32)))
        meta = json.loads(sample[f"k{i}.json"])
        meta["variant"] = variant
        sample[f"k{i}.json"] = json.dumps(meta).encode()
        members += list(sample.items())
    write_tar(tmp_path / "shards" / "s.tar", members)
    out = tmp_path / "work" / "out"
    before = files_under(tmp_path)
    assert score_cli("--shards", tmp_path / "shards" / "s.tar", "--models", "tiny_b", "--out", out, *BASE) == 2
    assert score_cli("--shards", tmp_path / "shards" / "s.tar", "--models", "tiny_b", "--out", out, *BASE,
                     "--on-error", "skip") == 0
    created = files_under(tmp_path) - before
    assert all(c == "work" or c.startswith("work/out") for c in created), created
    assert not Path("/tmp/bgcheck-escaped-abs.csv").exists()
    assert read_scores(out)[("tiny_b", "unknown")]["skipped"] == "2"  # counted, not scored, not a file name


@pytest.mark.parametrize("name", ["../evil", "dir/k0", "k0 k1", "_k0"])
def test_a_key_that_is_not_of_the_alphabet_is_refused(tmp_path, name):
    rng = np.random.default_rng(1)
    sample = make_sample("k0", "original", 7, encode_image(random_pixels(rng, 32)))
    members = [(n.replace("k0", name, 1), d) for n, d in sample.items()]
    write_tar(tmp_path / "s.tar", members)
    (ref,) = resolve_shards(str(tmp_path / "s.tar"))
    with pytest.raises(StreamError, match="bad key"):
        list(stream.iter_shard(ref, stream.ReadOptions()))


def test_postscript_in_a_shard_never_reaches_ghostscript(tmp_path, monkeypatch):
    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(1) or 1 / 0)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\nshowpage\n"
    rng = np.random.default_rng(2)
    good = make_sample("k0", "original", 7, encode_image(random_pixels(rng, 32)))
    bad = make_sample("k1", "original", 7, eps)
    folder = tmp_path / "original"
    folder.mkdir()
    write_tar(folder / "original-000000.tar", [*good.items(), *bad.items()])
    (ref,) = resolve_shards(str(folder / "original-000000.tar"))
    with pytest.raises(StreamError, match="k1: undecodable_image: PostScript data"):
        list(stream.iter_shard(ref, stream.ReadOptions()))
    write_variant(tmp_path / "v", "original", n_samples=1, per_shard=1)
    shard = tmp_path / "v" / "original" / "original-000000.tar"
    full = json.dumps({**dict.fromkeys(META_FIELDS), "key": "img0000", "variant": "original", "label": 151,
                       "in9_label": 0}).encode()
    members = [(n, eps if n.endswith(".jpg") else full if n.endswith(".json") else d) for n, d in read_members(shard)]
    republish(tmp_path / "v" / "original", shard.name, tar_bytes(members))
    report = verify(tmp_path / "v" / "original", deep=True)
    assert any("does not decode" in p for p in report.problems), report.problems
    assert opened == []


# --------------------------------------------------------------------------- bytes that cannot be verified


@pytest.fixture
def published(tmp_path) -> Path:
    """Two variants with manifests: 5 + 3 samples in 2 + 1 shards."""
    root = tmp_path / "shards"
    write_variant(root, "original", n_samples=5, per_shard=3, seed=1)
    return root / "original"


def forge(folder: Path) -> str:
    """Change one label in the first shard (the manifest still lists the old hash) and cut its tail."""
    name = "original-000000.tar"
    members = [(n, b"999" if n == "img0001.cls" else d) for n, d in read_members(folder / name)]
    raw = tar_bytes(members)
    (folder / name).write_bytes(raw[: len(raw) - 3000])
    return name


@pytest.mark.parametrize("extra", [["--on-error", "skip"], ["--limit", "1"], ["--on-error", "skip", "--limit", "1"]])
def test_forged_or_cut_bytes_are_never_committed(published, tmp_path, capsys, extra):
    name = forge(published)
    out = tmp_path / "out"
    assert score_cli("--shards", published, "--models", "tiny_b", "--out", out, *BASE, *extra) == 2
    err = capsys.readouterr().err
    assert name in err and len(err.strip().splitlines()) == 1, err
    assert not predictions_path(out, "tiny_b", "original").exists()
    assert not list(out.glob("predictions/*/.parts/original-000000*"))  # the cut shard is not "complete"


def test_limit_still_checks_the_sha256(published, tmp_path, capsys):
    manifest = json.loads((published / MANIFEST_NAME).read_text())
    manifest["shards"][1]["sha256"] = "f" * 64
    (published / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert score_cli("--shards", published, "--models", "tiny_b", "--out", tmp_path / "out", *BASE, "--limit", "1") == 2
    assert "original-000001.tar: sha256" in capsys.readouterr().err


# --------------------------------------------------------------------------- local files that are not files


def test_a_listed_shard_that_is_a_symlink_is_refused(published, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0\n")
    (published / "original-000001.tar").unlink()
    (published / "original-000001.tar").symlink_to(secret)
    assert score_cli("--shards", published, "--models", "tiny_b", "--out", tmp_path / "out", *BASE) == 2
    err = capsys.readouterr().err
    assert "original-000001.tar" in err and "symlink" in err and "root:x" not in err
    report = verify(published)
    assert any("original-000001.tar" in p and "symlink" in p for p in report.problems)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_a_shard_that_is_a_fifo_or_a_device_never_blocks(tmp_path, kind):
    folder = tmp_path / "original"
    folder.mkdir()
    path = folder / "original-000000.tar"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    (ref,) = resolve_shards(str(folder))
    started = time.monotonic()
    with pytest.raises(StreamError, match="not a regular file"):
        list(stream.iter_shard(ref, stream.ReadOptions()))
    assert time.monotonic() - started < 5


# --------------------------------------------------------------------------- the network


def test_a_redirect_to_another_host_is_refused_unless_allowed(published, tmp_path, serve, capsys):
    home, elsewhere = serve(tmp_path / "shards"), serve(tmp_path / "shards")
    for name in ("manifest.json", "original-000000.tar", "original-000001.tar"):  # as a hub sends files to storage
        home.redirects[f"/moved/{name}"] = f"{elsewhere.base}/original/{name}"
    url = f"{home.base}/moved/manifest.json"
    assert score_cli("--shards", url, "--models", "tiny_b", "--out", tmp_path / "out", *BASE) == 2
    err = capsys.readouterr().err
    assert "refusing a redirect to http://127.0.0.1" in err and "--allow-host 127.0.0.1" in err
    assert elsewhere.requests == {}  # never contacted
    with pytest.raises(ShardSpecError, match="redirect"):
        resolve_shards(url)
    # a redirect within the same server is followed; another host only when the user names it
    home.redirects["/same/manifest.json"] = "/original/manifest.json"
    assert len(resolve_shards(f"{home.base}/same/manifest.json")) == 2
    assert score_cli("--shards", url, "--models", "tiny_b", "--out", tmp_path / "out", *BASE,
                     "--allow-host", "127.0.0.1") == 0


def test_a_dropped_connection_is_retried_and_the_bytes_rechecked(published, tmp_path, serve):
    server = serve(tmp_path / "shards")
    for name in ("original-000000.tar", "original-000001.tar"):
        server.drops[f"/original/{name}"] = 1  # the first connection of each shard dies
    url = f"{server.base}/original/manifest.json"
    assert score_cli("--shards", url, "--models", "tiny_b", "--out", tmp_path / "remote", *BASE) == 0
    assert server.requests["/original/original-000000.tar"] == 2
    assert score_cli("--shards", published, "--models", "tiny_b", "--out", tmp_path / "local", *BASE) == 0
    remote = read_predictions(predictions_path(tmp_path / "remote", "tiny_b", "original"))
    local = read_predictions(predictions_path(tmp_path / "local", "tiny_b", "original"))
    assert remote.keys.tolist() == local.keys.tolist() and remote.pred.tolist() == local.pred.tolist()


@pytest.mark.timeout(60)
def test_a_dripping_server_is_given_up_on_within_the_deadline(published, tmp_path, serve):
    server = serve(tmp_path / "shards")
    server.drips["/original/original-000000.tar"] = 0.2  # five bytes a second, forever in effect
    started = time.monotonic()
    with pytest.raises(StreamError, match="too slow"):
        list(stream.samples(f"{server.base}/original/manifest.json", policy=FAST))
    assert time.monotonic() - started < 10
    started = time.monotonic()
    report_args = (f"{server.base}/original/manifest.json",)
    report = verify(*report_args, policy=FAST)
    assert any("too slow" in p for p in report.problems) and time.monotonic() - started < 10


def test_an_endless_manifest_is_refused_at_its_bound(tmp_path, serve):
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / MANIFEST_NAME).write_bytes(b" " * (17 << 20))  # the server sends more than any manifest
    server = serve(tmp_path)
    with pytest.raises(ShardSpecError, match="larger than"):
        resolve_shards(f"{server.base}/big/manifest.json", policy=FAST)


# --------------------------------------------------------------------------- bounds and types


def test_verify_reports_a_bounded_number_of_lines_per_shard(tmp_path):
    members = []
    for i in range(300):  # 300 samples, each without its label
        members += [(f"k{i:04d}.jpg", b"x"), (f"k{i:04d}.json", b"{}")]
    folder = write_variant(tmp_path, "original", n_samples=1, per_shard=1)
    republish(folder, "original-000000.tar", tar_bytes(members))
    report = verify(folder)
    lines = [p for p in report.problems if p.startswith("original/original-000000.tar")]
    assert 20 <= len(lines) <= 21 and "more problem" in lines[-1]


@pytest.mark.parametrize(("edit", "problem"), [
    (lambda m: {**m, "variant": "original", "nest": json.loads("[" * 50 + "]" * 50)}, None),  # harmless: scored
    (lambda m: "[" * 100_000 + "]" * 100_000, ".json is not JSON (RecursionError)"),
    (lambda m: {**m, "label": None}, ".cls says 7, .json label is 'None'"),
    (lambda m: {**m, "label": [7]}, ".cls says 7, .json label is '[7]'"),
    (lambda m: {**m, "label": 1e400}, ".cls says 7, .json label is 'inf'"),
    (lambda m: {**m, "in9_label": 10**30}, ".json in9_label '10000000000000000000' is not -1..8"),
    (lambda m: {**m, "key": {"nested": True}}, ".json key is \"{'nested': True}\""),
], ids=["extra-field", "nested-100000", "label-null", "label-list", "label-1e400", "in9-1e30", "key-object"])
def test_bad_value_types_are_one_line_sample_problems(tmp_path, edit, problem, capsys):
    rng = np.random.default_rng(3)
    members = []
    for i in range(2):
        sample = make_sample(f"k{i}", "original", 7, encode_image(random_pixels(rng, 32)))
        if i == 1:
            meta = edit(json.loads(sample["k1.json"]))
            sample["k1.json"] = (meta if isinstance(meta, str) else json.dumps(meta)).encode()
        members += list(sample.items())
    write_tar(tmp_path / "s.tar", members)
    args = ["--shards", tmp_path / "s.tar", "--models", "tiny_b", *BASE]
    rc = score_cli(*args, "--out", tmp_path / "strict")
    err = capsys.readouterr().err.strip()
    if problem is None:  # an extra field the format does not define is no problem: both samples are scored
        assert rc == 0 and "error" not in err, err
        assert read_scores(tmp_path / "strict")[("tiny_b", "original")]["n"] == "2"
        assert read_scores(tmp_path / "strict")[("tiny_b", "original")]["skipped"] == "0"
        return
    assert rc == 2 and err == f"error: shard s.tar, key k1: {problem}", err
    assert not (tmp_path / "strict" / "scores.csv").exists()
    assert score_cli(*args, "--out", tmp_path / "skip", "--on-error", "skip") == 0
    row = read_scores(tmp_path / "skip")[("tiny_b", "original")]
    assert row["skipped"] == "1" and row["n"] == "1", row  # counted, not scored
    assert read_predictions(predictions_path(tmp_path / "skip", "tiny_b", "original")).keys.tolist() == ["k0"]


# --------------------------------------------------------------------------- two runs, kills


def test_a_second_evaluation_on_the_same_out_stops_with_one_line(published, tmp_path, capsys):
    out = tmp_path / "out"
    with exclusive(out, "evaluation"):
        assert score_cli("--shards", published, "--models", "tiny_b", "--out", out, *BASE) == 2
    err = capsys.readouterr().err.strip()
    assert "in use by another evaluation" in err and "\n" not in err
    assert score_cli("--shards", published, "--models", "tiny_b", "--out", out, *BASE) == 0  # the lock died with it


class Killed(BaseException):
    pass


@pytest.mark.parametrize("unlink_dies_at", [1, 2, 3])
def test_a_kill_between_the_ledger_and_the_parts_loses_no_row(tmp_path, monkeypatch, unlink_dies_at):
    root = tmp_path / "shards"
    write_variant(root, "original", n_samples=7, per_shard=2, seed=4)
    args = ["--shards", root / "original", "--models", "tiny_a,tiny_b", *BASE]
    assert score_cli(*args, "--out", tmp_path / "clean") == 0
    real_unlink = Path.unlink
    calls = [0]

    def dying_unlink(self, *a, **kw):
        if ".parts" in self.parts:
            calls[0] += 1
            if calls[0] == unlink_dies_at:  # predictions and ledgers written, some parts already removed
                raise Killed
        return real_unlink(self, *a, **kw)

    monkeypatch.setattr(Path, "unlink", dying_unlink)
    with pytest.raises(Killed):
        score_cli(*args, "--out", tmp_path / "out")
    monkeypatch.setattr(Path, "unlink", real_unlink)
    assert score_cli(*args, "--out", tmp_path / "out") == 0
    for model in ("tiny_a", "tiny_b"):
        got = read_predictions(predictions_path(tmp_path / "out", model, "original"))
        want = read_predictions(predictions_path(tmp_path / "clean", model, "original"))
        assert got.keys.tolist() == want.keys.tolist() and len(got) == 7
        assert got.pred.tolist() == want.pred.tolist()


def test_a_rebuilt_shard_replaces_only_its_own_rows(tmp_path):
    root = tmp_path / "shards"
    folder = write_variant(root, "original", n_samples=6, per_shard=2, seed=5)
    args = ["--shards", folder, "--models", "tiny_b", "--out", tmp_path / "out", *BASE]
    assert score_cli(*args) == 0
    before = read_predictions(predictions_path(tmp_path / "out", "tiny_b", "original"))
    name = "original-000001.tar"
    members = [(n, d) for n, d in read_members(folder / name)]
    rng = np.random.default_rng(99)
    members = [(n, encode_image(random_pixels(rng, 32)) if n.endswith(".jpg") else d) for n, d in members]
    republish(folder, name, tar_bytes(members))  # new pixels under the same keys
    assert score_cli(*args) == 0
    after = read_predictions(predictions_path(tmp_path / "out", "tiny_b", "original"))
    assert after.keys.tolist() == before.keys.tolist()  # nothing lost, nothing twice
    shard_of = dict(zip(after.keys, after.shard, strict=True))
    changed = {k for k, a, b in zip(after.keys, after.top5.tolist(), before.top5.tolist(), strict=True) if a != b}
    assert changed and all(shard_of[k].startswith(name) for k in changed)


def test_results_made_with_other_settings_are_set_aside_never_overwritten(published, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--shards", published, "--models", "tiny_b", "--out", out, *BASE]
    assert score_cli(*args) == 0
    full = read_predictions(predictions_path(out, "tiny_b", "original"))
    capsys.readouterr()
    assert score_cli(*args, "--limit", "1") == 0  # a smoke run into the production folder
    assert "were replaced; the old ones are kept in" in capsys.readouterr().err
    kept = read_predictions(out / "predictions" / "tiny_b" / ".replaced" / "original-1.csv")
    assert kept.keys.tolist() == full.keys.tolist() and len(full) == 5
    assert len(read_predictions(predictions_path(out, "tiny_b", "original"))) == 2


def test_a_moved_shard_folder_is_the_same_shards(published, tmp_path, capsys):
    out = tmp_path / "out"
    assert score_cli("--shards", published, "--models", "tiny_b", "--out", out, *BASE) == 0
    moved = Path(shutil.copytree(published, tmp_path / "elsewhere" / "original"))
    capsys.readouterr()
    assert score_cli("--shards", moved, "--models", "tiny_b", "--out", out, *BASE) == 0
    assert "read " not in capsys.readouterr().out  # nothing rescored: the manifest's sha256 names the shards
    assert len(read_predictions(predictions_path(out, "tiny_b", "original"))) == 5


def test_a_rebuild_into_the_same_folder_supersedes_the_old_shards(tmp_path):
    root = tmp_path / "shards"
    write_variant(root, "original", n_samples=6, per_shard=2, seed=7)  # three shards
    out = tmp_path / "out"
    assert score_cli("--shards", root / "original", "--models", "tiny_b", "--out", out, *BASE) == 0
    shutil.rmtree(root / "original")
    write_variant(root, "original", n_samples=6, per_shard=3, seed=7)  # the same images in two shards
    assert score_cli("--shards", root / "original", "--models", "tiny_b", "--out", out, *BASE) == 0
    got = read_predictions(predictions_path(out, "tiny_b", "original"))
    assert sorted(got.keys.tolist()) == [f"img{i:04d}" for i in range(6)]  # no key twice, none lost
    assert {s.rsplit("-", 1)[0] for s in got.shard} == {"original-000000.tar", "original-000001.tar"}


# --------------------------------------------------------------------------- device memory, failing models


def oom_above(limit: int):
    """A tiny net that raises the CUDA out-of-memory error for batches larger than ``limit``."""

    class OomNet(TinyNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > limit:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return super().forward(x)

    def factory(spec, *, pretrained, weights_dir):
        return OomNet(zlib.crc32(b"tiny_b"))  # tiny_b's weights: the same predictions, in smaller batches

    return factory


def test_out_of_device_memory_backs_off_to_a_batch_that_fits(published, tmp_path):
    spec = dataclasses.replace(tiny_specs()["tiny_b"], id="oom_net")
    with zoo.registered(spec, factory=oom_above(2)):
        args = ["--shards", published, "--random-weights", "--device", "cpu", "--workers", "0", "--batch-size", "8"]
        assert score_cli(*args, "--models", "oom_net,tiny_b", "--out", tmp_path / "out") == 0
    rows = read_scores(tmp_path / "out")
    assert rows[("oom_net", "original")]["batch_size"] == "2" and rows[("oom_net", "original")]["error"] == ""
    assert rows[("tiny_b", "original")]["batch_size"] == ""
    got = read_predictions(predictions_path(tmp_path / "out", "oom_net", "original"))
    want = read_predictions(predictions_path(tmp_path / "out", "tiny_b", "original"))
    assert got.pred.tolist() == want.pred.tolist() and len(got) == 5


def test_a_model_that_still_fails_is_an_error_row_and_the_sweep_goes_on(published, tmp_path, capsys):
    spec = dataclasses.replace(tiny_specs()["tiny_b"], id="never_fits")
    with zoo.registered(spec, factory=oom_above(0)):
        rc = score_cli("--shards", published, "--models", "never_fits,tiny_a", "--out", tmp_path / "out", *BASE)
    assert rc == 1
    err = capsys.readouterr().err
    assert "never_fits" in err and "error column" in err.splitlines()[-1]
    rows = read_scores(tmp_path / "out")
    assert "OutOfMemoryError" in rows[("never_fits", "original")]["error"] and rows[("never_fits", "original")]["n"] == ""
    assert rows[("tiny_a", "original")]["n"] == "5" and rows[("tiny_a", "original")]["error"] == ""
    assert not predictions_path(tmp_path / "out", "never_fits", "original").exists()


# --------------------------------------------------------------------------- torchrun


@pytest.mark.timeout(240)
def test_a_rank_that_fails_takes_every_rank_down_with_one_line(tmp_path):
    root = tmp_path / "shards"
    folder = write_variant(root, "original", n_samples=6, per_shard=2, seed=6)
    raw = (folder / "original-000001.tar").read_bytes()  # rank 1's shard
    (folder / "original-000001.tar").write_bytes(raw[:2000])
    launcher = torchrun_launcher(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(launcher), "--shards", str(folder), "--models", "tiny_b",
           "--out", str(tmp_path / "out"), *BASE]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 2, proc.stderr[-3000:]  # one line from each rank
    assert any("original-000001.tar" in line for line in ours) and any("another rank failed" in line for line in ours)
    assert "eval/score.py" not in proc.stderr  # no traceback from our code on any rank


# --------------------------------------------------------------------------- builder inputs


def test_a_second_build_on_the_same_out_stops_with_one_line(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with exclusive(out, "build"):
        proc = subprocess.run([sys.executable, "-m", "builders.make_shards", "--variant", "original", "--out",
                               str(out), "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
    assert proc.returncode == 2 and "in use by another build" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.timeout(180)
def test_killing_a_build_takes_its_workers_down(tmp_path):
    psutil = pytest.importorskip("psutil")
    from bench.imagenet_tree import make_val_tree

    images, boxes = make_val_tree(tmp_path / "src", 120, size_choices=((500, 375),))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "builders.make_shards", "--source", "imagenet-val", "--images",
                             str(images), "--annotations", str(boxes), "--out", str(out), "--variant", "all",
                             "--workers", "2", "--shard-size", "60", "--no-progress"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*/.*.tmp")):  # the workers are writing shards
            assert time.monotonic() < deadline and proc.poll() is None, "the build did not start"
            time.sleep(0.05)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)]
        assert workers
        proc.send_signal(signal.SIGKILL)  # the main process only, as an OOM killer or a cluster would
        proc.wait(timeout=10)
        gone, alive = psutil.wait_procs(workers, timeout=20)
        assert not alive, [p.pid for p in alive]
    finally:
        with contextlib.suppress(Exception):
            os.killpg(proc.pid, signal.SIGKILL)

