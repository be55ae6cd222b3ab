"""The builder on inputs as messy as real ImageNet, and under faults: SIGKILL, a full disk, edited shards.

Nothing may be lost silently: every input is either built (readable odd
files converted to the right pixels) or listed in ``rejected.jsonl`` and the
manifest with a precise reason. A build killed at any point (also while it
fills the partner cache) leaves no partial file under a final name, nothing
a rerun trusts wrongly, and resumes to the bytes of an uninterrupted build.
"""

from __future__ import annotations

import errno
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
from PIL import Image, ImageOps

from builders.config import ConfigError
from builders.make_shards import build, main, parse_args
from builders.partner_cache import CACHE_DIR
from builders.verify import verify
from pipeline.shard_format import MANIFEST_NAME, REJECTED_NAME
from tests.bad_inputs import (
    INSIDE,
    OUTSIDE,
    SECRET,
    Corpus,
    make_bad_coco,
    make_bad_mask_dir,
    make_bad_val_tree,
)
from tests.shard_fixtures import read_samples

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("original", "mixed_rand")
FRAME = ["--size", "32", "--resize", "40", "--shard-size", "4", "--no-progress"]
# frame pixel (x, y) -> source pixel of a 48x48 image: resize 48 -> 40, centre crop 32 (offset 4)
CENTRE, CORNER, LEFT = (16, 16), (1, 1), (1, 16)

# Imported at start-up by the killed build and by each of its worker processes (PYTHONPATH):
# counts tar members written, completed shards, published partner-cache chunks ("cache") or
# cache data files renamed into place but not yet vouched for by their marker ("marker") in a
# shared file and SIGKILLs the whole process group at the N-th, so workers and their parent
# die together like a killed job.
KILL_HOOK = '''
import os
_spec = os.environ.get("BGCHECK_TEST_KILL")
if _spec:
    import signal
    import builders.partner_cache as _cache
    import builders.shards as _shards

    _what, _limit, _counter = _spec.split(":", 2)

    def _tick():
        with open(_counter, "a") as fh:
            fh.write("x")
        if os.path.getsize(_counter) >= int(_limit):
            os.killpg(os.getpgid(0), signal.SIGKILL)

    if _what == "add":
        import tarfile

        _add = tarfile.TarFile.addfile

        def add(self, tarinfo, fileobj=None):
            _tick()
            return _add(self, tarinfo, fileobj)

        tarfile.TarFile.addfile = add
    elif _what == "cache":
        _publish = _shards.publish_cache

        def publish_cache(cache):
            _publish(cache)
            _tick()

        _shards.publish_cache = publish_cache
    elif _what == "marker":
        _write_marker = _cache.atomic_write_text

        def atomic_write_text(path, text):
            _tick()
            return _write_marker(path, text)

        _cache.atomic_write_text = atomic_write_text
    else:
        _record = _shards.write_completion

        def write_completion(variant_dir, result):
            _record(variant_dir, result)
            _tick()

        _shards.write_completion = write_completion
'''


def build_args(corpus: Corpus, out: Path, *extra: str, source: str = "imagenet-val") -> list[str]:
    return ["--source", source, "--images", str(corpus.images), "--annotations", str(corpus.annotations),
            "--out", str(out), *FRAME, *extra]


def cli(args: list[str], env_extra: dict | None = None, new_session: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "builders.make_shards", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, start_new_session=new_session)


def published(out: Path) -> dict[str, bytes]:
    """Every file a user sees (shards, manifests, rejected lists) by relative path; hidden files and folders excluded."""
    return {p.relative_to(out).as_posix(): p.read_bytes()
            for p in sorted(out.glob("*/*")) if p.is_file() and not any(part.startswith(".")
                                                                        for part in p.relative_to(out).parts)}


def write_groups(reference: Path, cached: bool) -> list[tuple[list[str], int]]:
    """The shards one worker writes together, in build order, with their tar members: (shard names, members).

    Without the partner cache a chunk's shards of every variant are written
    together, chunk by chunk; with it, the first pass writes every chunk's
    ``original`` shard, then the second every ``mixed_rand`` shard.
    """
    members = {}
    for variant in VARIANTS:
        for shard in sorted((reference / variant).glob("*.tar")):
            with tarfile.open(shard) as tar:
                members[f"{variant}/{shard.name}"] = len(tar.getmembers())
    n_chunks = len(members) // len(VARIANTS)
    names = [[f"{v}/{v}-{i:06d}.tar" for v in VARIANTS] for i in range(n_chunks)]
    if cached:
        names = [[f"{v}/{v}-{i:06d}.tar"] for v in VARIANTS for i in range(n_chunks)]
    return [(group, sum(members[n] for n in group)) for group in names]


