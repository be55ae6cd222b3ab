"""End-to-end tests of the shard builder on small generated ImageNet-val trees.

What matters about shards is that they can be handed to someone else and
rebuilt or verified byte for byte: so most tests compare bytes between
builds (worker counts, Dask, an interrupted-then-resumed run) and read the
shards back with readers that know nothing of the builder (``tarfile`` and
plain ``webdataset``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.imagenet_tree import make_val_tree, write_voc_xml
from builders.make_shards import build, parse_args
from pipeline.classes import imagenet_classes, in9_members, to_in9
from pipeline.shard_format import META_FIELDS, Manifest
from pipeline.variants import VARIANT_SPECS, VARIANTS
from tests.shard_fixtures import read_samples

ROOT = Path(__file__).resolve().parent.parent
# Tench, goldfish, golden retriever, tabby cat: four classes, three IN-9 groups.
WNIDS = ("n01440764", "n01443537", "n02099601", "n02123045")
SIZES = ((128, 96), (96, 128), (112, 112))
N_IMAGES = 16
FRAME = ["--size", "64", "--resize", "72", "--shard-size", "4", "--no-progress"]
MIXED_VARIANTS = tuple(v for v, spec in VARIANT_SPECS.items() if spec.partner)


# --------------------------------------------------------------------------- fixtures and helpers


def add_odd_inputs(images: Path, boxes: Path) -> None:
    """Inputs the builder must account for: one rejected everywhere, one only for background variants."""
    # an image without its XML: rejected for every variant
    Image.new("RGB", (100, 80), (120, 60, 30)).save(images / "ILSVRC2012_val_00000901.JPEG", quality=90)
    # a box covering the whole image: no background to keep or tile (and never a partner)
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(images / "ILSVRC2012_val_00000902.JPEG", quality=90)
    write_voc_xml(boxes / "val" / "ILSVRC2012_val_00000902.xml", "ILSVRC2012_val_00000902", (128, 96),
                  [(WNIDS[0], (1, 1, 128, 96))])


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, Path]:
    images, boxes = make_val_tree(tmp_path_factory.mktemp("src"), N_IMAGES, classes=WNIDS, size_choices=SIZES)
    add_odd_inputs(images, boxes)
    return images, boxes


def source_args(tree: tuple[Path, Path]) -> list[str]:
    return ["--source", "imagenet-val", "--images", str(tree[0]), "--annotations", str(tree[1])]


def run_build(tree, out: Path, *extra: str) -> dict[str, Manifest]:
    config, _ = parse_args([*source_args(tree), "--out", str(out), *FRAME, *extra])
    return build(config, progress=False)


@pytest.fixture(scope="module")
def reference(tree, tmp_path_factory) -> tuple[Path, dict[str, Manifest]]:
    """All variants, one worker: the build every other build is compared with."""
    out = tmp_path_factory.mktemp("reference")
    return out, run_build(tree, out, "--variant", "all", "--workers", "1")


def output_files(out: Path, variants=None) -> dict[str, bytes]:
    """Every published file (shards, manifest, rejected list) by relative path; build records excluded."""
    files = {}
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        if variants is not None and folder.name not in variants:
            continue
        for path in sorted(folder.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                files[f"{folder.name}/{path.name}"] = path.read_bytes()
    return files


def metas(folder: Path) -> dict[str, dict]:
    return {k: json.loads(s["json"]) for k, s in read_samples(folder).items()}


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def cli(*args: str, env_extra: dict | None = None, module: str = "builders.make_shards") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


# --------------------------------------------------------------------------- determinism


def test_two_workers_build_byte_identical_shards_and_manifests(tree, reference, tmp_path):
    ref_out, ref_manifests = reference
    manifests = run_build(tree, tmp_path, "--variant", "all", "--workers", "2")
    assert set(manifests) == set(VARIANTS)
    assert manifests == ref_manifests  # no build-time fields: equal JSON
    ref_files, files = output_files(ref_out), output_files(tmp_path)
    assert sorted(files) == sorted(ref_files)
    assert sum(name.endswith(".tar") for name in files) == len(VARIANTS) * 5  # 18 inputs, 4 per shard
    for name in ref_files:
        assert files[name] == ref_files[name], name


@pytest.mark.timeout(240)
def test_dask_cluster_builds_the_same_bytes(tree, reference, tmp_path, capsys):
    distributed = pytest.importorskip("distributed")
    ref_out, _ = reference
    chosen = ("original", "mixed_rand", "texture")
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        run_build(tree, tmp_path, "--variant", ",".join(chosen), "--backend", "dask",
                  "--scheduler", cluster.scheduler_address)
    # the mixed shards were built from the partner cache the Dask workers wrote and read under --out
    assert "make_shards: partner cache: 17 sources" in capsys.readouterr().err
    assert not (tmp_path / ".partner-cache").exists()
    ref_files, files = output_files(ref_out, chosen), output_files(tmp_path)
    assert sorted(files) == sorted(ref_files)
    for name in ref_files:
        assert files[name] == ref_files[name], name


KILL_AFTER_COMPLETIONS = """
import os, signal, sys
import builders.shards as shards
from builders.make_shards import main

