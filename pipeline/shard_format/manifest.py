"""``manifest.json``: one type, written by the builder, read by the verifier and the evaluator.

A manifest arrives from anyone, so reading it is strict: every field present
must have its type (an integer is never a string, a bool or a float), the
variant must be a known id, shard names must be plain file names beside the
manifest, and the file is bounded in size. Problems of arithmetic (counts that
do not add up) are reported by :meth:`Manifest.arithmetic_problems`, so the
verifier can list them while the evaluator refuses them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.shard_format.errors import ShardSpecError
from pipeline.shard_format.spec import (
    FORMAT_VERSION,
    MAX_MANIFEST_BYTES,
    READABLE_FORMAT_VERSIONS,
    parse_json_object,
)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_MAX_INT = 1 << 62


def plain_name_problem(name: object) -> str | None:
    """Why a shard name from a manifest is refused, or None for a plain file name beside the manifest.

    The builder writes shards next to their manifest, so that is all a manifest
    may name: never a ``pipe:`` command, a path elsewhere or another URL.
    """
    if not isinstance(name, str) or not name:
        return f"shard entry without a name: {name!r}"
    if ".." in name or not _PLAIN_NAME.fullmatch(name) or len(name) > 255:
        return f"refusing shard name {name!r}: not a plain file name next to the manifest"
    return None


class _Fields:
    """Typed access to one JSON object, with the path of each field for the error message."""

    def __init__(self, obj: object, where: str) -> None:
        if not isinstance(obj, dict):
            raise ShardSpecError(f"{where} must be a JSON object, not {type(obj).__name__}")
        self.obj, self.where = obj, where

    def _fail(self, name: str, expected: str) -> ShardSpecError:
        value = repr(self.obj.get(name))
        return ShardSpecError(f"{self.where}.{name} must be {expected}, not {value[:40]}")

    def integer(self, name: str, default: int | None = None, required: bool = False) -> int | None:
        value = self.obj.get(name)
        if value is None:
            if required:
                raise self._fail(name, "an integer")
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not -_MAX_INT < value < _MAX_INT:
            raise self._fail(name, "an integer")
        return value

    def count(self, name: str, required: bool = False) -> int | None:
        value = self.integer(name, required=required)
        if value is not None and value < 0:
            raise self._fail(name, "a count (>= 0)")
        return value

    def text(self, name: str, required: bool = False) -> str | None:
        value = self.obj.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, str) or len(value) > 4096:
            raise self._fail(name, "a string")
        return value

    def sha256(self, name: str) -> str | None:
        value = self.text(name)
        if value is not None and not _SHA256.fullmatch(value.lower()):
            raise self._fail(name, "a sha256 hex digest")
        return value.lower() if value is not None else None

    def mapping(self, name: str) -> dict[str, Any]:
        value = self.obj.get(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self._fail(name, "a JSON object")
        return value

    def counts(self, name: str) -> dict[str, int] | None:
        """A JSON object of non-negative integers (histograms)."""
        value = self.obj.get(name)
        if value is None:
            return None
        inner = _Fields(value, f"{self.where}.{name}")
        return {str(k): inner.count(k, required=True) for k in value}  # type: ignore[misc]

    def sequence(self, name: str) -> list[Any] | None:
        value = self.obj.get(name)
        if value is None:
            return None
        if not isinstance(value, list):
            raise self._fail(name, "a list")
        return value


@dataclass(frozen=True)
class ShardEntry:
    """One shard as the manifest lists it; ``nbytes`` is the JSON field ``bytes``."""

    name: str
    sha256: str | None
    nbytes: int | None
    count: int | None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "bytes": self.nbytes, "count": self.count}


@dataclass(frozen=True)
class Totals:
    samples: int | None = None
    shards: int | None = None
    nbytes: int | None = None
    inputs: int | None = None
    rejected: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"samples": self.samples, "shards": self.shards, "bytes": self.nbytes, "inputs": self.inputs,
                "rejected": self.rejected}


@dataclass(frozen=True)
class RejectedFile:
    """``rejected.jsonl`` beside the manifest: one rejected input a line, identified by its hash."""

    name: str
    sha256: str
    count: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "count": self.count}


@dataclass(frozen=True)
class Manifest:
    """Everything a reader may know about one variant's shards."""

    variant: str
    shards: tuple[ShardEntry, ...]
    totals: Totals = field(default_factory=Totals)
    format_version: int = FORMAT_VERSION
    builder_version: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    config_hash: str | None = None
    seed: int | None = None
    versions: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    textures: tuple[str, ...] | None = None
    class_histogram: dict[str, int] | None = None
    rejected_reasons: dict[str, int] | None = None
    rejected: RejectedFile | None = None

    # ------------------------------------------------------------------ writing

    def to_json(self) -> str:
        doc = {
            "format_version": self.format_version,
            "builder_version": self.builder_version,
            "variant": self.variant,
            "config": self.config,
            "config_hash": self.config_hash,
            "seed": self.seed,
            "versions": self.versions,
            "source": self.source,
            "textures": list(self.textures) if self.textures is not None else None,
            "shards": [s.to_json() for s in self.shards],
            "totals": self.totals.to_json(),
            "class_histogram": self.class_histogram,
            "rejected_reasons": self.rejected_reasons,
            "rejected": self.rejected.to_json() if self.rejected else None,
        }
        return json.dumps(doc, indent=1, sort_keys=True) + "\n"

    # ------------------------------------------------------------------ reading

    @classmethod
    def from_bytes(cls, raw: bytes, where: str) -> Manifest:
        """Parse and type-check a manifest; raises ShardSpecError with one line naming the field."""
        return cls._parse(raw, where, None)

    @classmethod
    def read_lenient(cls, raw: bytes, where: str) -> tuple[Manifest, list[str]]:
        """As :meth:`from_bytes`, but refused or repeated shard entries are dropped and described, not fatal.

        The verifier uses it to report every bad entry and still check the others.
        """
        refused: list[str] = []
        return cls._parse(raw, where, refused), refused

    @classmethod
    def _parse(cls, raw: bytes, where: str, refused: list[str] | None) -> Manifest:
        try:
            doc = parse_json_object(raw, "it", MAX_MANIFEST_BYTES)
        except ValueError as exc:
            raise ShardSpecError(f"manifest {where}: {exc}") from None
        top = _Fields(doc, f"manifest {where}")
        version = top.integer("format_version")
        if version not in READABLE_FORMAT_VERSIONS:
            raise ShardSpecError(f"manifest {where}: format_version {version!r}, this reader knows {FORMAT_VERSION}")
        variant = top.text("variant", required=True)
        from pipeline.variants import VARIANTS

        if variant not in VARIANTS:
            raise ShardSpecError(f"manifest {where}: unknown variant {variant[:40]!r}")
        entries = top.sequence("shards")
        if entries is None:
            raise ShardSpecError(f"manifest {where}: no 'shards' list")
        shards: list[ShardEntry] = []
        for i, raw_entry in enumerate(entries):
            entry = _Fields(raw_entry, f"manifest {where}: shards[{i}]")
            name = raw_entry.get("name")
            problem = plain_name_problem(name)
            if problem is None and any(s.name == name for s in shards):
                problem = f"shard {name} listed twice"
            if problem:
                if refused is None:
                    raise ShardSpecError(f"manifest {where}: {problem}")
                refused.append(problem)
                continue
            shards.append(ShardEntry(name, entry.sha256("sha256"), entry.count("bytes"), entry.count("count")))
        totals = _Fields(top.mapping("totals"), f"manifest {where}: totals")
        rejected = top.obj.get("rejected")
        rejected_file = None
        if rejected is not None:
            rf = _Fields(rejected, f"manifest {where}: rejected")
            name = rf.text("name", required=True)
            problem = plain_name_problem(name)
            if problem:
                raise ShardSpecError(f"manifest {where}: rejected: {problem}")
            rejected_file = RejectedFile(name, rf.sha256("sha256") or "", rf.count("count", required=True))  # type: ignore[arg-type]
        textures = top.sequence("textures")
        if textures is not None and not all(isinstance(t, str) for t in textures):
            raise ShardSpecError(f"manifest {where}: textures must be a list of names")
        return cls(
            variant=variant,  # type: ignore[arg-type]
            shards=tuple(shards),
            totals=Totals(totals.count("samples"), totals.count("shards"), totals.count("bytes"),
                          totals.count("inputs"), totals.count("rejected")),
            format_version=version,  # type: ignore[arg-type]
            builder_version=top.text("builder_version"),
            config=top.mapping("config"),
            config_hash=top.text("config_hash"),
            seed=top.integer("seed"),
            versions=top.mapping("versions"),
            source=top.mapping("source"),
            textures=tuple(textures) if textures is not None else None,
            class_histogram=top.counts("class_histogram"),
            rejected_reasons=top.counts("rejected_reasons"),
            rejected=rejected_file,
        )

    # ------------------------------------------------------------------ arithmetic

    def count_problem(self) -> str | None:
        """The shards' sample counts against totals.samples: the one total a reader relies on."""
        counts = [s.count for s in self.shards]
        samples = self.totals.samples
        if samples is not None and all(c is not None for c in counts) and sum(counts) != samples:  # type: ignore[arg-type]
            return f"shard counts sum to {sum(counts)}, totals.samples is {samples}"  # type: ignore[arg-type]
        return None

    def arithmetic_problems(self) -> list[str]:
        """Totals that disagree with the shard list or with each other (empty = consistent)."""
        problems: list[str] = [p for p in (self.count_problem(),) if p]
        t = self.totals
        if t.shards is not None and t.shards != len(self.shards):
            problems.append(f"{len(self.shards)} shards listed, totals.shards is {t.shards}")
        sizes = [s.nbytes for s in self.shards]
        if t.nbytes is not None and all(b is not None for b in sizes) and sum(sizes) != t.nbytes:  # type: ignore[arg-type]
            problems.append(f"shard bytes sum to {sum(sizes)}, totals.bytes is {t.nbytes}")  # type: ignore[arg-type]
        if None not in (t.samples, t.rejected, t.inputs) and t.samples + t.rejected != t.inputs:  # type: ignore[operator]
            problems.append(f"{t.samples} samples + {t.rejected} rejected != {t.inputs} inputs")
        if self.rejected is not None and t.rejected is not None and self.rejected.count != t.rejected:
            problems.append(f"{self.rejected.name} holds {self.rejected.count} entries, totals.rejected is {t.rejected}")
        if self.rejected_reasons is not None and t.rejected is not None and sum(self.rejected_reasons.values()) != t.rejected:
            problems.append(f"rejected_reasons sum to {sum(self.rejected_reasons.values())}, totals.rejected is {t.rejected}")
        if self.class_histogram is not None and t.samples is not None and sum(self.class_histogram.values()) != t.samples:
            problems.append(f"class_histogram sums to {sum(self.class_histogram.values())}, totals.samples is {t.samples}")
        return problems


def timm_info(manifest: Manifest, in9_shard_lengths: list[int]) -> dict[str, Any]:
    """The ``_info.json`` timm's WebDataset reader expects (``timm.data.create_dataset("wds/...")``).

    Two splits over the same shards: ``<variant>`` (label = ``.cls``) and
    ``<variant>_in9`` (label = the sample's ``in9_label``; timm skips samples
    outside ImageNet-9, so its lengths count only the IN-9 samples).
    """
    names = [s.name for s in manifest.shards]
    lengths = [int(s.count or 0) for s in manifest.shards]
    v = manifest.variant
    return {
        "name": f"bgcheck-{v}",
        "splits": {
            v: {"name": v, "num_samples": sum(lengths), "filenames": names, "shard_lengths": lengths},
            f"{v}_in9": {"name": f"{v}_in9", "num_samples": sum(in9_shard_lengths), "filenames": names,
                         "shard_lengths": list(in9_shard_lengths), "alt_label": "in9_label"},
        },
    }