def finished_after(reference: Path, cached: bool, n_members: int) -> list[str]:
    """The shards complete once one worker has written ``n_members`` tar members and no more."""
    done, written = [], 0
    for group, members in write_groups(reference, cached):
        written += members
        if written > n_members:
            break
        done.extend(group)
    return sorted(done)


CACHE_ON, CACHE_OFF = "16", "0"  # --partner-cache-limit: the default (GB), off


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def assert_colour(got: np.ndarray, expected, tol: int = 12) -> None:
    assert np.abs(got - np.asarray(expected, dtype=int)).max() <= tol, (got.tolist(), list(expected))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    return make_bad_val_tree(tmp_path_factory.mktemp("bad-src"))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    """The bad corpus built once by the CLI, one worker, uninterrupted."""
    out = tmp_path_factory.mktemp("reference")
    proc = cli(build_args(corpus, out, "--variant", ",".join(VARIANTS), "--workers", "1"))
    assert proc.returncode == 0, proc.stderr
    assert "original:" in proc.stdout and "rejected" in proc.stdout
    return out


# --------------------------------------------------------------------------- bad inputs


def rejected_rows(folder: Path) -> list[dict]:
    """The variant's rejected.jsonl, one dict per rejected input."""
    return [json.loads(line) for line in (folder / REJECTED_NAME).read_text().splitlines()]


def test_every_input_is_built_or_rejected_with_its_reason(corpus, reference):
    for variant in VARIANTS:
        folder = reference / variant
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        raw = (folder / REJECTED_NAME).read_bytes()
        rejected_lines = [json.loads(line) for line in raw.splitlines()]
        assert manifest["rejected"] == {"name": REJECTED_NAME, "count": len(rejected_lines),
                                        "sha256": hashlib.sha256(raw).hexdigest()}
        built = set(read_samples(folder))
        rejected = {r["key"]: r for r in rejected_lines}
        assert len(rejected) == len(rejected_lines), "a key rejected twice"
        assert not built & set(rejected), built & set(rejected)
        assert built | set(rejected) == set(corpus.expected)  # accepted + rejected = inputs, by key
        totals = manifest["totals"]
        assert totals["samples"] + totals["rejected"] == totals["inputs"] == len(corpus.expected)
        assert totals["samples"] == len(built)
        assert sum(manifest["rejected_reasons"].values()) == len(rejected)
        for row in rejected.values():
            assert row["detail"], row  # a precise reason says what was wrong
        if variant == "original":
            assert built == corpus.built
            assert {k: r["reason"] for k, r in rejected.items()} == {
                k: reason for k, reason in corpus.expected.items() if reason is not None
            }
        else:
            # an unreadable image that passed the header check cannot lend its background:
            # whoever drew it as a partner is rejected as no_partner, not dropped
            for key, reason in corpus.expected.items():
                if reason is not None:
                    assert rejected[key]["reason"] == reason, key
                elif key in rejected:
                    assert rejected[key]["reason"] == "no_partner" and "truncated" in rejected[key]["detail"]
    bomb = next(r for r in rejected_lines if r["key"] == "bomb")
    assert "900000000 pixels" in bomb["detail"]  # refused by its header's size, never decoded


def test_rejections_name_no_local_path_and_quote_no_file(corpus, reference):
    """A shared build tells where nothing lived and what no file said: details are relative and byte-free."""
    for variant in VARIANTS:
        text = (reference / variant / REJECTED_NAME).read_text()
        rows = {r["key"]: r for r in map(json.loads, text.splitlines())}
        assert str(corpus.images.parent) not in text and "tmp" not in text, text
        assert SECRET[:8].hex() not in text and "hunter2" not in text
        assert rows["text_symlink"]["detail"] == "not a JPEG or PNG image"
        assert rows["gif_named_jpeg"]["detail"] == "GIF data, not JPEG or PNG"  # one line, no memory address
        assert rows["postscript"]["detail"] == "PostScript data, not JPEG or PNG"
        assert rows["zero_bytes"]["detail"] == "zero_bytes.JPEG: 0 bytes"
        assert rows["xml_only"]["detail"] == "no image for val/xml_only.xml"


