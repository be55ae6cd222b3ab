"""Issue 13's hostile inputs that tests/test_hostile.py left unproven: each test is named after its guarantee.

A sample's variant never overrides its manifest's; a key the format cannot
hold is named, never scored quietly; bad options, unreachable schedulers and
inputs that yield nothing are one line and exit 2; weak manifests and
replaced local shards never reuse results quietly; shared manifests name no
local path; a strip texture, a changed texture folder and an input swapped
for a FIFO mid-build are each built right, rebuilt, or refused without a
hang.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.imagenet_tree import make_val_tree, write_voc_xml
from builders import make_shards
from eval.predictions import predictions_path, read_predictions
from pipeline.shard_format import MANIFEST_NAME, REJECTED_NAME
from pipeline.variants import VARIANTS
from tests.bad_inputs import WNID, make_bad_val_tree
from tests.helpers import free_port, read_scores, score_cli
from tests.shard_fixtures import (
    encode_image,
    make_sample,
    random_pixels,
    read_members,
    tar_bytes,
    write_manifest,
    write_tar,
    write_variant,
)

ROOT = Path(__file__).resolve().parent.parent
BASE = ["--random-weights", "--device", "cpu", "--workers", "0", "--batch-size", "2"]
FRAME = ["--size", "32", "--resize", "40", "--shard-size", "4", "--no-progress"]


@pytest.fixture(autouse=True)
def _tiny_zoo(tiny_zoo):
    """Scoring tests here use the tiny rows (tests/tiny_zoo.py)."""


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def republish(folder: Path, name: str, raw: bytes) -> None:
    """Replace a shard and make its manifest entry agree: what a hostile sender controls."""
    (folder / name).write_bytes(raw)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    entry = next(e for e in manifest["shards"] if e["name"] == name)
    entry.update(sha256=hashlib.sha256(raw).hexdigest(), bytes=len(raw))
    manifest["totals"]["bytes"] = sum(e.get("bytes") or 0 for e in manifest["shards"])
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


def one_line(text: str) -> str:
    """The one line a failing command printed (the test fails if there were more, or none)."""
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def published(out: Path) -> dict[str, bytes]:
    """Every file a user is handed (shards, manifests, rejected lists, _info.json), by relative path."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob("*/*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(out).parts)}


def build_main(*argv: object) -> int:
    return make_shards.main([str(a) for a in argv])


def report_main(*argv: object) -> int:
    from eval.report import cli as report_cli

    return report_cli.main([str(a) for a in argv])


def val_args(images: Path, boxes: Path, out: Path, *extra: object) -> list[object]:
    return ["--source", "imagenet-val", "--images", images, "--annotations", boxes, "--out", out, *FRAME, *extra]


# --------------------------------------------------------------------------- a sample's variant and key


@pytest.mark.parametrize("claimed", ["mixed_rand", "../../escaped", "/tmp/bgcheck-gaps-escaped"])
def test_a_sample_variant_that_disagrees_with_its_manifest_is_one_line_naming_shard_and_key(
        tmp_path, capsys, claimed):
    folder = write_variant(tmp_path / "shards", "original", n_samples=4, per_shard=2, seed=8)
    name = "original-000001.tar"

    def claim(member: str, data: bytes) -> bytes:
        if member != "img0003.json":
            return data
        return json.dumps({**json.loads(data), "variant": claimed}).encode()

    republish(folder, name, tar_bytes([(n, claim(n, d)) for n, d in read_members(folder / name)]))
    out = tmp_path / "work" / "out"
    before = files_under(tmp_path)
    args = ["--shards", folder, "--models", "tiny_b", "--out", out, *BASE]
    capsys.readouterr()
    assert score_cli(*args) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"error: shard {name}, key img0003: .json variant"), err
    # skipped under the manifest's variant: the sample's claim names no file and no results row
    assert score_cli(*args, "--on-error", "skip") == 0
    rows = read_scores(out)
    assert set(rows) == {("tiny_b", "original")}, set(rows)
    assert rows[("tiny_b", "original")]["n"] == "3" and rows[("tiny_b", "original")]["skipped"] == "1"
    assert sorted(p.name for p in (out / "predictions" / "tiny_b").glob("*.csv")) == ["original.csv"]
    created = files_under(tmp_path) - before
    assert all(c == "work" or c.startswith("work/out") for c in created), created
    assert not Path("/tmp/bgcheck-gaps-escaped.csv").exists() and not (tmp_path / "escaped.csv").exists()


def test_a_key_with_a_dot_in_a_shard_without_manifest_is_named_in_a_warning_never_scored(tmp_path, capsys):
    rng = np.random.default_rng(9)
    members = []
    for key in ("k0", "a.b", "k2"):  # a.b.jpg, a.b.cls, a.b.json: webdataset's key would be "a"
        members += list(make_sample(key, "original", 7, encode_image(random_pixels(rng, 32))).items())
    write_tar(tmp_path / "shards" / "s.tar", members)
    out = tmp_path / "out"
    capsys.readouterr()
    assert score_cli("--shards", tmp_path / "shards" / "s.tar", "--models", "tiny_b", "--out", out, *BASE) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "s.tar" in warnings[0] and "a.b.jpg" in warnings[0], err
    assert read_predictions(predictions_path(out, "tiny_b", "original")).keys.tolist() == ["k0", "k2"]
    assert read_scores(out)[("tiny_b", "original")]["n"] == "2"


# --------------------------------------------------------------------------- one-line errors, exit 2


@pytest.fixture
def val_tree(tmp_path) -> tuple[Path, Path]:
    return make_val_tree(tmp_path / "src", 4, size_choices=((64, 48),))


@pytest.mark.parametrize("tool", ["builders.make_shards", "eval.score", "eval.report"])
def test_out_naming_an_existing_file_is_one_line_exit_2(tmp_path, capsys, val_tree, tool):
    target = tmp_path / "taken"
    target.write_bytes(b"someone's file\n")
    if tool == "builders.make_shards":
        rc = build_main(*val_args(*val_tree, target, "--variant", "original"))
    elif tool == "eval.score":
        folder = write_variant(tmp_path / "shards", "original", n_samples=2, per_shard=2)
        rc = score_cli("--shards", folder, "--models", "tiny_b", "--out", target, *BASE)
    else:
        folder = write_variant(tmp_path / "shards", "original", n_samples=2, per_shard=2)
        assert score_cli("--shards", folder, "--models", "tiny_b", "--out", tmp_path / "results", *BASE) == 0
        capsys.readouterr()
        rc = report_main(tmp_path / "results", "--out", target, "--bootstrap", "0", "--gallery-size", "0")
    captured = capsys.readouterr()
    assert rc == 2
    err = one_line(captured.err)
    assert str(target) in err and "is a file, not a folder" in err, err
    assert target.read_bytes() == b"someone's file\n"


@pytest.mark.parametrize("backend", [[], ["--backend", "loky"]])
def test_scheduler_without_backend_dask_is_one_line_exit_2(tmp_path, capsys, val_tree, backend):
    out = tmp_path / "out"
    rc = build_main(*val_args(*val_tree, out, "--variant", "original", "--scheduler", "tcp://127.0.0.1:8786",
                              *backend))
    assert rc == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith("make_shards: error: --scheduler is for --backend dask"), err
    assert not out.exists()  # refused before anything was built


@pytest.mark.parametrize(("main", "argv", "bad"), [
    (score_cli, ["--device", "tpu"], "'tpu'"),
    (score_cli, ["--on-error", "ignore"], "'ignore'"),
    (build_main, ["--format", "gif"], "'gif'"),
    (build_main, ["--source", "imagenet-test"], "'imagenet-test'"),
    (report_main, ["results", "--label-space", "in21k"], "'in21k'"),
], ids=["score-device", "score-on-error", "build-format", "build-source", "report-label-space"])
def test_an_invalid_choice_is_exactly_one_line_exit_2(capsys, main, argv, bad):
    with pytest.raises(SystemExit) as stop:
        main(*argv)
    captured = capsys.readouterr()
    assert stop.value.code == 2
    err = one_line(captured.err)
    assert "invalid choice" in err and bad in err and "usage:" not in err, err
    assert captured.out == ""


@pytest.mark.timeout(120)
def test_an_unreachable_dask_scheduler_is_one_line_exit_2_within_15_s(tmp_path, val_tree):
    pytest.importorskip("dask.distributed")
    images, boxes = val_tree
    out = tmp_path / "out"
    script = (
        "import sys, time\n"
        "import dask.distributed\n"
        "from builders.make_shards import main\n"
        "started = time.monotonic()\n"
        "rc = main(sys.argv[1:])\n"
        "print(f'{time.monotonic() - started:.3f}')\n"
        "sys.exit(rc)\n"
    )
    argv = [str(a) for a in val_args(images, boxes, out, "--variant", "original", "--backend", "dask",
                                     "--scheduler", f"tcp://127.0.0.1:{free_port()}")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=100)
    assert proc.returncode == 2, proc.stderr
    err = one_line(proc.stderr)
    assert err.startswith("make_shards: error: cannot reach the Dask scheduler tcp://127.0.0.1:"), err
    assert float(proc.stdout.strip().splitlines()[-1]) < 15
    assert not list(out.glob("*/*.tar"))


