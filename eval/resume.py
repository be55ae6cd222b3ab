"""What a run has already scored, and merging what it scores into the results: exactly once, never a row lost.

On disk, per model, under ``<out>/predictions/<model>/``:

- ``.parts/<shard id>.json``: one (model, shard) scored and verified completely,
  written atomically when the shard ends; a killed run keeps every finished part;
- ``<variant>.csv``: the merged predictions (a ``shard`` column says which shard
  each row came from) and ``.done/<variant>.json``, its ledger: every shard in
  that file with where it was read from (``url``), what identified its bytes,
  its count, rows and skips (the report finds the shards for its gallery there).

A rerun skips every shard a valid ledger entry or part already covers (same
weights and preprocessing, same shard bytes). Merging takes, shard by shard,
the newest rows: a part if there is one, else the ledger's own rows, so a kill
at any point (between a ledger and its parts' removal, or half-way through the
variants) leaves nothing out; and it checks exactly-once coverage against
every manifest count before it writes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from eval.errors import EvalError
from eval.predictions import Predictions, model_dir, predictions_path, read_predictions, write_predictions
from pipeline.files import atomic_write_text
from pipeline.shard_format import ShardRef
from pipeline.shard_format.transport import is_pipe, is_remote

PARTS_DIR = ".parts"
DONE_DIR = ".done"
REPLACED_DIR = ".replaced"


class Scored(Protocol):
    """What resume needs of a model: its id and the settings its results depend on."""

    id: str
    signature: dict[str, Any]


def shard_id(ref: ShardRef) -> str:
    """Stable id of a shard across runs and machines: its name plus a hash of its bytes or, lacking one, its place.

    With a manifest the bytes decide (a moved folder, or another mount on another
    node, is the same shard); without one, where the shard is read from.
    """
    label = "pipe" if is_pipe(ref.url) else re.sub(r"[^A-Za-z0-9_.-]", "_", ref.name)[:80]
    basis = f"sha256:{ref.sha256}" if ref.sha256 else ref.url
    return f"{label}-{hashlib.sha1(basis.encode('utf-8')).hexdigest()[:12]}"


def _folder(url: str) -> str | None:
    """Where a shard lives, to tell which earlier results the same dataset folder supersedes."""
    if is_pipe(url):
        return None
    return url.rsplit("/", 1)[0] if is_remote(url) else os.path.dirname(os.path.abspath(url))


def fingerprint(ref: ShardRef) -> str | None:
    """What identifies a shard's bytes without reading them, or None when nothing does.

    The manifest's sha256; for a local shard without one, its size and
    modification time (so replaced bytes are rescored); a URL or pipe without a
    manifest is identified by its name alone.
    """
    if ref.sha256 is not None:
        return f"sha256:{ref.sha256}"
    if is_remote(ref.url) or is_pipe(ref.url):
        return None
    try:
        st = os.stat(ref.url)
    except OSError:
        return None
    return f"stat:{st.st_size}:{st.st_mtime_ns}"


def part_path(out: Path, model_id: str, sid: str) -> Path:
    return model_dir(out, model_id) / PARTS_DIR / f"{sid}.json"


def done_path(out: Path, model_id: str, variant: str) -> Path:
    return model_dir(out, model_id) / DONE_DIR / f"{variant}.json"


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object from a file, or None when it is missing, unreadable or not an object (a damaged record)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _has_shard_column(path: Path) -> bool:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return "shard" in next(csv.reader(fh), [])
    except OSError:
        return False


def load_ledgers(out: Path, model: Scored, *, other_settings: bool = False) -> dict[str, dict[str, Any]]:
    """``{variant: ledger}`` of the results in ``out`` made with this model's settings (or, with
    ``other_settings``, with other settings or by an older version: results a merge must not drop silently)."""
    folder = model_dir(out, model.id) / DONE_DIR
    ledgers: dict[str, dict[str, Any]] = {}
    if not folder.is_dir():
        return ledgers
    for path in sorted(folder.glob("*.json")):
        ledger = read_json_object(path)
        usable = (bool(ledger) and ledger.get("signature") == model.signature  # type: ignore[union-attr]
                  and isinstance(ledger.get("shards"), dict)  # type: ignore[union-attr]
                  and _has_shard_column(predictions_path(out, model.id, path.stem)))
        if usable != other_settings:
            ledgers[path.stem] = ledger or {}
    return ledgers


def set_aside(out: Path, model_id: str, variant: str) -> Path:
    """Move a variant's results made with other settings out of the way (kept, never deleted)."""
    folder = model_dir(out, model_id) / REPLACED_DIR
    folder.mkdir(parents=True, exist_ok=True)
    n = 1 + sum(1 for _ in folder.glob(f"{variant}-*.csv"))
    kept = folder / f"{variant}-{n}.csv"
    for src, dst in ((predictions_path(out, model_id, variant), kept), (done_path(out, model_id, variant),
                                                                        kept.with_suffix(".json"))):
        if src.exists():
            os.replace(src, dst)
    return kept


