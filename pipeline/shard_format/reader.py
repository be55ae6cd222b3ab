"""Reading one shard: webdataset's tar stages with our policy as small stages between them.

```
open_source -> ShardStream -> tar_file_expander(select_files=MemberGate) -> unique_members
            -> group_by_keys -> parse_sample -> (caller decodes) ... end: ends_complete, bytes, sha256, count
```

webdataset parses the tar headers and groups members by key
(``tariterators.tar_file_expander``, ``group_by_keys``, the key rule
``base_plus_ext``). Our stages, each for a reason:

- :class:`~pipeline.shard_format.transport.ShardStream`: hashes the bytes as
  they stream (a shard is verified against its manifest in the same pass),
  bounds the shard and each member, refuses compressed tars;
- :class:`MemberGate` (webdataset's ``select_files``): the allow-list of member
  extensions, applied before a member is read, so a ``.pyd`` or ``.pth`` from a
  collaborator is never even loaded into memory;
- :func:`unique_members`: a key may appear only once in a shard (webdataset
  only notices a repeated member inside one run of a key);
- :func:`parse_sample`: the key alphabet, exactly one image, an integer label,
  a provenance object whose variant is a known id agreeing with the manifest;
- the end checks: the end-of-archive marker (tarfile ends silently on a header
  cut short), then size, sha256 and sample count against the manifest.

Problems go to a :class:`ProblemSink`: the evaluator raises or skips a bad
sample and always refuses a shard that cannot be verified; the verifier
collects everything.
"""

from __future__ import annotations

import re
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from pipeline.classes import IN9_CLASSES
from pipeline.records import key_problem
from pipeline.shard_format.errors import StreamError
from pipeline.shard_format.locate import ShardRef
from pipeline.shard_format.spec import (
    IMAGE_EXTENSIONS,
    LABEL_EXTENSION,
    MASK_EXTENSION,
    MEMBER_EXTENSIONS,
    META_EXTENSION,
    META_FIELDS,
    NUM_CLASSES,
    parse_json_object,
)
from pipeline.shard_format.transport import DEFAULT_POLICY, ShardStream, TransferPolicy, open_source

MAX_IGNORED_NAMES = 10
_LABEL = re.compile(rb"\s*\d{1,4}\s*")


class ReadStopped(StreamError):
    """Raised by a sink to stop reading; passes through the reader unchanged."""


class ProblemSink(Protocol):
    def sample(self, key: str, message: str, variant: str | None) -> None:
        """A bad sample (the rest of the shard may still be read)."""

    def shard(self, message: str) -> None:
        """The shard as a whole is not what was published, or cannot be read."""


@dataclass
class ShardSample:
    """One sample's allowed members as bytes, with its label and provenance already checked."""

    key: str
    members: dict[str, bytes]
    label: int
    meta: dict[str, Any]
    variant: str
    image_extension: str

    @property
    def image(self) -> bytes:
        return self.members[self.image_extension]


@dataclass
class ShardTally:
    """What reading one shard found (complete once the reader is exhausted)."""

    name: str
    samples: int = 0  # every sample the shard holds, good or bad
    ignored: list[str] = field(default_factory=list)  # member names outside the allow-list, never read (a few)
    ignored_count: int = 0
    sha256: str = ""
    nbytes: int = 0
    complete: bool = False  # read to the end and verified as far as the manifest allows


class MemberGate:
    """webdataset's ``select_files``: the allow-list and the per-member bound, before any member is read."""

    def __init__(self, stream: ShardStream, tally: ShardTally, allowed: frozenset[str] = MEMBER_EXTENSIONS) -> None:
        self.stream, self.tally, self.allowed = stream, tally, allowed
        self.last_key: str | None = None

    def __call__(self, fname: str) -> bool:
        self.stream.start_member(fname)
        key, ext = base_plus_ext(fname)
        if key is not None:
            self.last_key = key
        if ext is None or ext.lower() not in self.allowed:
            self.tally.ignored_count += 1
            if len(self.tally.ignored) < MAX_IGNORED_NAMES:
                self.tally.ignored.append(fname)
            return False
        return True


