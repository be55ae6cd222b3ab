"""``python -m builders.verify``: check built shards against their manifests, byte for byte.

A collaborator who receives shards (a folder, or a URL of a manifest) can
confirm that every shard is the one that was built (sha256 and size), that the
samples inside follow the shard format (one image, a label and a provenance
record per key, keys unique across the variant, a mask when the build made
masks), and that the manifest's totals, ``rejected.jsonl`` and ``_info.json``
add up. ``--deep`` also decodes every image and mask and checks the frame size.

The verifier reads shards through the same stages as the evaluator
(``pipeline.shard_format.reader``); it only collects every problem instead of
stopping at the first. A manifest is data, not a program: shard names must be
plain file names next to it, so it can never make us open a ``pipe:`` command,
an absolute path, a symlink or another host.
"""

from __future__ import annotations

import hashlib
import json
import sys
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from pipeline.classes import to_in9
from pipeline.cli import OneLineParser
from pipeline.decode import SHARD_FORMATS, open_image
from pipeline.records import RejectedInput
from pipeline.shard_format.errors import Missing, ShardSpecError, StreamError
from pipeline.shard_format.locate import load_manifest_lenient, shard_refs, sibling
from pipeline.shard_format.manifest import Manifest, timm_info
from pipeline.shard_format.reader import ShardSample, ShardTally, read_shard
from pipeline.shard_format.spec import (
    MANIFEST_NAME,
    MASK_EXTENSION,
    MAX_MANIFEST_BYTES,
    TIMM_INFO_NAME,
    parse_json_object,
)
from pipeline.shard_format.transport import DEFAULT_POLICY, TransferPolicy, is_pipe, is_remote, read_all

# A damaged or hostile shard can hold any number of bad samples: report this many per shard, then count.
MAX_PROBLEMS_PER_SHARD = 20


class VerifyError(ValueError):
    """The input cannot be verified at all (bad argument, unreachable, unreadable manifest); exit code 2."""


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


class _ShardProblems:
    """The verifier's problem sink for one shard: every problem, up to a bound, then a count."""

    def __init__(self, report: VerifyReport, prefix: str) -> None:
        self.report, self.prefix, self.count = report, prefix, 0

    def _add(self, message: str) -> None:
        self.count += 1
        if self.count <= MAX_PROBLEMS_PER_SHARD:
            self.report.add(f"{self.prefix}: {message}")

    def sample(self, key: str, message: str, variant: str | None) -> None:
        self._add(f"{key}: {message}" if key else message)

    def shard(self, message: str) -> None:
        self._add(message)

    def close(self) -> None:
        if self.count > MAX_PROBLEMS_PER_SHARD:
            self.report.add(f"{self.prefix}: ... and {self.count - MAX_PROBLEMS_PER_SHARD} more problem(s)")


# --------------------------------------------------------------------------- locating manifests


def find_manifests(path_or_url: str) -> list[str]:
    """The manifest(s) an argument stands for: a URL, a manifest path, a variant folder, or an output root."""
    if is_remote(path_or_url):
        if urllib.parse.urlparse(path_or_url).path.endswith(".json"):
            return [path_or_url]
        return [path_or_url.rstrip("/") + "/" + MANIFEST_NAME]  # a URL of a variant folder
    if "://" in path_or_url or is_pipe(path_or_url):
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


def _read_beside(location: str, name: str, policy: TransferPolicy) -> bytes | None:
    """A small file next to the manifest, or None when it is missing."""
    try:
        return read_all(sibling(location, name), MAX_MANIFEST_BYTES, listed=True, policy=policy)
    except Missing:
        return None
    except StreamError as exc:
        raise VerifyError(f"cannot read {name} beside {location}: {exc.message}") from None


# --------------------------------------------------------------------------- one manifest


def _deep_problems(sample: ShardSample, size: int | None) -> list[str]:
    """Decode the image and mask fully (formats and pixel bound of the shard format)."""
    problems = []
    for ext in (sample.image_extension, MASK_EXTENSION):
        data = sample.members.get(ext)
        if data is None:
            continue
        try:
            with open_image(data, formats=SHARD_FORMATS) as image:
                image.load()
                width, height = image.size
        except RejectedInput as exc:
            problems.append(f"{sample.key}.{ext} does not decode ({exc.reason}: {exc.detail})")
            continue
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a finding about the shard
            problems.append(f"{sample.key}.{ext} does not decode ({type(exc).__name__})")
            continue
        if size is not None and (width, height) != (size, size):
            problems.append(f"{sample.key}.{ext} is {width}x{height}, config size is {size}x{size}")
    return problems


