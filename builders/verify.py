"""``python -m builders.verify``: check built shards against their manifests, byte for byte.

A collaborator who receives shards (a folder, or a URL of a manifest) can
confirm that every shard is the one that was built (sha256 and size), that
the samples inside follow the shard format (one image, a label and a
provenance record per key, keys unique across the variant), and that the
manifest's totals add up. ``--deep`` also decodes every image and checks it
has the frame size the manifest's config says.

A manifest fetched from elsewhere is data, not a program: shard names must be
plain file names next to the manifest, so a manifest can never make us open a
``pipe:`` command, an absolute path or another host.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from pipeline.shard_format import (
    FORMAT_VERSION,
    HTTP_TIMEOUT_S,
    IMAGE_EXTENSIONS,
    LABEL_EXTENSION,
    MANIFEST_NAME,
    MASK_EXTENSION,
    MAX_MEMBER_BYTES,
    META_EXTENSION,
    META_FIELDS,
    READABLE_EXTENSIONS,
    REJECTED_NAME,
    HashingReader,
    is_remote,
    plain_name_problem,
)

# Decompression-bomb guard for --deep: refuse to decode images far larger than any frame we write.
MAX_DECODE_PIXELS = 1 << 26


class VerifyError(ValueError):
    """The input cannot be verified at all (bad argument, unreachable); exit code 2."""


@dataclass
class VerifyReport:
    """Outcome of a verification: ``ok`` is False as soon as one problem was found."""

    ok: bool = True
    problems: list[str] = field(default_factory=list)
    shards: int = 0  # shards read
    samples: int = 0  # samples read
    manifests: list[str] = field(default_factory=list)  # where each verified manifest was

    def add(self, problem: str) -> None:
        self.problems.append(problem)
        self.ok = False


# --------------------------------------------------------------------------- locating manifests


def find_manifests(path_or_url: str) -> list[str]:
    """The manifest(s) an argument stands for: a URL, a manifest path, a variant folder, or an output root."""
    if is_remote(path_or_url):
        if urllib.parse.urlparse(path_or_url).path.endswith(".json"):
            return [path_or_url]
        return [path_or_url.rstrip("/") + "/" + MANIFEST_NAME]  # a URL of a variant folder
    if "://" in path_or_url or path_or_url.startswith("pipe:"):
        raise VerifyError(f"{path_or_url}: only local paths and http(s):// URLs can be verified")
    path = Path(path_or_url)
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            return [str(path / MANIFEST_NAME)]
        found = sorted(str(p / MANIFEST_NAME) for p in path.iterdir() if (p / MANIFEST_NAME).is_file())
        if found:
            return found
        raise VerifyError(f"{path}: no {MANIFEST_NAME} in this folder or its subfolders")
    raise VerifyError(f"{path}: no such file or folder")


def _open(location: str) -> IO[bytes]:
    if is_remote(location):
        return urllib.request.urlopen(location, timeout=HTTP_TIMEOUT_S)
    return open(location, "rb")


def _read_manifest(location: str) -> dict[str, Any]:
    try:
        with _open(location) as fh:
            raw = fh.read()
    except urllib.error.HTTPError as exc:
        raise VerifyError(f"cannot fetch {location}: HTTP {exc.code}") from None
    except urllib.error.URLError as exc:
        raise VerifyError(f"cannot fetch {location}: {exc.reason}") from None
    except OSError as exc:
        raise VerifyError(f"cannot read {location}: {exc.strerror or exc}") from None
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VerifyError(f"{location}: not a JSON manifest ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise VerifyError(f"{location}: not a shard manifest (no 'shards' list)")
    return manifest


def _sibling(location: str, name: str) -> str:
    """A file next to the manifest; ``name`` has already been checked to be a plain file name."""
    if is_remote(location):
        return location.rsplit("/", 1)[0] + "/" + urllib.parse.quote(name)
    return str(Path(location).parent / name)


# --------------------------------------------------------------------------- reading one shard


@dataclass
class _Sample:
    key: str
    members: dict[str, bytes | None] = field(default_factory=dict)  # extension -> data (None: not read)
    duplicates: list[str] = field(default_factory=list)


def _split_member(name: str) -> tuple[str, str]:
    """``key.ext`` -> (key, ext); keys contain no dot, so the first dot splits."""
    key, _, ext = name.partition(".")
    return key, ext


def _iter_samples(tar: tarfile.TarFile, shard: str, report: VerifyReport) -> Iterator[_Sample]:
    """Group consecutive members by key, the way WebDataset does."""
    current: _Sample | None = None
    for member in tar:
        if not member.isfile():
            report.add(f"{shard}: member {member.name!r} is not a regular file")
            continue
        if "/" in member.name:
            report.add(f"{shard}: member {member.name!r} is in a subfolder")
        key, ext = _split_member(member.name.rsplit("/", 1)[-1])
        if member.size > MAX_MEMBER_BYTES:
            report.add(f"{shard}: member {member.name!r} is {member.size} bytes, not read")
            data = None
        else:
            fh = tar.extractfile(member)
            data = fh.read() if fh is not None else b""
        if current is None or current.key != key:
            if current is not None:
                yield current
            current = _Sample(key)
        if ext in current.members:
            current.duplicates.append(ext)
        current.members[ext] = data
    if current is not None:
        yield current


def _decode_problem(data: bytes, size: int | None, what: str) -> str | None:
    """Decode fully (with a bomb guard) and compare to the frame size; None when fine."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                if w * h > MAX_DECODE_PIXELS:
                    return f"{what} claims {w}x{h} pixels, refusing to decode"
                img.load()
    except Exception as exc:  # any decoder failure is a finding about the shard, not a crash
        return f"{what} does not decode ({type(exc).__name__}: {exc})"
    if size is not None and (w, h) != (size, size):
        return f"{what} is {w}x{h}, config size is {size}x{size}"
    return None