# --------------------------------------------------------------------------- nothing accepted is an error


def _empty_images(tmp_path, images, boxes):
    (tmp_path / "empty").mkdir()
    return ["--source", "imagenet-val", "--images", tmp_path / "empty", "--annotations", boxes]


def _nothing_at_all(tmp_path, images, boxes):
    (tmp_path / "empty").mkdir()
    (tmp_path / "no-boxes").mkdir()
    return ["--source", "imagenet-val", "--images", tmp_path / "empty", "--annotations", tmp_path / "no-boxes"]


def _annotations_matching_no_image(tmp_path, images, boxes):
    for xml in (boxes / "val").glob("*.xml"):
        xml.rename(xml.with_name(f"other_{xml.name}"))
    return ["--source", "imagenet-val", "--images", images, "--annotations", boxes]


def _flat_folder_as_train(tmp_path, images, boxes):
    return ["--source", "imagenet-train", "--images", images, "--annotations", boxes]


def _flat_folder_as_train_without_boxes(tmp_path, images, boxes):
    return ["--source", "imagenet-train", "--images", images]


def _segm_on_box_only(tmp_path, images, boxes):
    return ["--source", "imagenet-val", "--images", images, "--annotations", boxes, "--mask", "segm"]


@pytest.mark.parametrize(("inputs", "named"), [
    (_empty_images, "most often rejected as missing_image (4)"),
    (_nothing_at_all, "no input images found"),
    (_annotations_matching_no_image, "most often rejected as missing_annotation (4)"),
    (_flat_folder_as_train, "most often rejected as unknown_wnid (4)"),
    (_flat_folder_as_train_without_boxes, "most often rejected as missing_annotation (4)"),
    (_segm_on_box_only, "most often rejected as bad_segmentation (4)"),
], ids=lambda v: v.__name__.strip("_") if callable(v) else None)
def test_a_build_that_accepts_nothing_is_one_line_naming_the_most_common_rejection(
        tmp_path, capsys, val_tree, inputs, named):
    args = inputs(tmp_path, *val_tree)
    capsys.readouterr()
    rc = build_main(*args, "--out", tmp_path / "out", *FRAME, "--variant", "original")
    captured = capsys.readouterr()
    assert rc == 2
    err = one_line(captured.err)
    assert err.startswith("make_shards: error: ") and named in err, err
    if "rejected as" in named:
        assert "no sample accepted for original" in err
    assert not list((tmp_path / "out").glob("*/*.tar"))