limit = int(sys.argv[1])
calls = [0]
record = shards.write_completion

def record_then_die(variant_dir, result):
    record(variant_dir, result)
    calls[0] += 1
    if calls[0] >= limit:
        os.kill(os.getpid(), signal.SIGKILL)

shards.write_completion = record_then_die
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("cache, expected", [
    # without the partner cache a chunk builds both variants together: chunk 0 completes for both,
    # chunk 1 for 'original' only; then SIGKILL mid-chunk
    ("0", ["mixed_rand/mixed_rand-000000.tar", "original/original-000000.tar", "original/original-000001.tar"]),
    # with it, the first pass builds 'original' (and fills the cache) chunk by chunk, mixed_rand comes after
    ("16", ["original/original-000000.tar", "original/original-000001.tar", "original/original-000002.tar"]),
])
def test_killed_build_resumes_to_identical_shards(tree, reference, tmp_path, cache, expected):
    ref_out, _ = reference
    out = tmp_path / "out"
    args = [*source_args(tree), "--out", str(out), *FRAME, "--variant", "original,mixed_rand", "--workers", "1",
            "--partner-cache-limit", cache]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_COMPLETIONS, "3", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    finals = sorted(p.relative_to(out).as_posix() for p in out.glob("*/*.tar"))
    assert finals == expected
    for name in finals:  # nothing partial under a final name
        assert (out / name).read_bytes() == (ref_out / name).read_bytes(), name
    leftovers = [p for p in out.glob("*/*") if p.is_file() and p.suffix != ".tar"]
    temporary = [p for p in leftovers if p.name.startswith(".") and p.name.endswith(".tmp")]
    assert temporary, leftovers  # killed mid-write: the partial file carries a temporary name
    # what else is left is the cache of the chunks whose first pass completed (chunks 0 and 1)
    cached = sorted(p.name for p in leftovers if p not in temporary and p.parent.name == ".partner-cache")
    assert cached == ([] if cache == "0" else
                      ["chunk-000000.bin", "chunk-000000.json", "chunk-000001.bin", "chunk-000001.json"])
    assert len(leftovers) == len(temporary) + len(cached), leftovers
    assert not list(out.glob("*/manifest.json"))
    before = {name: ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) for name in finals}

    rerun = cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    for name, stamp in before.items():  # skipped, not rewritten
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == stamp, name
    assert not [p for p in out.glob("*/.*.tmp")]
    assert not (out / ".partner-cache").exists()
    ref_files = output_files(ref_out, ("original", "mixed_rand"))
    files = output_files(out)
    assert sorted(files) == sorted(ref_files)
    for name in ref_files:
        assert files[name] == ref_files[name], name