def _check_side_files(location: str, manifest: Manifest, report: VerifyReport, policy: TransferPolicy,
                      in9_lengths: list[int] | None) -> None:
    """rejected.jsonl (hash and count) and _info.json (timm's split description) against the manifest."""
    v = manifest.variant
    if manifest.rejected is not None:
        raw = _read_beside(location, manifest.rejected.name, policy)
        if raw is None:
            report.add(f"{v}: {manifest.rejected.name} is missing")
        else:
            if hashlib.sha256(raw).hexdigest() != manifest.rejected.sha256:
                report.add(f"{v}: {manifest.rejected.name} sha256 does not match the manifest")
            lines = sum(1 for line in raw.splitlines() if line.strip())
            if lines != manifest.rejected.count:
                report.add(f"{v}: {manifest.rejected.name} has {lines} lines, the manifest says {manifest.rejected.count}")
    raw = _read_beside(location, TIMM_INFO_NAME, policy)
    if raw is None:
        report.add(f"{v}: {TIMM_INFO_NAME} is missing")
        return
    # the IN-9 split's lengths are what the shards hold: checked only when the shards themselves are sound
    expected = timm_info(manifest, in9_lengths or [0] * len(manifest.shards))["splits"]
    if in9_lengths is None:
        expected.pop(f"{v}_in9")
    try:
        splits = parse_json_object(raw, TIMM_INFO_NAME, MAX_MANIFEST_BYTES).get("splits")
        if not isinstance(splits, dict):
            raise ValueError(f"{TIMM_INFO_NAME} has no splits")
    except ValueError as exc:
        report.add(f"{v}: {exc}")
        return
    for split, want in expected.items():
        got = splits.get(split)
        if not isinstance(got, dict):
            report.add(f"{v}: {TIMM_INFO_NAME} has no split {split!r}")
            continue
        for field_name, value in want.items():
            if got.get(field_name) != value:
                report.add(f"{v}: {TIMM_INFO_NAME} splits.{split}.{field_name} disagrees with the shards")


def verify_manifest(
    location: str, report: VerifyReport, deep: bool = False, progress: bool = False,
    policy: TransferPolicy = DEFAULT_POLICY,
) -> None:
    """Verify one manifest and every shard it lists; problems go to ``report``."""
    try:
        manifest, refused = load_manifest_lenient(location, policy)
    except ShardSpecError as exc:
        raise VerifyError(str(exc)) from None
    report.manifests.append(location)
    variant = manifest.variant
    for problem in refused + manifest.arithmetic_problems():
        report.add(f"{variant}: {problem}")
    size = manifest.config.get("size") if isinstance(manifest.config.get("size"), int) else None
    seen_keys: dict[str, str] = {}
    labels: dict[str, int] = {}
    in9_lengths: list[int] = []
    problems_before = len(report.problems)
    refs = shard_refs(manifest, location)
    for entry, ref in tqdm(list(zip(manifest.shards, refs, strict=True)), desc=variant, unit="shard",
                           disable=not progress, dynamic_ncols=True):
        sink = _ShardProblems(report, f"{variant}/{entry.name}")
        in9_lengths.append(0)
        tally = ShardTally(entry.name)
        for sample in read_shard(ref, sink, build_config=manifest.config, tally=tally, policy=policy):
            if sample.key in seen_keys:
                sink.sample(sample.key, f"already in {seen_keys[sample.key]}", variant)
            else:
                seen_keys[sample.key] = entry.name
            labels[str(sample.label)] = labels.get(str(sample.label), 0) + 1
            in9_lengths[-1] += int(sample.meta.get("in9_label", to_in9(sample.label)) >= 0)
            for problem in _deep_problems(sample, size) if deep else ():
                sink.sample("", problem, variant)
        if tally.ignored_count:
            shown = ", ".join(sorted({n.partition(".")[2] or n for n in tally.ignored}))
            sink.shard(f"{tally.ignored_count} unexpected member(s) ({shown}), not read")
        if entry.sha256 is None or entry.nbytes is None:
            sink.shard("the manifest lists no sha256/bytes for it: its bytes cannot be verified")
        sink.close()
        report.shards += 1
        report.samples += tally.samples
    histogram = manifest.class_histogram
    if histogram is not None and {k: v for k, v in histogram.items() if v} != labels and len(report.problems) == problems_before:
        report.add(f"{variant}: labels in the shards do not match class_histogram")
    sound = len(report.problems) == problems_before
    _check_side_files(location, manifest, report, policy, in9_lengths if sound else None)


def verify(path_or_url: str | Path, deep: bool = False, progress: bool = False,
           policy: TransferPolicy = DEFAULT_POLICY) -> VerifyReport:
    """Verify a variant folder, a manifest (path or http(s) URL), or an output root of variant folders.

    Raises :class:`VerifyError` when the input cannot be read at all; every
    finding about the shards themselves is a problem in the report.
    """
    report = VerifyReport()
    for location in find_manifests(str(path_or_url)):
        verify_manifest(location, report, deep=deep, progress=progress, policy=policy)
    return report


# --------------------------------------------------------------------------- CLI


def build_parser() -> OneLineParser:
    p = OneLineParser(
        prog="python -m builders.verify",
        description="Check shards against their manifest: sha256, size, sample count, unique keys, and that "
        "every sample has its image, .cls and .json (and .mask.png when built with masks); rejected.jsonl and "
        "_info.json too. Exit 0 when all is well, 1 on any mismatch, 2 when the input cannot be read.",
    )
    p.add_argument("path", metavar="PATH_OR_URL",
                   help="variant folder, manifest.json, output root of variant folders, or http(s):// manifest URL")
    p.add_argument("--deep", action="store_true", help="also decode every image and mask and check its size")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--allow-host", action="append", default=[], metavar="HOST",
                   help="follow HTTP redirects to this other host (repeatable; default: same host only)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    policy = TransferPolicy(allow_hosts=frozenset(h.lower() for h in args.allow_host))
    try:
        report = verify(args.path, deep=args.deep, progress=sys.stderr.isatty() and not args.json, policy=policy)
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