def unique_members(
    files: Iterable[dict[str, Any]], on_duplicate: Callable[[str, str], None], tally: ShardTally
) -> Iterator[dict[str, Any]]:
    """Drop every repeated occurrence of a key, and a sample whose member appears twice.

    A key that comes back after other keys is dropped here; a member repeated
    within one run of its key marks the sample ``__bad__``, which
    ``group_by_keys`` then drops (webdataset's own notion of a bad sample).
    """
    seen: set[str] = set()
    current: str | None = None
    extensions: set[str] = set()
    dropping = False
    for item in files:
        if not item:  # webdataset's end-of-shard marker
            yield item
            continue
        key, ext = base_plus_ext(item["fname"])
        if key != current:
            current, extensions, dropping = key, set(), False
            if key in seen:
                dropping = True
                tally.samples += 1
                on_duplicate(key, "duplicate key (appears twice in the shard)")
                continue
            seen.add(key)
        if dropping:
            continue
        ext = ext.lower()
        if ext in extensions:
            dropping = True
            tally.samples += 1
            on_duplicate(key, f"duplicate key (member .{ext} appears twice)")
            yield {**item, "fname": f"{key}.__bad__", "data": b"bad"}
            continue
        extensions.add(ext)
        yield item


def parse_label(data: bytes) -> int:
    """``.cls``: ASCII digits, an ImageNet-1k index."""
    if len(data) > 16 or not _LABEL.fullmatch(data):
        raise ValueError(f".{LABEL_EXTENSION} is not an integer: {data[:16]!r}")
    label = int(data)
    if not 0 <= label < NUM_CLASSES:
        raise ValueError(f"label {label} outside ImageNet-1k")
    return label


def parse_meta(data: bytes) -> dict[str, Any]:
    """``.json``: a bounded JSON object (no nesting bomb, no huge document)."""
    return parse_json_object(data, f".{META_EXTENSION}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_sample(
    raw: dict[str, Any], expected_variant: str | None, build_config: dict[str, Any] | None = None
) -> tuple[ShardSample | None, list[str], str | None]:
    """``(sample or None, problems, variant)`` for one grouped sample.

    ``build_config`` (the verifier's) also demands what the build promised:
    every provenance field, the configured image format, and a mask exactly
    when the build was made with masks.
    """
    from pipeline.variants import VARIANTS

    key = raw["__key__"]
    members = {k: v for k, v in raw.items() if not k.startswith("__")}
    problems: list[str] = []
    bad_key = key_problem(key)
    if bad_key:
        problems.append(f"bad key {key[:40]!r}: {bad_key}")
    images = [e for e in IMAGE_EXTENSIONS if e in members]
    if not images:
        problems.append("no image member (.jpg/.png/.webp)")
    elif len(images) > 1:
        problems.append(f"more than one image member ({', '.join(images)})")
    label: int | None = None
    if LABEL_EXTENSION not in members:
        problems.append(f"missing .{LABEL_EXTENSION} label")
    else:
        try:
            label = parse_label(members[LABEL_EXTENSION])
        except ValueError as exc:
            problems.append(str(exc))
    meta: dict[str, Any] = {}
    variant = expected_variant
    if META_EXTENSION in members:
        try:
            meta = parse_meta(members[META_EXTENSION])
        except ValueError as exc:
            problems.append(str(exc))
    elif build_config is not None:
        problems.append(f"no .{META_EXTENSION}")
    if "variant" in meta:
        stated = meta["variant"]
        if stated not in VARIANTS:
            problems.append(f".{META_EXTENSION} variant {str(stated)[:40]!r} is not a known variant")
        elif expected_variant is not None and stated != expected_variant:
            problems.append(f".{META_EXTENSION} variant is {stated!r}, the manifest's is {expected_variant!r}")
        else:
            variant = stated
    if meta:
        if "key" in meta and meta["key"] != key:
            problems.append(f".{META_EXTENSION} key is {str(meta['key'])[:40]!r}")
        if label is not None and "label" in meta and not (_is_int(meta["label"]) and meta["label"] == label):
            problems.append(f".{LABEL_EXTENSION} says {label}, .{META_EXTENSION} label is {str(meta['label'])[:20]!r}")
        in9 = meta.get("in9_label", -1)
        if not (_is_int(in9) and -1 <= in9 < IN9_CLASSES):
            problems.append(f".{META_EXTENSION} in9_label {str(in9)[:20]!r} is not -1..8")
        if build_config is not None:
            missing = [f for f in META_FIELDS if f not in meta]
            if missing:
                problems.append(f".{META_EXTENSION} lacks {', '.join(missing)}")
    if variant is None and not problems:
        problems.append(f"no variant (no .{META_EXTENSION} provenance and no manifest)")
    if build_config is not None:
        fmt = build_config.get("format")
        if images and fmt and images[0] != fmt:
            problems.append(f"image is .{images[0]}, config format is {fmt}")
        with_masks = bool(build_config.get("with_masks"))
        if with_masks and MASK_EXTENSION not in members:
            problems.append(f"no .{MASK_EXTENSION} although the config says with_masks")
        if not with_masks and MASK_EXTENSION in members:
            problems.append(f".{MASK_EXTENSION} present although the config says no masks")
    # where a bad sample is counted: the manifest's variant when there is one (a sample cannot move its
    # skip into another variant's results), else the sample's own if it is a known id
    stated = meta.get("variant")
    hint = expected_variant if expected_variant is not None else (stated if stated in VARIANTS else None)
    if problems:
        return None, problems, hint
    return ShardSample(key, members, label, meta, variant, images[0]), [], variant  # type: ignore[arg-type]