def test_odd_but_readable_images_become_the_right_rgb(corpus, reference):
    samples = read_samples(reference / "original")
    frame = {k: pixels(samples[k]["jpg"]) for k in corpus.readable}
    for image in frame.values():
        assert image.shape == (32, 32, 3)
    for case in ("cmyk", "png_named_jpeg", "palette"):
        assert_colour(frame[case][CENTRE[::-1]], INSIDE)
        assert_colour(frame[case][CORNER[::-1]], OUTSIDE)
    gray_in, gray_out = (round(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]) for c in (INSIDE, OUTSIDE))
    assert_colour(frame["grayscale"][CENTRE[::-1]], (gray_in,) * 3, tol=4)
    assert_colour(frame["grayscale"][CORNER[::-1]], (gray_out,) * 3, tol=4)
    assert_colour(frame["rgba"][LEFT[::-1]], (255, 255, 255))  # transparent: composited on white
    assert_colour(frame["rgba"][CENTRE[::-1]], INSIDE)
    assert_colour(frame["sixteen_bit"][CENTRE[::-1]], (round(60000 * 255 / 65535),) * 3, tol=4)  # scaled, not clipped
    assert_colour(frame["sixteen_bit"][CORNER[::-1]], (round(16000 * 255 / 65535),) * 3, tol=4)
    # EXIF orientation 6: shown rotated, so what was stored on top is on the right of the frame
    viewed = np.asarray(ImageOps.exif_transpose(Image.open(corpus.readable["exif_rotated"])).convert("RGB"))
    assert viewed.shape[:2] == (64, 48)
    exif = frame["exif_rotated"]
    assert_colour(exif[16, 2], viewed[32, 5])
    assert_colour(exif[16, 29], viewed[32, 42])
    assert_colour(exif[16, 2], OUTSIDE)
    assert_colour(exif[16, 29], INSIDE)


@pytest.mark.parametrize("source, make", [("coco", make_bad_coco), ("mask-dir", make_bad_mask_dir)])
def test_broken_segmentations_are_rejected_with_their_reason(source, make, tmp_path):
    corpus = make(tmp_path / "src")
    config, _ = parse_args(build_args(corpus, tmp_path / "out", "--variant", "original", "--mask", "segm",
                                      "--with-masks", source=source))
    manifest = build(config, progress=False)["original"]
    rejected = {r["key"]: r["reason"] for r in rejected_rows(tmp_path / "out" / "original")}
    assert rejected == {k: reason for k, reason in corpus.expected.items() if reason is not None}
    samples = read_samples(tmp_path / "out" / "original")
    assert set(samples) == corpus.built
    for sample in samples.values():
        mask = np.asarray(Image.open(io.BytesIO(sample["mask.png"])))
        assert mask.shape == (32, 32) and 0 < (mask > 0).mean() < 1
    assert manifest.totals.samples + manifest.totals.rejected == len(corpus.expected)


def test_decompression_bomb_limit_is_enforced_before_decoding(corpus, tmp_path, monkeypatch):
    """With a lower limit, ordinary images over it are refused by their header, not decoded."""
    import pipeline.decode

    monkeypatch.setattr(pipeline.decode, "MAX_IMAGE_PIXELS", 48 * 48 - 1)
    decoded = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size) or real_load(self))
    config, _ = parse_args(build_args(corpus, tmp_path / "out", "--variant", "original"))
    with pytest.raises(ConfigError, match="no sample accepted for original"):  # every image is >= 48x48 pixels
        build(config, progress=False)
    bombs = {r["key"] for r in rejected_rows(tmp_path / "out" / "original") if r["reason"] == "decompression_bomb"}
    assert {"cmyk", "palette", "bomb", "ILSVRC2012_val_00000001"} <= bombs
    assert not [s for s in decoded if s[0] * s[1] >= 48 * 48]


# --------------------------------------------------------------------------- SIGKILL and resume