def check_sample(
    sample: _Sample, variant: str | None, config: dict[str, Any], deep: bool
) -> tuple[list[str], int | None]:
    """Problems with one sample's members, and its label (None when unreadable)."""
    problems: list[str] = []
    key, members = sample.key, sample.members
    if not key or "." in key:
        problems.append(f"bad key {key!r}")
    for ext in sample.duplicates:
        problems.append(f"{key}: member .{ext} appears twice")
    images = [e for e in members if e in IMAGE_EXTENSIONS]
    if len(images) != 1:
        problems.append(f"{key}: {len(images)} image members (expected exactly one of .jpg/.png/.webp)")
    elif config.get("format") and images[0] != config["format"]:
        problems.append(f"{key}: image is .{images[0]}, config format is {config['format']}")
    unknown = sorted(set(members) - READABLE_EXTENSIONS)
    if unknown:
        problems.append(f"{key}: unexpected member(s) {', '.join('.' + e for e in unknown)}")
    with_masks = bool(config.get("with_masks"))
    if with_masks and MASK_EXTENSION not in members:
        problems.append(f"{key}: no .{MASK_EXTENSION} although the config says with_masks")
    if not with_masks and MASK_EXTENSION in members:
        problems.append(f"{key}: .{MASK_EXTENSION} present although the config says no masks")

    label: int | None = None
    if LABEL_EXTENSION not in members:
        problems.append(f"{key}: no .{LABEL_EXTENSION}")
    elif members[LABEL_EXTENSION] is not None:
        try:
            label = int(members[LABEL_EXTENSION].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            problems.append(f"{key}: .{LABEL_EXTENSION} is not an integer: {members[LABEL_EXTENSION][:32]!r}")
    if META_EXTENSION not in members:
        problems.append(f"{key}: no .{META_EXTENSION}")
    elif members[META_EXTENSION] is not None:
        try:
            meta = json.loads(members[META_EXTENSION].decode("utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("not an object")
        except (UnicodeDecodeError, ValueError) as exc:
            problems.append(f"{key}: .{META_EXTENSION} is not a JSON object ({exc})")
        else:
            missing = [f for f in META_FIELDS if f not in meta]
            if missing:
                problems.append(f"{key}: .{META_EXTENSION} lacks {', '.join(missing)}")
            if meta.get("key") != key:
                problems.append(f"{key}: .{META_EXTENSION} key is {meta.get('key')!r}")
            if variant is not None and meta.get("variant") != variant:
                problems.append(f"{key}: .{META_EXTENSION} variant is {meta.get('variant')!r}, manifest is {variant!r}")
            if label is not None and meta.get("label") != label:
                problems.append(f"{key}: .{LABEL_EXTENSION} says {label}, .{META_EXTENSION} label is {meta.get('label')!r}")
    if deep:
        size = config.get("size") if isinstance(config.get("size"), int) else None
        for ext in images[:1] + ([MASK_EXTENSION] if MASK_EXTENSION in members else []):
            data = members[ext]
            if data is not None:
                problem = _decode_problem(data, size, f"{key}.{ext}")
                if problem:
                    problems.append(problem)
    return problems, label


def verify_shard(
    url: str,
    entry: dict[str, Any],
    variant: str | None,
    config: dict[str, Any],
    seen_keys: dict[str, str],
    labels: dict[str, int],
    report: VerifyReport,
    deep: bool,
) -> None:
    """Read one shard once, streaming: hash, size, members; problems go to ``report``."""
    name = entry["name"]
    shard = f"{variant}/{name}" if variant else name
    try:
        raw = _open(url)
    except urllib.error.HTTPError as exc:
        report.add(f"{shard}: missing (HTTP {exc.code})")
        return
    except FileNotFoundError:
        report.add(f"{shard}: missing")
        return
    except (OSError, urllib.error.URLError) as exc:
        report.add(f"{shard}: cannot open ({exc})")
        return
    reader = HashingReader(raw)
    count = 0
    try:
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for sample in _iter_samples(tar, shard, report):
                    count += 1
                    if sample.key in seen_keys:
                        report.add(f"{shard}: key {sample.key} already in {seen_keys[sample.key]}")
                    else:
                        seen_keys[sample.key] = name
                    problems, label = check_sample(sample, variant, config, deep)
                    for p in problems:
                        report.add(f"{shard}: {p}")
                    if label is not None:
                        labels[str(label)] = labels.get(str(label), 0) + 1
        except (tarfile.TarError, EOFError, OSError) as exc:
            report.add(f"{shard}: not a readable tar ({type(exc).__name__}: {exc})")
        reader.drain()
    except OSError as exc:
        report.add(f"{shard}: read failed ({exc})")
    finally:
        raw.close()
    report.shards += 1
    report.samples += count
    if entry.get("bytes") is not None and reader.nbytes != entry["bytes"]:
        report.add(f"{shard}: {reader.nbytes} bytes, manifest says {entry['bytes']}")
    digest = reader.sha256.hexdigest()
    if str(entry.get("sha256", "")).lower() != digest:
        report.add(f"{shard}: sha256 {digest[:16]}..., manifest says {str(entry.get('sha256'))[:16]}...")
    if entry.get("count") is not None and count != entry["count"]:
        report.add(f"{shard}: {count} samples, manifest says {entry['count']}")


# --------------------------------------------------------------------------- one manifest


def check_totals(manifest: dict[str, Any], prefix: str) -> list[str]:
    """The manifest's own arithmetic: shard counts vs totals, accepted + rejected vs inputs."""
    problems: list[str] = []
    shards = [e for e in manifest["shards"] if isinstance(e, dict)]
    totals = manifest.get("totals")
    if not isinstance(totals, dict):
        return [f"{prefix}: manifest has no totals"]
    counts = [e.get("count") for e in shards]
    if all(isinstance(c, int) for c in counts) and sum(counts) != totals.get("samples"):
        problems.append(f"{prefix}: shard counts sum to {sum(counts)}, totals.samples is {totals.get('samples')}")
    if totals.get("shards") is not None and totals["shards"] != len(manifest["shards"]):
        problems.append(f"{prefix}: {len(manifest['shards'])} shards listed, totals.shards is {totals['shards']}")
    sizes = [e.get("bytes") for e in shards]
    if totals.get("bytes") is not None and all(isinstance(b, int) for b in sizes) and sum(sizes) != totals["bytes"]:
        problems.append(f"{prefix}: shard bytes sum to {sum(sizes)}, totals.bytes is {totals['bytes']}")
    samples, rejected, inputs = totals.get("samples"), totals.get("rejected"), totals.get("inputs")
    if all(isinstance(v, int) for v in (samples, rejected, inputs)) and samples + rejected != inputs:
        problems.append(f"{prefix}: {samples} samples + {rejected} rejected != {inputs} inputs")
    if isinstance(manifest.get("rejected"), list) and isinstance(rejected, int) and len(manifest["rejected"]) != rejected:
        problems.append(f"{prefix}: {len(manifest['rejected'])} rejected entries, totals.rejected is {rejected}")
    histogram = manifest.get("class_histogram")
    if isinstance(histogram, dict) and isinstance(samples, int) and sum(histogram.values()) != samples:
        problems.append(f"{prefix}: class_histogram sums to {sum(histogram.values())}, totals.samples is {samples}")
    return problems


def verify_manifest(location: str, report: VerifyReport, deep: bool = False, progress: bool = False) -> None:
    """Verify one manifest and every shard it lists; problems go to ``report``."""
    manifest = _read_manifest(location)
    report.manifests.append(location)
    variant = manifest.get("variant") if isinstance(manifest.get("variant"), str) else None
    prefix = variant or location
    config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    if manifest.get("format_version") != FORMAT_VERSION:
        report.add(f"{prefix}: format_version {manifest.get('format_version')!r}, this verifier knows {FORMAT_VERSION}")
    for problem in check_totals(manifest, prefix):
        report.add(problem)
    shard_problems_before = len(report.problems)

    seen_names: set[str] = set()
    seen_keys: dict[str, str] = {}
    labels: dict[str, int] = {}
    for entry in tqdm(manifest["shards"], desc=prefix, unit="shard", disable=not progress, dynamic_ncols=True):
        name = entry.get("name") if isinstance(entry, dict) else entry
        refused = plain_name_problem(name)
        if refused:
            report.add(f"{prefix}: {refused}")
            continue
        if name in seen_names:
            report.add(f"{prefix}: shard {name} listed twice")
            continue
        seen_names.add(name)
        verify_shard(_sibling(location, name), entry, variant, config, seen_keys, labels, report, deep)

    histogram = manifest.get("class_histogram")
    if isinstance(histogram, dict) and {k: v for k, v in histogram.items() if v} != labels and len(report.problems) == shard_problems_before:
        report.add(f"{prefix}: labels in the shards do not match class_histogram")
    if not is_remote(location):
        rejected_file = Path(location).parent / REJECTED_NAME
        totals = manifest.get("totals") or {}
        if rejected_file.is_file() and isinstance(totals.get("rejected"), int):
            lines = [ln for ln in rejected_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
            if len(lines) != totals["rejected"]:
                report.add(f"{prefix}: {REJECTED_NAME} has {len(lines)} lines, totals.rejected is {totals['rejected']}")


def verify(path_or_url: str | Path, deep: bool = False, progress: bool = False) -> VerifyReport:
    """Verify a variant folder, a manifest (path or http(s) URL), or an output root of variant folders.

    Raises :class:`VerifyError` when the input cannot be read at all; every
    finding about the shards themselves is a problem in the report.
    """
    report = VerifyReport()
    for location in find_manifests(str(path_or_url)):
        verify_manifest(location, report, deep=deep, progress=progress)
    return report


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m builders.verify",
        description="Check shards against their manifest: sha256, size, sample count, unique keys, and that "
        "every sample has its image, .cls and .json (and .mask.png when built with masks). "
        "Exit 0 when all is well, 1 on any mismatch, 2 when the input cannot be read.",
    )
    p.add_argument("path", metavar="PATH_OR_URL",
                   help="variant folder, manifest.json, output root of variant folders, or http(s):// manifest URL")
    p.add_argument("--deep", action="store_true", help="also decode every image and check its size")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    try:
        report = verify(args.path, deep=args.deep, progress=sys.stderr.isatty() and not args.json)
    except VerifyError as exc:
        print(f"verify: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("verify: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(asdict(report), indent=1))
    else:
        for problem in report.problems:
            print(f"FAIL {problem}")
        status = "OK" if report.ok else f"FAILED ({len(report.problems)} problem(s))"
        print(f"{status}: {len(report.manifests)} manifest(s), {report.shards} shard(s), "
              f"{report.samples} sample(s){' decoded' if args.deep else ''}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