def _short(exc: BaseException) -> str:
    """A tarfile message without what webdataset appended (`` @ <stream>``)."""
    text = str(exc.args[0]) if exc.args else type(exc).__name__
    return text.split(" @ ")[0].splitlines()[0] if text else type(exc).__name__


def read_shard(
    ref: ShardRef,
    sink: ProblemSink,
    *,
    verify: bool = True,
    policy: TransferPolicy = DEFAULT_POLICY,
    build_config: dict[str, Any] | None = None,
    tally: ShardTally | None = None,
) -> Iterator[ShardSample]:
    """The good samples of one shard in tar order; problems go to ``sink``.

    The end checks run only once the caller has read every sample: a caller
    may not trust what it took from a shard until ``tally.complete`` is True.
    """
    tally = tally if tally is not None else ShardTally(ref.name)
    try:
        source = open_source(ref.url, listed=ref.listed, policy=policy)
    except ReadStopped:
        raise
    except StreamError as exc:
        sink.shard(exc.message)
        return
    stream = ShardStream(source, ref.name, ref.nbytes if verify else None)
    gate = MemberGate(stream, tally)

    def duplicate(key: str, message: str) -> None:
        sink.sample(key, message, None)

    try:
        files = tar_file_expander([{"url": ref.url, "stream": stream}], select_files=gate)
        for raw in group_by_keys(unique_members(files, duplicate, tally), keys=base_plus_ext):
            tally.samples += 1
            sample, problems, variant = parse_sample(raw, ref.variant, build_config)
            for problem in problems:
                sink.sample(raw["__key__"], problem, variant)
            if sample is not None:
                yield sample
        stream.drain()
    except ReadStopped:
        raise
    except StreamError as exc:
        sink.shard(exc.message)
        return
    except (tarfile.TarError, EOFError, zlib.error, OSError, UnicodeError) as exc:
        after = f" after key {gate.last_key}" if gate.last_key else ""
        sink.shard(f"unreadable tar{after} ({_short(exc)})")
        return
    finally:
        stream.close()
    tally.sha256, tally.nbytes = stream.sha256.hexdigest(), stream.nbytes
    if not stream.ends_complete():
        after = f" after key {gate.last_key}" if gate.last_key else ""
        sink.shard(f"the tar ends{after} without its end-of-archive marker (truncated)")
        return
    if verify and ref.nbytes is not None and stream.nbytes != ref.nbytes:
        sink.shard(f"{stream.nbytes} bytes, manifest says {ref.nbytes}")
        return
    if verify and ref.sha256 is not None and tally.sha256 != ref.sha256:
        sink.shard(f"sha256 {tally.sha256[:16]}... does not match the manifest's {ref.sha256[:16]}...")
        return
    if ref.count is not None and tally.samples != ref.count:
        sink.shard(f"read {tally.samples} samples, manifest says {ref.count}")
        return
    tally.complete = True
