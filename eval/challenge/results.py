"""What the challenge writes and reads back: one part per (model, foreground shard), merged tables per model.

On disk under ``--out`` (the results folder ``eval.score`` writes too, so
``eval.report`` finds both there), in ``challenge/``:

- ``backgrounds.json``: the backgrounds of the run in search order (key,
  class, ImageNet-9 class, shard and where it was read from) and their digest;
- ``<model>/parts/<shard id>.json``: one (model, foreground shard) searched
  completely, written atomically; kept, so a rerun (or another rank) skips it;
  a part made with other settings is moved to ``<model>/.replaced/``, never
  overwritten;
- ``<model>/foregrounds.csv``: one row per foreground (:data:`FOREGROUND_COLUMNS`),
  and ``<model>/foreground_shards.json``: each foreground shard's name, where
  it was read from and the sha256 of its bytes (the report's gallery reads the
  images there);
- ``<model>/backgrounds.csv`` and ``<model>/strongest.csv`` with ``--exhaustive``:
  each background's attack success rate, and the strongest backgrounds per class;
and beside it ``challenge.csv``: one row per model (:data:`SUMMARY_COLUMNS`),
rows of other models kept.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eval.errors import EvalError
from eval.metrics import wilson_interval
from eval.resume import REPLACED_DIR, Scored, fingerprint, read_json_object, shard_id
from pipeline.classes import imagenet_classes, in9_names
from pipeline.files import atomic_write_text
from pipeline.shard_format import ShardRef

SUMMARY_NAME = "challenge.csv"
CHALLENGE_DIR = "challenge"
BACKGROUNDS_INDEX = "backgrounds.json"
FOREGROUNDS_NAME = "foregrounds.csv"
FOREGROUND_SHARDS_NAME = "foreground_shards.json"
BACKGROUNDS_NAME = "backgrounds.csv"
STRONGEST_NAME = "strongest.csv"
PARTS_DIR = "parts"
FOREGROUND_VARIANT = "original"  # what the challenge pastes (built --with-masks) ...
BACKGROUND_VARIANT = "only_bg_t"  # ... onto these
MASK_THRESHOLD = 127  # a mask PNG pixel above this is foreground (the builder writes 0 and 255)
STRONGEST_PER_CLASS = 5

FOREGROUND_COLUMNS = ("key", "label", "in9_label", "vulnerable", "tried", "fooled_by", "fooled_by_label",
                      "fooled_by_in9_label", "pred", "shard")
BACKGROUND_COLUMNS = ("key", "label", "in9_label", "attack_success_rate", "hits", "trials", "fooled", "shard")
STRONGEST_COLUMNS = ("class", "class_name", "rank", "key", "attack_success_rate", "hits", "trials", "shard")
SUMMARY_COLUMNS = ("model", "label_space", "foregrounds", "vulnerable", "challenge_accuracy", "ci_low", "ci_high",
                   "outside_label_space", "backgrounds", "exhaustive", "composites", "composites_per_s", "device", "precision", "weights",
                   "input_size", "interpolation", "mean", "std", "in9_rule", "batch_size", "error")


@dataclass(frozen=True)
class BackgroundIndex:
    """The backgrounds of one run, in the order every foreground tries them."""

    keys: tuple[str, ...]
    labels: tuple[int, ...]
    in9_labels: tuple[int, ...]
    shard_of: tuple[int, ...]  # index into ``shards``
    shards: tuple[dict[str, Any], ...]  # name, url, sha256 (of the bytes read)

    def classes(self, label_space: str) -> np.ndarray:
        return np.asarray(self.in9_labels if label_space == "in9" else self.labels, dtype=np.int64)

    def to_json(self) -> dict[str, Any]:
        return {"keys": list(self.keys), "labels": list(self.labels), "in9_labels": list(self.in9_labels),
                "shard_of": list(self.shard_of), "shards": list(self.shards)}


def backgrounds_digest(refs: Sequence[ShardRef]) -> str:
    """What identifies the background set before it is read: each shard's id and bytes, in search order."""
    basis = json.dumps([[shard_id(r), fingerprint(r) or r.url] for r in refs])
    return hashlib.sha256(basis.encode("utf-8")).hexdigest()[:16]


def challenge_dir(out: Path) -> Path:
    return out / CHALLENGE_DIR


def write_background_index(out: Path, index: BackgroundIndex, digest: str) -> None:
    atomic_write_text(challenge_dir(out) / BACKGROUNDS_INDEX, json.dumps({"digest": digest, **index.to_json()}))