def test_changed_inputs_rebuild_stale_shards(tree, tmp_path):
    """A resumed build must not keep a shard whose chunk of the plan changed since it was written."""
    images, boxes = make_val_tree(tmp_path / "src", 8, classes=WNIDS[:2], size_choices=SIZES)
    small = (images, boxes)
    out = tmp_path / "out"
    run_build(small, out, "--variant", "original,mixed_rand")
    # a new image that sorts first shifts every chunk by one key
    Image.new("RGB", (96, 96), (10, 200, 90)).save(images / "ILSVRC2012_val_00000000.JPEG", quality=90)
    write_voc_xml(boxes / "val" / "ILSVRC2012_val_00000000.xml", "ILSVRC2012_val_00000000", (96, 96),
                  [(WNIDS[0], (20, 20, 70, 70))])
    resumed = run_build(small, out, "--variant", "original,mixed_rand")
    fresh = run_build(small, tmp_path / "fresh", "--variant", "original,mixed_rand")
    assert resumed == fresh
    assert output_files(out) == output_files(tmp_path / "fresh")


def test_seed_changes_partners_and_textures_but_not_original_pixels(tree, reference, tmp_path):
    ref_out, _ = reference
    run_build(tree, tmp_path, "--variant", "original,mixed_rand,texture", "--seed", "1")
    ref_orig, new_orig = read_samples(ref_out / "original"), read_samples(tmp_path / "original")
    assert sorted(new_orig) == sorted(ref_orig)
    for key in ref_orig:
        assert np.array_equal(decode(new_orig[key]["jpg"]), decode(ref_orig[key]["jpg"])), key
        assert json.loads(new_orig[key]["json"])["seed"] == 1
    ref_mixed, new_mixed = metas(ref_out / "mixed_rand"), metas(tmp_path / "mixed_rand")
    assert any(new_mixed[k]["bg_key"] != ref_mixed[k]["bg_key"] for k in ref_mixed)
    ref_tex, new_tex = metas(ref_out / "texture"), metas(tmp_path / "texture")
    assert any(new_tex[k]["texture"] != ref_tex[k]["texture"] for k in ref_tex)


# --------------------------------------------------------------------------- contents


def test_manifest_counts_add_up(reference):
    out, manifests = reference
    n_inputs = N_IMAGES + 2
    for variant, m in manifests.items():
        folder = out / variant
        totals = m.totals
        assert totals.inputs == n_inputs
        assert totals.samples + totals.rejected == n_inputs
        raw = (folder / "rejected.jsonl").read_bytes()
        assert m.rejected.count == totals.rejected == len(raw.splitlines())
        assert m.rejected.sha256 == hashlib.sha256(raw).hexdigest()
        rows = [json.loads(line) for line in raw.splitlines()]
        assert sum(m.rejected_reasons.values()) == len(rows)
        rejected = {r["key"]: r["reason"] for r in rows}
        assert rejected["ILSVRC2012_val_00000901"] == "missing_annotation"
        if variant in ("only_bg_b", "only_bg_t", "no_fg"):
            assert rejected["ILSVRC2012_val_00000902"] == "box_too_large"
        else:
            assert "ILSVRC2012_val_00000902" not in rejected
        labels: dict[str, int] = {}
        for entry in m.shards:
            with tarfile.open(folder / entry.name) as tar:
                names = tar.getnames()
                assert entry.count == len(names) / 3
                for name in names:
                    if name.endswith(".cls"):
                        label = tar.extractfile(name).read().decode()
                        labels[label] = labels.get(label, 0) + 1
            assert entry.nbytes == (folder / entry.name).stat().st_size
        assert sum(e.count for e in m.shards) == totals.samples
        assert sum(m.class_histogram.values()) == totals.samples
        assert m.class_histogram == labels
        assert Manifest.from_bytes((folder / "manifest.json").read_bytes(), variant) == m


def test_webdataset_and_tarfile_read_every_member(tree, tmp_path):
    wds = pytest.importorskip("webdataset")
    manifests = run_build(tree, tmp_path, "--variant", "original,mixed_same", "--with-masks")
    for variant, m in manifests.items():
        by_tarfile = read_samples(tmp_path / variant)
        seen = []
        for entry in m.shards:
            url = str(tmp_path / variant / entry.name)
            for sample in wds.WebDataset(url, shardshuffle=False):
                key = sample["__key__"]
                seen.append(key)
                assert {"jpg", "cls", "json", "mask.png"} <= set(sample), sorted(sample)
                assert all(isinstance(sample[e], bytes) for e in ("jpg", "cls", "json", "mask.png"))
                meta = json.loads(sample["json"])
                assert set(META_FIELDS) <= set(meta), set(META_FIELDS) - set(meta)
                assert meta["key"] == key and meta["variant"] == variant
                assert int(sample["cls"]) == meta["label"]
                assert sample["jpg"] == by_tarfile[key]["jpg"]
                mask = np.asarray(Image.open(io.BytesIO(sample["mask.png"])))
                assert mask.shape == (64, 64) and mask.any()
        assert seen == list(by_tarfile) and len(seen) == m.totals.samples > 0