def kill_build(tmp_path: Path, args: list[str], what: str, limit: int) -> subprocess.CompletedProcess:
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(KILL_HOOK)
    counter = tmp_path / "counter"
    counter.unlink(missing_ok=True)
    killed = cli(args, {"PYTHONPATH": f"{ROOT}{os.pathsep}{hook}", "BGCHECK_TEST_KILL": f"{what}:{limit}:{counter}"},
                 new_session=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    return killed


@pytest.mark.parametrize(
    "workers, what, limit, cache",
    [
        ("1", "add", 1, CACHE_OFF),  # killed while writing the very first member: nothing finished
        ("1", "completion", 1, CACHE_OFF),
        ("1", "completion", 3, CACHE_OFF),
        ("1", "add", 40, CACHE_OFF),  # in the middle of a later shard's tar
        ("2", "completion", 2, CACHE_OFF),
        ("2", "add", 20, CACHE_OFF),
        ("1", "add", 1, CACHE_ON),
        ("1", "completion", 3, CACHE_ON),
        ("1", "add", 40, CACHE_ON),  # in the first pass: original shards and cache files
        ("1", "add", 75, CACHE_ON),  # in the second pass: mixed_rand shards read from the cache
        ("1", "cache", 2, CACHE_ON),  # right after the second chunk's cache is published
        ("1", "marker", 1, CACHE_ON),  # a cache file renamed into place, its marker not yet written
        ("2", "marker", 3, CACHE_ON),
        ("2", "add", 60, CACHE_ON),
    ],
)
def test_killed_build_leaves_no_partial_shard_and_resumes_identically(
    corpus, reference, tmp_path, workers, what, limit, cache
):
    out = tmp_path / "out"
    args = build_args(corpus, out, "--variant", ",".join(VARIANTS), "--workers", workers,
                      "--partner-cache-limit", cache)
    kill_build(tmp_path, args, what, limit)
    ref = published(reference)
    left = published(out) if out.exists() else {}
    assert not [name for name in left if not name.endswith(".tar")]  # no manifest before the end
    for name, data in left.items():  # whatever carries a final name is complete and final
        assert data == ref[name], name
    if workers == "1":  # one worker: exactly the shards finished before the kill are there
        if what == "completion":
            assert len(left) == limit, sorted(left)
        elif what == "add":  # killed at member `limit`: the shards whose members all came before it are done
            assert sorted(left) == finished_after(reference, cache == CACHE_ON, limit - 1)
        else:  # killed in the first pass, after the cache of chunk `limit` (or `limit - 1`) was published
            assert sorted(left) == [f"original/original-{i:06d}.tar" for i in range(limit)]
    if what == "marker":  # the renamed file without its marker is there, and nothing vouches for it
        folder = out / ".partner-cache"
        unvouched = [p for p in folder.glob("chunk-*.bin") if not p.with_suffix(".json").exists()]
        assert unvouched, sorted(p.name for p in folder.iterdir())

    rerun = cli(args)
    assert rerun.returncode == 0, rerun.stderr
    assert published(out) == ref
    assert not list(out.glob("*/.*.tmp"))
    assert not (out / ".partner-cache").exists()  # removed once every shard is complete
    assert verify(out).ok


def test_resumed_build_reuses_the_cache_files_it_can_trust(corpus, reference, tmp_path):
    """Files vouched for by a marker with the chunk's hash are read again as they are; the rest is redone."""
    out = tmp_path / "out"
    args = build_args(corpus, out, "--variant", ",".join(VARIANTS), "--workers", "1")
    kill_build(tmp_path, args, "cache", 2)  # chunks 0 and 1 published, then killed
    folder = out / ".partner-cache"
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("chunk-*")}
    assert sorted(kept) == ["chunk-000000.bin", "chunk-000000.json", "chunk-000001.bin", "chunk-000001.json"]
    # a resumed build that dies in its own first pass shows what it did with them
    kill_build(tmp_path, args, "cache", 1)
    again = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("chunk-*")}
    assert {k: again[k] for k in kept} == kept  # reused untouched, not rewritten
    assert "chunk-000002.bin" in again  # the first chunk it had to write itself
    rerun = cli(args)
    assert rerun.returncode == 0, rerun.stderr
    assert "3 chunk(s) reused from an earlier run" in rerun.stderr  # chunks 0 and 1, then 2
    assert published(out) == published(reference)