def _empty_folder(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    return ["--shards", tmp_path / "empty"]


def _manifest_listing_no_shard(tmp_path, monkeypatch):
    (tmp_path / "original").mkdir()
    write_manifest(tmp_path / "original", "original", [])
    return ["--shards", tmp_path / "original"]


def _no_shards_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no --shards, and no shards/ under the working folder
    return []


def _an_empty_spec(tmp_path, monkeypatch):
    return ["--shards", " "]


@pytest.mark.parametrize("shards", [_empty_folder, _manifest_listing_no_shard, _no_shards_anywhere, _an_empty_spec],
                         ids=lambda f: f.__name__.strip("_"))
def test_scoring_an_empty_shard_list_is_one_line_exit_2(tmp_path, capsys, monkeypatch, shards):
    args = shards(tmp_path, monkeypatch)
    capsys.readouterr()
    assert score_cli(*args, "--models", "tiny_b", "--out", tmp_path / "out", *BASE) == 2
    captured = capsys.readouterr()
    assert one_line(captured.err).startswith("error: ") and "shard" in captured.err, captured.err
    assert not (tmp_path / "out" / "scores.csv").exists()


# --------------------------------------------------------------------------- weak manifests, replaced shards


@pytest.mark.parametrize("dropped", [("sha256",), ("bytes",), ("sha256", "bytes")])
def test_a_manifest_entry_without_sha256_or_bytes_is_scored_with_a_warning_naming_it(tmp_path, capsys, dropped):
    folder = write_variant(tmp_path / "shards", "original", n_samples=5, per_shard=3, seed=10)
    capsys.readouterr()
    assert score_cli("--shards", folder, "--models", "tiny_b", "--out", tmp_path / "strong", *BASE) == 0
    assert "WARNING" not in capsys.readouterr().err  # a complete manifest scores quietly
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    for field in dropped:
        del manifest["shards"][1][field]
    manifest["totals"].pop("bytes", None)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert score_cli("--shards", folder, "--models", "tiny_b", "--out", tmp_path / "weak", *BASE) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "original-000001.tar" in warnings[0] and "unverified" in warnings[0], warnings
    assert read_scores(tmp_path / "weak")[("tiny_b", "original")]["n"] == "5"


@pytest.mark.parametrize("change", ["size", "mtime"])
def test_a_local_shard_without_manifest_whose_bytes_change_is_rescored(tmp_path, capsys, change):
    folder = write_variant(tmp_path / "shards", "original", n_samples=6, per_shard=3, seed=11, manifest=False)
    out = tmp_path / "out"
    args = ["--shards", folder, "--models", "tiny_b", *BASE]
    assert score_cli(*args, "--out", out) == 0
    capsys.readouterr()
    assert score_cli(*args, "--out", out) == 0
    assert "read " not in capsys.readouterr().out  # unchanged shards: nothing read again
    shard = folder / "original-000000.tar"
    st = os.stat(shard)
    if change == "size":  # new pixels under the same keys, the old modification time put back
        rng = np.random.default_rng(123)
        noisy = lambda: encode_image(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))  # noqa: E731
        members = [(n, noisy() if n.endswith(".jpg") else d) for n, d in read_members(shard)]
        raw = tar_bytes(members)
        assert len(raw) != st.st_size
        shard.write_bytes(raw)
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:  # the same bytes written again later (a re-download): only the modification time differs
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert score_cli(*args, "--out", out) == 0
    assert "read 3 images" in capsys.readouterr().out  # that shard, and only it, was scored again
    assert score_cli(*args, "--out", tmp_path / "fresh") == 0
    got = read_predictions(predictions_path(out, "tiny_b", "original"))
    want = read_predictions(predictions_path(tmp_path / "fresh", "tiny_b", "original"))
    assert got.keys.tolist() == want.keys.tolist() and len(got) == 6
    assert got.top5.tolist() == want.top5.tolist() and got.p_true.tolist() == want.p_true.tolist()