def check_partners(out: Path, level: str) -> int:
    """Each mixed sample's bg_key is an accepted image of the right class relation; returns samples checked."""
    accepted = {k: m["label"] for k, m in metas(out / "original").items()}
    group = (lambda label: to_in9(label)) if level == "in9" else (lambda label: label)
    present = sorted({group(label) for label in accepted.values()})
    checked = 0
    for variant in MIXED_VARIANTS:
        folder = out / variant
        if not folder.is_dir():
            continue
        for key, meta in metas(folder).items():
            bg = meta["bg_key"]
            assert bg in accepted and bg != key, (variant, key, bg)
            assert meta["bg_label"] == accepted[bg]
            own, theirs = group(meta["label"]), group(meta["bg_label"])
            if variant == "mixed_same":
                assert theirs == own, (key, bg)
            elif variant == "mixed_next":
                assert theirs == present[(present.index(own) + 1) % len(present)], (key, bg)
            checked += 1
    return checked


def test_mixed_partners_follow_the_class_relation(reference):
    out, manifests = reference
    assert check_partners(out, "class") == sum(manifests[v].totals.samples for v in MIXED_VARIANTS) > 0
    # the image whose box fills the frame has no background to lend
    for v in MIXED_VARIANTS:
        assert all(m["bg_key"] != "ILSVRC2012_val_00000902" for m in metas(out / v).values())


def in9_tree(root: Path) -> tuple[Path, Path, list[str]]:
    """Two classes of one IN-9 group, one each of two others, and one class outside IN-9."""
    wnids_of = imagenet_classes().wnids
    groups = in9_members()
    in9 = [wnids_of[groups[0][0]], wnids_of[groups[0][1]], wnids_of[groups[1][0]], wnids_of[groups[8][0]]]
    outside = next(wnids_of[i] for i in range(1000) if to_in9(i) < 0)
    images, boxes = make_val_tree(root, 15, classes=[*in9, outside], size_choices=SIZES)
    return images, boxes, in9


def test_partner_level_in9_uses_superclasses(tmp_path):
    images, boxes, _ = in9_tree(tmp_path / "src")
    out = tmp_path / "out"
    run_build((images, boxes), out, "--variant", "original,mixed_same,mixed_next", "--classes", "in9",
              "--partner-level", "in9")
    assert check_partners(out, "in9") > 0
    same = metas(out / "mixed_same")
    # within the two-class group, some partner comes from the other class: the relation is the superclass
    assert any(m["bg_label"] != m["label"] for m in same.values())


def test_recipe_imagenet9(tmp_path):
    images, boxes, in9 = in9_tree(tmp_path / "src")
    out = tmp_path / "out"
    code = cli("--recipe", "data_manifests/recipes/imagenet9.json", *source_args((images, boxes)),
               "--out", str(out), *FRAME)
    assert code.returncode == 0, code.stderr
    recipe = json.loads((ROOT / "data_manifests/recipes/imagenet9.json").read_text())
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(recipe["variants"])
    m = json.loads((out / "original" / "manifest.json").read_text())
    assert m["config"]["classes"] == "in9" and m["config"]["exactly_one_box"] is True
    rejected = [json.loads(line) for line in (out / "original" / "rejected.jsonl").read_text().splitlines()]
    outside = [r for r in rejected if r["reason"] == "class_not_selected"]
    assert len(outside) == 3  # every fifth of 15 images is the non-IN-9 class
    originals = metas(out / "original")
    assert len(originals) == 12
    in9_labels = {imagenet_classes().index_of[w] for w in in9}
    for meta in originals.values():
        assert meta["label"] in in9_labels
        assert meta["in9_label"] == to_in9(meta["label"]) >= 0
    assert check_partners(out, "in9") > 0


