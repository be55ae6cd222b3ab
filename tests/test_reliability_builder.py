"""The builder on inputs as messy as real ImageNet, and under faults: SIGKILL, a full disk, edited shards.

Nothing may be lost silently: every input is either built (readable odd
files converted to the right pixels) or listed in ``rejected.jsonl`` and the
manifest with a precise reason. A build killed at any point leaves no partial
file under a final name and resumes to the bytes of an uninterrupted build.
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
# counts tar members written or completed shards in a shared file and SIGKILLs the whole
# process group at the N-th, so workers and their parent die together like a killed job.
KILL_HOOK = '''
import os
_spec = os.environ.get("BGCHECK_TEST_KILL")
if _spec:
    import signal
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
    """Every file a user sees (shards, manifests, rejected lists) by relative path; hidden files excluded."""
    return {p.relative_to(out).as_posix(): p.read_bytes()
            for p in sorted(out.glob("*/*")) if p.is_file() and not p.name.startswith(".")}


def shard_members(reference: Path) -> list[int]:
    """Tar members per chunk, all variants together, in build order (one worker)."""
    per_chunk: list[int] = []
    for variant in VARIANTS:
        for i, shard in enumerate(sorted((reference / variant).glob("*.tar"))):
            with tarfile.open(shard) as tar:
                n = len(tar.getmembers())
            if i == len(per_chunk):
                per_chunk.append(0)
            per_chunk[i] += n
    return per_chunk


def first_chunk_members(reference: Path) -> int:
    return shard_members(reference)[0]


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


@pytest.mark.parametrize(
    "workers, what, limit",
    [
        ("1", "add", 1),  # killed while writing the very first member: nothing finished
        ("1", "completion", 1),
        ("1", "completion", 3),
        ("1", "add", 40),  # in the middle of a later shard's tar
        ("2", "completion", 2),
        ("2", "add", 20),
    ],
)
def test_killed_build_leaves_no_partial_shard_and_resumes_identically(
    corpus, reference, tmp_path, workers, what, limit
):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_HOOK)
    out = tmp_path / "out"
    args = build_args(corpus, out, "--variant", ",".join(VARIANTS), "--workers", workers)
    killed = cli(args, {"PYTHONPATH": f"{ROOT}{os.pathsep}{hook}",
                        "BGCHECK_TEST_KILL": f"{what}:{limit}:{tmp_path / 'counter'}"}, new_session=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    ref = published(reference)
    left = published(out) if out.exists() else {}
    assert not [name for name in left if not name.endswith(".tar")]  # no manifest before the end
    for name, data in left.items():  # whatever carries a final name is complete and final
        assert data == ref[name], name
    if workers == "1":  # one worker: exactly the shards finished before the kill are there
        if what == "completion":
            finals = limit
        else:  # killed at member `limit`: the chunks whose members all came before it are done
            done = np.cumsum(shard_members(reference)) <= limit - 1
            finals = len(VARIANTS) * int(done.sum())
        assert len(left) == finals, sorted(left)

    rerun = cli(args)
    assert rerun.returncode == 0, rerun.stderr
    assert published(out) == ref
    assert not list(out.glob("*/.*.tmp"))
    assert verify(out).ok


# --------------------------------------------------------------------------- full disk


def _fail_after(n: int, real):
    calls = [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] > n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    return failing


@pytest.mark.parametrize("where", ["add", "replace"])
def test_full_disk_is_a_clear_error_and_leaves_no_corrupt_shard(corpus, reference, tmp_path, monkeypatch, capsys,
                                                                where):
    out = tmp_path / "out"
    argv = build_args(corpus, out, "--variant", ",".join(VARIANTS), "--workers", "1")
    if where == "add":  # the disk fills while a shard is being written (after one complete shard)
        monkeypatch.setattr(tarfile.TarFile, "addfile", _fail_after(first_chunk_members(reference) + 5,
                                                                   tarfile.TarFile.addfile))
    else:  # ... or just when the finished shard is renamed into place
        real_replace = os.replace

        def replace(src, dst, *a, **kw):
            if str(dst).endswith(".tar"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_replace(src, dst, *a, **kw)

        monkeypatch.setattr(os, "replace", replace)
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert "\n" not in err and err.startswith("make_shards: error:") and "No space left on device" in err, err
    assert ".tar" in err  # says which file could not be written
    ref = published(reference)
    left = published(out) if out.exists() else {}
    assert len(left) == (len(VARIANTS) if where == "add" else 0), sorted(left)  # chunk 0 was finished
    for name, data in left.items():
        assert data == ref[name], name
    assert not list(out.glob("*/.*.tmp"))  # the partial file is removed, not left to fill the disk further

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