# --------------------------------------------------------------------------- what the builder publishes


def test_the_same_tree_built_from_two_folders_publishes_identical_files_naming_neither(tmp_path):
    outs, roots = [], [tmp_path / "alice" / "data", tmp_path / "bob" / "nested" / "data"]
    for root in roots:
        corpus = make_bad_val_tree(root)
        os.mkfifo(corpus.images / "fifo.JPEG")  # refused when probed: a detail the builder itself writes
        write_voc_xml(corpus.annotations / "val" / "fifo.xml", "fifo", (48, 48), [(WNID, (1, 1, 40, 40))])
        textures = root / "textures"
        textures.mkdir()
        for i, colour in enumerate(((200, 30, 30), (30, 200, 30))):
            Image.new("RGB", (40 + 8 * i, 40), colour).save(textures / f"t{i}.png")
        out = root / "out"
        assert build_main(*val_args(corpus.images, corpus.annotations, out, "--variant", ",".join(VARIANTS),
                                    "--textures", textures, "--with-masks")) == 0
        outs.append(out)
    first, second = published(outs[0]), published(outs[1])
    assert sorted(first) == sorted(second) and first == second  # every manifest, rejected list and shard
    names = {Path(n).name for n in first}
    assert {MANIFEST_NAME, REJECTED_NAME} <= names and any(n.endswith(".tar") for n in first)
    rejected = {r["key"]: r for r in map(json.loads, (outs[0] / "original" / REJECTED_NAME).read_text().splitlines())}
    assert len(rejected) >= 10  # details are where local paths used to leak
    assert rejected["fifo"]["detail"] == "fifo.JPEG: not a regular file"
    for data in first.values():
        for where in (tmp_path, *roots, *(r.parent for r in roots)):
            assert os.fsencode(where) not in data