def test_cache_of_changed_inputs_is_not_trusted(tmp_path):
    """A cache file left by a killed build is redone when its chunk's images change before the rerun."""
    corpus = make_bad_val_tree(tmp_path / "src")
    out = tmp_path / "out"
    args = build_args(corpus, out, "--variant", ",".join(VARIANTS), "--workers", "1")
    kill_build(tmp_path, args, "cache", 3)
    marker = json.loads((out / ".partner-cache" / "chunk-000000.json").read_text())
    # every image of chunk 0 now shows other pixels (same size, so the plan's geometry stays)
    first = sorted(p for p in corpus.images.iterdir() if p.name.startswith("ILSVRC2012_val_"))[:4]
    for path in first:
        with Image.open(path) as img:
            size = img.size
        Image.new("RGB", size, (250, 10, 200)).save(path, format="JPEG", quality=95)
    rerun = cli(args)
    assert rerun.returncode == 0, rerun.stderr
    fresh = tmp_path / "fresh"
    assert cli(build_args(corpus, fresh, "--variant", ",".join(VARIANTS), "--workers", "1",
                          "--partner-cache-limit", CACHE_OFF)).returncode == 0
    assert published(out) == published(fresh)
    assert marker["hash"]  # (the killed build had vouched for chunk 0 under its old hash)


# --------------------------------------------------------------------------- full disk


def _fail_after(n: int, real):
    calls = [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] > n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    return failing


def _fail_cache_writes_after(n: int, real):
    """os.pwrite that fills the disk after ``n`` rows written to the partner cache (other files write on)."""
    calls = [0]

    def pwrite(fd, data, offset):
        if CACHE_DIR in os.readlink(f"/proc/self/fd/{fd}"):
            calls[0] += 1
            if calls[0] > n:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    return pwrite


@pytest.mark.parametrize("where, cache", [("add", CACHE_OFF), ("replace", CACHE_OFF), ("add", CACHE_ON),
                                          ("replace", CACHE_ON), ("cache", CACHE_ON)])
def test_full_disk_is_a_clear_error_and_leaves_no_corrupt_shard(corpus, reference, tmp_path, monkeypatch, capsys,
                                                                where, cache):
    out = tmp_path / "out"
    argv = build_args(corpus, out, "--variant", ",".join(VARIANTS), "--workers", "1", "--partner-cache-limit", cache)
    cached = cache == CACHE_ON
    n_members = write_groups(reference, cached)[0][1] + 5  # the disk fills after the first group of shards
    if where == "add":  # ... while a shard is being written
        monkeypatch.setattr(tarfile.TarFile, "addfile", _fail_after(n_members, tarfile.TarFile.addfile))
    elif where == "cache":  # ... while the partner cache of chunk 1 is being written (chunk 0's is complete)
        monkeypatch.setattr(os, "pwrite", _fail_cache_writes_after(6, os.pwrite))
    else:  # ... or just when the finished shard is renamed into place
        real_replace = os.replace

        def replace(src, dst, *a, **kw):
            if str(dst).endswith(".tar"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_replace(src, dst, *a, **kw)

        monkeypatch.setattr(os, "replace", replace)
    rc = main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    *notes, err = lines
    assert [n for n in notes if not n.startswith("make_shards: partner cache: ")] == [] and len(notes) == cached
    assert err.startswith("make_shards: error:") and "No space left on device" in err, err
    # says which file could not be written
    assert (f"{CACHE_DIR}/chunk-000001.bin" if where == "cache" else ".tar") in err
    ref = published(reference)
    left = published(out) if out.exists() else {}
    if where == "add":
        assert sorted(left) == finished_after(reference, cached, n_members)
    else:  # 'cache': chunk 1 failed with its cache, after only chunk 0's shards
        assert sorted(left) == (["original/original-000000.tar"] if where == "cache" else []), sorted(left)
    for name, data in left.items():
        assert data == ref[name], name
    # the partial file is removed, not left to fill the disk further
    assert not list(out.glob("*/.*.tmp")) and not list(out.glob(f"{CACHE_DIR}/.*.tmp"))

    monkeypatch.undo()
    monkeypatch.setenv("BGCHECK_CACHE", str(tmp_path / "cache"))
    assert main(argv) == 0
    assert published(out) == ref


# --------------------------------------------------------------------------- edited after publishing


def test_shard_changed_after_its_manifest_is_named_by_verify(reference, tmp_path):
    import shutil

    out = Path(shutil.copytree(reference, tmp_path / "out"))
    shard = out / "mixed_rand" / "mixed_rand-000001.tar"
    with tarfile.open(shard) as tar:  # a well-formed tar with one sample's label changed
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            if info.name.endswith(".cls"):
                data = b"999"
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    report = verify(out)
    assert not report.ok
    assert any("mixed_rand-000001.tar" in p and "sha256" in p for p in report.problems), report.problems
    assert not any("original/" in p for p in report.problems)
    proc = subprocess.run([sys.executable, "-m", "builders.verify", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1 and "FAIL mixed_rand/mixed_rand-000001.tar" in proc.stdout