def _current(entry: dict[str, Any], ref: ShardRef) -> bool:
    """Whether a ledger entry or part was made from the bytes ``ref`` has now."""
    now = fingerprint(ref)
    return now is None or entry.get("fingerprint") == now


def load_part(out: Path, model: Scored, ref: ShardRef) -> dict[str, Any] | None:
    part = read_json_object(part_path(out, model.id, shard_id(ref)))
    if not part or part.get("signature") != model.signature or not _current(part, ref):
        return None
    return part


@dataclass
class PendingWork:
    """Which models still need which shards (indices into the run's shard list)."""

    needs: dict[int, list[int]]  # shard index -> model indices

    @property
    def shard_indices(self) -> list[int]:
        return sorted(self.needs)


def pending_work(out: Path, models: Sequence[Scored], refs: Sequence[ShardRef]) -> PendingWork:
    needs: dict[int, list[int]] = {}
    for m, model in enumerate(models):
        covered: dict[str, dict[str, Any]] = {}
        for ledger in load_ledgers(out, model).values():
            covered.update(ledger["shards"])
        for s, ref in enumerate(refs):
            entry = covered.get(shard_id(ref))
            if entry is not None and _current(entry, ref):
                continue
            if load_part(out, model, ref) is not None:
                continue
            needs.setdefault(s, []).append(m)
    return PendingWork(needs)


def write_part(
    out: Path, model: Scored, ref: ShardRef, rows: dict[str, list[list[Any]]], skipped: dict[str, int],
    seconds: float, observed_sha256: str, device: str,
) -> None:
    """Commit one (model, shard) whose shard was read and verified completely."""
    n = sum(len(r) for r in rows.values())
    part = {
        "shard_id": shard_id(ref),
        "shard": ref.name,
        "url": ref.url,
        "fingerprint": fingerprint(ref),
        "sha256": observed_sha256,
        "count": ref.count,
        "signature": model.signature,
        "device": device,
        "variants": {
            v: {"rows": rows.get(v, []), "skipped": skipped.get(v, 0),
                "seconds": seconds * len(rows.get(v, [])) / n if n else 0.0}
            for v in sorted(set(rows) | set(skipped))
        },
    }
    atomic_write_text(part_path(out, model.id, shard_id(ref)), json.dumps(part))


def _rows_by_shard(out: Path, model_id: str, variant: str) -> dict[str, list[list[Any]]]:
    grouped: dict[str, list[list[Any]]] = {}
    path = predictions_path(out, model_id, variant)
    if path.is_file():
        for row in read_predictions(path).to_rows():
            grouped.setdefault(row[8], []).append(row)
    return grouped


def _part_entry(part: dict[str, Any], variant: str) -> dict[str, Any]:
    block = part["variants"][variant]
    return {
        "shard": part["shard"], "url": part["url"], "fingerprint": part["fingerprint"], "sha256": part["sha256"],
        "count": part["count"],
        "n": len(block["rows"]), "skipped": block["skipped"], "seconds": block["seconds"], "device": part["device"],
        "variants_in_shard": len(part["variants"]),
    }


@dataclass
class MergeOutcome:
    variants: list[str]  # the variants this run covers for the model
    set_aside: list[Path]  # results made with other settings, moved to .replaced/