def read_background_index(out: Path, digest: str | None = None) -> BackgroundIndex | None:
    """The run's background list (None if absent, or made for other backgrounds than ``digest``)."""
    try:
        doc = json.loads((challenge_dir(out) / BACKGROUNDS_INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or (digest is not None and doc.get("digest") != digest):
        return None
    try:
        return BackgroundIndex(tuple(doc["keys"]), tuple(doc["labels"]), tuple(doc["in9_labels"]),
                               tuple(doc["shard_of"]), tuple(doc["shards"]))
    except (KeyError, TypeError):
        return None


# ---------------------------------------------------------------- parts


def part_path(out: Path, model_id: str, ref: ShardRef) -> Path:
    return challenge_dir(out) / model_id / PARTS_DIR / f"{shard_id(ref)}.json"


def load_part(out: Path, model: Scored, ref: ShardRef) -> dict[str, Any] | None:
    """The part of (model, shard) if it was made with the model's settings from the shard's current bytes."""
    part = read_json_object(part_path(out, model.id, ref))
    if not part or part.get("signature") != model.signature:
        return None
    now = fingerprint(ref)
    return part if now is None or part.get("fingerprint") == now else None


def pending(out: Path, models: Sequence[Scored], refs: Sequence[ShardRef]) -> dict[int, list[int]]:
    """Foreground shard index -> indices of the models that still need it."""
    needs: dict[int, list[int]] = {}
    for s, ref in enumerate(refs):
        for m, model in enumerate(models):
            if load_part(out, model, ref) is None:
                needs.setdefault(s, []).append(m)
    return needs


def write_part(out: Path, model: Scored, ref: ShardRef, rows: list[list[Any]], *, observed_sha256: str,
               outside: int, device: str, seconds: float, composites: int, counts: dict[str, list[int]] | None) -> Path | None:
    """Commit one searched (model, foreground shard); returns where a part made with other settings was moved."""
    path = part_path(out, model.id, ref)
    moved = None
    old = read_json_object(path)
    if old is not None and old.get("signature") != model.signature:
        folder = challenge_dir(out) / model.id / REPLACED_DIR
        folder.mkdir(parents=True, exist_ok=True)
        moved = folder / f"{path.stem}-{1 + sum(1 for _ in folder.glob(f'{path.stem}-*.json'))}.json"
        os.replace(path, moved)
    part = {"shard_id": shard_id(ref), "shard": ref.name, "url": ref.url, "fingerprint": fingerprint(ref),
            "sha256": observed_sha256, "count": ref.count, "signature": model.signature, "device": device,
            "outside_label_space": outside, "seconds": seconds, "composites": composites, "rows": rows, "backgrounds": counts}
    atomic_write_text(path, json.dumps(part))
    return moved


# ---------------------------------------------------------------- merged tables


@dataclass
class ModelChallenge:
    """The merged challenge of one model over the run's foreground shards."""

    rows: list[list[Any]]
    seconds: float
    composites: int
    counts: dict[str, np.ndarray] | None  # hits, trials, fooled per background (exhaustive)
    outside_label_space: int = 0  # foregrounds read but without a class in the label space
    shards: list[dict[str, Any]] = field(default_factory=list)  # name, url, sha256 of each foreground shard

    @property
    def vulnerable(self) -> int:
        return sum(int(r[3]) for r in self.rows)


def merge_parts(out: Path, model: Scored, refs: Sequence[ShardRef]) -> ModelChallenge:
    """Every foreground of the run exactly once, from the parts of the run's foreground shards."""
    rows: list[list[Any]] = []
    seconds, composites, outside = 0.0, 0, 0
    counts: dict[str, np.ndarray] | None = None
    shards: list[dict[str, Any]] = []
    seen: set[str] = set()
    for ref in refs:
        part = load_part(out, model, ref)
        if part is None:
            raise EvalError(f"{model.id}: no challenge results for shard {ref.name} (a rank failed?)")
        left_out = int(part.get("outside_label_space", 0))
        if ref.count is not None and len(part["rows"]) + left_out != ref.count:
            raise EvalError(f"{model.id}: {len(part['rows'])} foregrounds of {ref.name} searched and {left_out} "
                            f"left out, its manifest lists {ref.count}")
        outside += left_out
        shards.append({"name": ref.name, "url": part["url"], "sha256": part["sha256"]})
        for row in part["rows"]:
            if row[0] in seen:
                raise EvalError(f"{model.id}: foreground {row[0]} searched twice (same key in two shards?)")
            seen.add(row[0])
            rows.append([*row, ref.name])
        seconds += float(part["seconds"])
        composites += int(part["composites"])
        if part.get("backgrounds") is not None:
            block = {k: np.asarray(v, dtype=np.int64) for k, v in part["backgrounds"].items()}
            counts = block if counts is None else {k: counts[k] + block[k] for k in counts}
    return ModelChallenge(rows, seconds, composites, counts, outside, shards)


def _csv(columns: Sequence[str], rows: Sequence[Sequence[Any] | dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows and isinstance(rows[0], dict):
        writer: Any = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
    else:
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
    writer.writerows(rows)
    return buf.getvalue()


def background_rows(index: BackgroundIndex, counts: dict[str, np.ndarray]) -> list[list[Any]]:
    """Per background: how often it made the model predict its own class on another class's foreground."""
    rows = []
    for j, key in enumerate(index.keys):
        hits, trials = int(counts["hits"][j]), int(counts["trials"][j])
        rate = f"{hits / trials:.6f}" if trials else ""
        rows.append([key, index.labels[j], index.in9_labels[j], rate, hits, trials, int(counts["fooled"][j]),
                     index.shards[index.shard_of[j]]["name"]])
    return rows


def strongest_rows(index: BackgroundIndex, counts: dict[str, np.ndarray], label_space: str,
                   per_class: int = STRONGEST_PER_CLASS) -> list[list[Any]]:
    """The ``per_class`` backgrounds of each class with the highest attack success rate (ties: key order)."""
    classes = index.classes(label_space)
    names = in9_names() if label_space == "in9" else imagenet_classes().names
    rows = []
    for c in sorted(set(classes.tolist()) - {-1}):
        members = [j for j in np.flatnonzero(classes == c) if counts["trials"][j] > 0]
        members.sort(key=lambda j: (-counts["hits"][j] / counts["trials"][j], index.keys[j]))
        for rank, j in enumerate(members[:per_class], 1):
            rows.append([c, names[c], rank, index.keys[j], f"{counts['hits'][j] / counts['trials'][j]:.6f}",
                         int(counts["hits"][j]), int(counts["trials"][j]), index.shards[index.shard_of[j]]["name"]])
    return rows


def write_model_tables(out: Path, model_id: str, merged: ModelChallenge, index: BackgroundIndex | None,
                       label_space: str) -> None:
    folder = challenge_dir(out) / model_id
    atomic_write_text(folder / FOREGROUNDS_NAME, _csv(FOREGROUND_COLUMNS, merged.rows))
    atomic_write_text(folder / FOREGROUND_SHARDS_NAME, json.dumps(merged.shards, indent=1))
    if merged.counts is not None:
        if index is None or len(index.keys) != merged.counts["hits"].size:
            raise EvalError(f"{challenge_dir(out) / BACKGROUNDS_INDEX} does not describe the backgrounds of these results: rerun")
        atomic_write_text(folder / BACKGROUNDS_NAME, _csv(BACKGROUND_COLUMNS, background_rows(index, merged.counts)))
        atomic_write_text(folder / STRONGEST_NAME, _csv(STRONGEST_COLUMNS,
                                                        strongest_rows(index, merged.counts, label_space)))


def summary_row(model: Any, merged: ModelChallenge | None, *, label_space: str, n_backgrounds: int,
                exhaustive: bool, device: str) -> dict[str, str]:
    """The challenge.csv row of one model: accuracy (%) with its Wilson 95% interval, or the model's error."""
    row = {**dict.fromkeys(SUMMARY_COLUMNS, ""), **model.columns(device), "label_space": label_space,
           "backgrounds": str(n_backgrounds), "exhaustive": str(int(exhaustive)),
           "in9_rule": model.signature.get("in9_rule", "")}
    if merged is None:
        return {**row, "error": model.error or "failed"}
    n, k = len(merged.rows), len(merged.rows) - merged.vulnerable
    lo, hi = wilson_interval(k, n)
    return {**row, "foregrounds": str(n), "vulnerable": str(merged.vulnerable),
            "outside_label_space": str(merged.outside_label_space),
            "challenge_accuracy": f"{100.0 * k / n:.3f}" if n else "",
            "ci_low": "" if math.isnan(lo) else f"{100.0 * lo:.3f}",
            "ci_high": "" if math.isnan(hi) else f"{100.0 * hi:.3f}",
            "composites": str(merged.composites),
            "composites_per_s": f"{merged.composites / merged.seconds:.1f}" if merged.seconds > 0 else ""}


def read_summary(out: Path) -> dict[str, dict[str, str]]:
    """``challenge.csv`` rows by model ({} when the folder holds no challenge)."""
    path = out / SUMMARY_NAME
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as fh:
        return {row["model"]: {c: row.get(c) or "" for c in SUMMARY_COLUMNS} for row in csv.DictReader(fh)}


def write_summary(out: Path, rows: list[dict[str, str]]) -> None:
    """Merge rows into ``challenge.csv`` by model, keeping the rows of models this run did not search."""
    merged = read_summary(out)
    merged.update({r["model"]: r for r in rows})
    atomic_write_text(out / SUMMARY_NAME, _csv(SUMMARY_COLUMNS, [merged[m] for m in sorted(merged)]))


def read_foregrounds(out: Path, model_id: str) -> list[dict[str, str]]:
    with open(challenge_dir(out) / model_id / FOREGROUNDS_NAME, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def read_strongest(out: Path, model_id: str) -> list[dict[str, str]]:
    """``strongest.csv`` of one model ([] without an exhaustive run)."""
    path = challenge_dir(out) / model_id / STRONGEST_NAME
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def read_foreground_shards(out: Path, model_id: str) -> list[dict[str, Any]]:
    """Name, url and sha256 of each foreground shard of a model's merged challenge ([] if absent)."""
    try:
        doc = json.loads((challenge_dir(out) / model_id / FOREGROUND_SHARDS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return doc if isinstance(doc, list) else []
