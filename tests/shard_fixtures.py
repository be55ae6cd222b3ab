"""A tiny, independent writer of format-compliant shards for tests.

It follows the shard format (``pipeline/shard_format.py``) without using the
builder, so evaluator tests do not depend on the builder and a disagreement
between the two shows up as a failing test rather than a shared bug.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.classes import to_in9
from pipeline.shard_format import FORMAT_VERSION, MANIFEST_NAME, shard_name

# A few IN-9 classes (dog, bird, ...) and one unmapped class, so in9 columns have both cases.
LABELS = (151, 7, 300, 999, 400, 20)


def encode_image(pixels: np.ndarray, fmt: str = "jpg") -> bytes:
    """HWC uint8 -> encoded bytes (fixed settings, so the same pixels give the same bytes)."""
    buf = io.BytesIO()
    image = Image.fromarray(pixels)
    if fmt == "jpg":
        image.save(buf, format="JPEG", quality=95, subsampling=0)
    elif fmt == "png":
        image.save(buf, format="PNG")
    elif fmt == "webp":
        image.save(buf, format="WEBP", lossless=True)
    else:
        raise ValueError(fmt)
    return buf.getvalue()


def random_pixels(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth-ish random image: a coarse random grid upsampled, so JPEG round-trips stay stable."""
    coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR))


def make_sample(key: str, variant: str, label: int, image: bytes, fmt: str = "jpg") -> dict[str, bytes]:
    """Members of one sample in the order the builder writes them."""
    meta = {
        "key": key,
        "variant": variant,
        "label": label,
        "in9_label": to_in9(label),
        "wnid": f"n{label:08d}",
        "source": "test",
    }
    return {
        f"{key}.{fmt}": image,
        f"{key}.cls": str(label).encode("ascii"),
        f"{key}.json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar of ``members`` in order, with fixed metadata."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> tuple[str, int]:
    """Write members in order with fixed metadata; return (sha256, bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = tar_bytes(members)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest(), len(data)


def write_variant(
    root: Path,
    variant: str,
    n_samples: int = 6,
    per_shard: int = 3,
    size: int = 32,
    seed: int = 0,
    fmt: str = "jpg",
    key_prefix: str = "img",
    manifest: bool = True,
    extra_members: dict[str, bytes] | None = None,
) -> Path:
    """``root/<variant>/`` with shards (and by default a manifest); returns the folder.

    ``extra_members`` (name -> bytes) are appended to the first shard, e.g. a
    ``.pyd`` member a reader must ignore.
    """
    rng = np.random.default_rng(seed)
    folder = root / variant
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n_samples):
        key = f"{key_prefix}{i:04d}"
        label = LABELS[i % len(LABELS)]
        samples.append((key, make_sample(key, variant, label, encode_image(random_pixels(rng, size), fmt), fmt)))
    entries = []
    for s, start in enumerate(range(0, n_samples, per_shard)):
        chunk = samples[start : start + per_shard]
        members = [(name, data) for _, sample in chunk for name, data in sample.items()]
        if s == 0 and extra_members:
            members.extend(extra_members.items())
        name = shard_name(variant, s)
        sha, nbytes = write_tar(folder / name, members)
        entries.append({"name": name, "sha256": sha, "bytes": nbytes, "count": len(chunk)})
    if manifest:
        write_manifest(folder, variant, entries, {"size": size, "resize": size})
    return folder


def write_manifest(folder: Path, variant: str, entries: list[dict], config: dict | None = None) -> Path:
    manifest = {
        "format_version": FORMAT_VERSION,
        "variant": variant,
        "shards": entries,
        "totals": {"samples": sum(int(e.get("count", 0)) for e in entries)},
        "config": config or {},
    }
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
    return path


def read_members(path: Path) -> list[tuple[str, bytes]]:
    """All members of a tar in order (to rewrite a shard with a defect)."""
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


def read_samples(folder: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} for every shard of a variant folder, read with tarfile; keys must be unique."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(Path(folder).glob("*.tar")):
        for name, data in read_members(shard):
            key, _, ext = name.partition(".")
            samples.setdefault(key, {})
            assert ext not in samples[key], f"{name} twice"
            samples[key][ext] = data
    return samples