def merge_model(out: Path, model: Scored, refs: Sequence[ShardRef], limit: int | None) -> MergeOutcome:
    """Fold this run's parts into the predictions of ``model``.

    Shard by shard the newest rows win: a part if there is one, else the
    ledger's own rows. Ledger entries of shards that this run's shards
    supersede (the same dataset folder, other bytes or another shard set) are
    dropped; results of the same variant made with other settings are set
    aside in ``.replaced/``, never overwritten.
    """
    refs_by_sid = {shard_id(r): r for r in refs}
    run_folders = {_folder(r.url) for r in refs} - {None}
    ledgers = load_ledgers(out, model)
    others = load_ledgers(out, model, other_settings=True)
    parts = {sid: part for sid, ref in refs_by_sid.items() if (part := load_part(out, model, ref)) is not None}
    covered = {sid for ledger in ledgers.values() for sid, e in ledger["shards"].items()
               if sid in refs_by_sid and _current(e, refs_by_sid[sid])}
    missing = [sid for sid in refs_by_sid if sid not in parts and sid not in covered]
    if missing:
        raise EvalError(f"{model.id}: no results for shard(s) {', '.join(missing[:3])} (a rank failed?)")
    variants = set(ledgers) | {v for part in parts.values() for v in part["variants"]}
    outcome = MergeOutcome([], [])
    for variant in sorted(variants):
        ledger = ledgers.get(variant, {"shards": {}})
        kept = {sid: e for sid, e in ledger["shards"].items()
                if sid in refs_by_sid or _folder(str(e.get("url", ""))) not in run_folders}
        sids = set(kept) | {sid for sid, p in parts.items() if variant in p["variants"]}
        if not sids & set(refs_by_sid):
            continue  # nothing of this run: the variant's results stay as they are
        outcome.variants.append(variant)
        fresh = any(variant in parts[sid]["variants"] for sid in sids if sid in parts)
        if not fresh and len(kept) == len(ledger["shards"]):
            continue  # every shard of this run was already merged
        old = _rows_by_shard(out, model.id, variant) if variant in ledgers else {}
        rows: list[list[Any]] = []
        entries: dict[str, dict[str, Any]] = {}
        for sid in sorted(sids):
            if sid in parts:
                if variant in parts[sid]["variants"]:  # the newest rows of this shard
                    rows += parts[sid]["variants"][variant]["rows"]
                    entries[sid] = _part_entry(parts[sid], variant)
                continue  # rescored, and it holds no sample of this variant any more
            entry = kept[sid]
            rows_of_shard = old.get(sid, [])
            if len(rows_of_shard) != int(entry.get("n", -1)):
                raise EvalError(f"{model.id}/{variant}: {predictions_path(out, model.id, variant)} holds "
                                f"{len(rows_of_shard)} rows of {entry.get('shard', sid)}, its ledger {entry.get('n')}: "
                                "rescore into a new --out")
            rows += rows_of_shard
            entries[sid] = entry
        uncovered = [r.name for sid, r in refs_by_sid.items() if r.variant == variant and sid not in entries]
        if uncovered:
            raise EvalError(f"{model.id}/{variant}: no results for {', '.join(uncovered[:3])}")
        check_exactly_once(model.id, variant, rows, entries, limit)
        if variant in others:
            outcome.set_aside.append(set_aside(out, model.id, variant))
        write_predictions(predictions_path(out, model.id, variant), Predictions.from_rows(rows))
        atomic_write_text(done_path(out, model.id, variant),
                          json.dumps({"signature": model.signature, "shards": entries}, indent=1, sort_keys=True))
    for sid in parts:  # only once every variant is written: a kill before this merges them again
        part_path(out, model.id, sid).unlink(missing_ok=True)
    parts_dir = model_dir(out, model.id) / PARTS_DIR
    if parts_dir.is_dir() and not any(parts_dir.iterdir()):
        parts_dir.rmdir()
    return outcome


def check_exactly_once(
    model_id: str, variant: str, rows: list[list[Any]], entries: dict[str, dict[str, Any]], limit: int | None
) -> None:
    """No key twice, and (with a manifest) scored + skipped equals the manifest's sample count."""
    seen: set[str] = set()
    for row in rows:
        if row[0] in seen:
            raise EvalError(f"{model_id}/{variant}: key {row[0]} scored twice (same key in two shards?)")
        seen.add(row[0])
    if limit is not None:
        return
    shard_entries = list(entries.values())
    counts = [e["count"] for e in shard_entries]
    # A manifest count is per shard, so it applies to a variant only when its shards hold nothing else.
    single = all(int(e.get("variants_in_shard", 1)) == 1 for e in shard_entries)
    if counts and single and all(c is not None for c in counts):
        expected = sum(counts)
        skipped = sum(int(e["skipped"]) for e in shard_entries)
        if len(rows) + skipped != expected:
            raise EvalError(
                f"{model_id}/{variant}: scored {len(rows)} + skipped {skipped} samples, manifest says {expected}"
            )


def read_ledger(out: Path, model_id: str, variant: str) -> dict[str, Any]:
    return read_json_object(done_path(out, model_id, variant)) or {"shards": {}}