def _strip_texture_build(tmp_path: Path, shape: tuple[int, int]) -> dict:
    """A texture build whose only texture is a ``shape`` (width, height) PNG, in a fresh process: its memory."""
    images, boxes = make_val_tree(tmp_path / "src", 4, size_choices=((64, 48),))
    textures = tmp_path / "textures"
    textures.mkdir()
    strip = np.linspace(0, 255, max(shape), dtype=np.uint8)
    pixels = np.stack([strip, 255 - strip, strip // 2], axis=-1).reshape(shape[1], shape[0], 3)
    Image.fromarray(pixels).save(textures / "strip.png")
    script = (
        "import json, resource, sys\n"
        "import joblib, tqdm\n"
        "from builders.make_shards import build, parse_args\n"
        "config, _ = parse_args(sys.argv[1:])\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "manifest = build(config, progress=False)['texture']\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps({'grew_kb': after - before, 'samples': manifest.totals.samples,\n"
        "                  'textures': list(manifest.textures or ())}))\n"
    )
    argv = ["--source", "imagenet-val", "--images", str(images), "--annotations", str(boxes), "--out",
            str(tmp_path / "out"), "--variant", "texture", "--textures", str(textures), "--size", "96",
            "--resize", "96", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(240)
@pytest.mark.parametrize("shape", [(1, 20000), (20000, 1)], ids=["1x20000", "20000x1"])
def test_a_strip_texture_is_built_within_a_frame_of_memory(tmp_path, shape):
    # resized whole, the strip would be 96 x 1.92 M pixels: over 550 MB as uint8 alone
    got = _strip_texture_build(tmp_path, shape)
    assert got["samples"] == 4 and got["textures"] == ["strip.png"]
    assert got["grew_kb"] < 200 * 1024, got


def _texture_tree(root: Path) -> tuple[Path, Path, Path]:
    images, boxes = make_val_tree(root / "src", 8, size_choices=((64, 48),))
    textures = root / "textures"
    textures.mkdir()
    for i, colour in enumerate(((200, 30, 30), (30, 200, 30))):
        Image.new("RGB", (48, 48), colour).save(textures / f"t{i}.png")
    return images, boxes, textures


@pytest.mark.parametrize("change", ["rewritten", "added", "removed"])
def test_a_resumed_build_rebuilds_texture_shards_when_the_textures_folder_changes(tmp_path, change):
    images, boxes, textures = _texture_tree(tmp_path)
    out = tmp_path / "out"
    args = val_args(images, boxes, out, "--variant", "original,texture", "--textures", textures)
    assert build_main(*args) == 0
    before = published(out)
    if change == "rewritten":  # new pixels under the same name (its size and modification time change)
        Image.new("RGB", (56, 56), (20, 20, 220)).save(textures / "t1.png")
    elif change == "added":
        Image.new("RGB", (48, 48), (220, 220, 20)).save(textures / "t2.png")
    else:
        (textures / "t0.png").unlink()
    assert build_main(*args) == 0
    resumed = published(out)
    assert build_main(*val_args(images, boxes, tmp_path / "fresh", "--variant", "original,texture", "--textures",
                                textures)) == 0
    assert resumed == published(tmp_path / "fresh")  # exactly what a build from scratch publishes
    changed = {n for n in resumed if n.endswith(".tar") and resumed[n] != before[n]}
    assert changed and all(n.startswith("texture/") for n in changed), changed


# --------------------------------------------------------------------------- an input swapped for a FIFO


@pytest.mark.timeout(60)
def test_an_input_replaced_by_a_fifo_after_planning_is_a_typed_rejection_without_a_hang(tmp_path, monkeypatch):
    images, boxes = make_val_tree(tmp_path / "src", 6, size_choices=((64, 48),))
    swapped = "ILSVRC2012_val_00000003"
    real_make_plan = make_shards.make_plan

    def plan_then_swap(*args, **kwargs):
        plan = real_make_plan(*args, **kwargs)  # every input probed and planned as a good image ...
        path = images / f"{swapped}.JPEG"
        path.unlink()
        os.mkfifo(path)  # ... then replaced by a FIFO nobody ever writes to
        return plan

    monkeypatch.setattr(make_shards, "make_plan", plan_then_swap)
    out = tmp_path / "out"
    config, _ = make_shards.parse_args([str(a) for a in val_args(images, boxes, out, "--variant",
                                                                 "original,mixed_rand", "--workers", "1")])
    manifests = make_shards.build(config, progress=False)
    for variant in ("original", "mixed_rand"):
        rows = {r["key"]: r for r in map(json.loads, (out / variant / REJECTED_NAME).read_text().splitlines())}
        assert rows[swapped]["reason"] == "undecodable_image", rows
        assert rows[swapped]["detail"] == f"{swapped}.JPEG: not a regular file", rows[swapped]
        assert str(tmp_path) not in json.dumps(rows)
        totals = manifests[variant].totals
        assert totals.samples + totals.rejected == totals.inputs == 6 and totals.samples >= 4