def test_recipe_background_check(tree, tmp_path):
    out = tmp_path / "out"
    code = cli("--recipe", "data_manifests/recipes/background_check.json", *source_args(tree), "--out", str(out),
               *FRAME)
    assert code.returncode == 0, code.stderr
    recipe = json.loads((ROOT / "data_manifests/recipes/background_check.json").read_text())
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(recipe["variants"])
    checked = 0
    for sample in read_samples(out / "only_fg").values():
        meta = json.loads(sample["json"])
        assert meta["fill"] == "white"
        pixels = decode(sample["jpg"]).astype(int)
        x0, y0, x1, y1 = (int(v) for v in meta["bbox"])
        outside = np.ones(pixels.shape[:2], bool)
        outside[max(y0 - 2, 0) : y1 + 2, max(x0 - 2, 0) : x1 + 2] = False  # margin for JPEG ringing
        if outside.any():  # (the box of one input fills its frame)
            assert pixels[outside].mean() > 245
            checked += 1
    assert checked >= N_IMAGES // 2
    for meta in metas(out / "texture").values():
        assert meta["texture"].startswith("procedural:")


# --------------------------------------------------------------------------- CLI


def test_cli_missing_images_folder_is_a_one_line_error(tmp_path):
    result = cli("--source", "imagenet-val", "--images", str(tmp_path / "nope"), "--annotations", str(tmp_path),
                 "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope" in lines[0] and "Traceback" not in result.stderr


def test_cli_unknown_variant_is_a_one_line_error(tmp_path):
    result = cli("--variant", "mixed_purple", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "mixed_purple" in lines[0]
    assert not (tmp_path / "out").exists()


def test_cli_builds_the_demo(tmp_path):
    out = tmp_path / "out"
    result = cli("--variant", "mixed_rand", "--out", str(out), "--no-progress",
                 env_extra={"BGCHECK_CACHE": os.environ["BGCHECK_CACHE"]})
    assert result.returncode == 0, result.stderr
    m = json.loads((out / "mixed_rand" / "manifest.json").read_text())
    assert m["source"]["kind"] == "demo" and m["totals"]["samples"] > 0
    assert f"mixed_rand: {m['totals']['samples']} samples" in result.stdout


# --------------------------------------------------------------------------- versioning


def test_a_builder_version_bump_rebuilds_instead_of_keeping_stale_shards(tree, tmp_path, monkeypatch):
    """A rerun after code that changes pixels must not keep shards written by the older code (TFDS habit)."""
    import builders.version

    out = tmp_path / "out"
    first = run_build(tree, out, "--variant", "original")["original"]
    assert first.builder_version == builders.version.BUILDER_VERSION
    assert builders.version.BUILDER_VERSION in builders.version.RELEASE_NOTES
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "original").glob("*.tar")}
    again = run_build(tree, out, "--variant", "original")["original"]  # same code: every shard is kept
    assert {p.name: p.stat().st_mtime_ns for p in (out / "original").glob("*.tar")} == stamps
    assert again == first
    monkeypatch.setattr(builders.version, "BUILDER_VERSION", "99.0.0")
    bumped = run_build(tree, out, "--variant", "original")["original"]
    rewritten = {p.name: p.stat().st_mtime_ns for p in (out / "original").glob("*.tar")}
    assert all(rewritten[name] != stamp for name, stamp in stamps.items())  # every shard rebuilt
    assert bumped.builder_version == "99.0.0" and bumped.config["builder_version"] == "99.0.0"
    assert bumped.config_hash != first.config_hash


def test_local_workers_import_the_chunk_builder_before_their_first_task(tmp_path):
    """loky restarts a worker that grows 300 MB after its first task: the heavy import must come first."""
    import joblib

    from builders.config import BuildConfig
    from builders.jobs import _stop_local_workers, run_jobs

    _stop_local_workers()  # fresh workers
    config = BuildConfig(out=str(tmp_path), workers=2).validate()
    probe = "'builders.shards' in __import__('sys').modules"
    calls = [joblib.delayed(eval)(probe) for _ in range(4)]
    assert run_jobs(config, calls, [1] * 4, "plan", progress=False) == [True] * 4
