"""The Backgrounds Challenge in the report: what ``python -m eval.challenge`` wrote, beside the report's clean accuracy.

eval.challenge writes ``challenge.csv`` (one row per model) and
``challenge/<model>/`` (one row per foreground; with ``--exhaustive`` the
strongest backgrounds per class) into the results folder eval.score writes.
When ``challenge.csv`` is there the report shows, per model, its challenge
accuracy with the Wilson 95% interval, recomputed from the counts and checked
against the per-foreground file, beside the report's own ``accuracy`` on
``original`` in the same label space; a figure of the two; and, when the
shards can be read, a few foregrounds next to the background that fooled
them and the composite the model saw, and the strongest backgrounds.

Nothing here searches again; the on-disk format is ``eval.challenge.results``
(which loads no torch).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eval import metrics as M
from eval.challenge import results as R
from eval.report.compute import ModelMetrics
from eval.report.gallery import Thumbnail
from eval.report.html import CaptionLine, GalleryImage, GalleryRow, GallerySection
from eval.report.inputs import LABEL_SPACES, Notes, class_names
from eval.report.thumbnails import THUMB_PX, RecordedShard, ShardFinder, read_recorded, thumbnail_jpeg

if TYPE_CHECKING:
    import torch

    from eval.stream import Sample
    from pipeline.shard_format.locate import ShardRef

CHALLENGE_VARIANTS = (R.FOREGROUND_VARIANT, R.BACKGROUND_VARIANT)  # foregrounds (with masks), their backgrounds
# Noise or Signal's leaderboard (README of github.com/MadryLab/backgrounds_challenge), IN-9:
# (model, challenge accuracy, clean accuracy on IN-9).
NOS_REFERENCE = (("ResNet-50", 0.223, 0.956), ("ResNet-50 (IN-9L)", 0.120, 0.964))
STRONGEST_CLASSES = 12  # rows of strongest backgrounds per model: all nine IN-9 classes, or the 12 strongest in1k
STRONGEST_SHOWN = 3  # backgrounds per class row (strongest.csv keeps up to 5)
MAX_SHARDS = 8  # shards read for the challenge's images, whatever the number of models


@dataclass(frozen=True)
class ChallengeResult:
    """One challenge.csv row: the model's challenge accuracy (a fraction) and, beside it, its clean accuracy."""

    model: str
    label_space: str
    foregrounds: int | None
    vulnerable: int | None
    accuracy: M.Estimate | None  # share of foregrounds no background fooled, Wilson 95%; None without counts
    backgrounds: int | None
    exhaustive: bool
    error: str = ""
    clean: M.Estimate | None = None  # the report's accuracy on original in the same label space, when scored

    def to_json(self) -> dict[str, Any]:
        def est(e: M.Estimate | None) -> dict[str, float] | None:
            return None if e is None else {"value": e.value, "lo": e.lo, "hi": e.hi, "n": e.n}

        return {"model": self.model, "label_space": self.label_space, "foregrounds": self.foregrounds,
                "vulnerable": self.vulnerable, "challenge_accuracy": est(self.accuracy),
                "clean_accuracy": est(self.clean), "backgrounds": self.backgrounds, "exhaustive": self.exhaustive,
                "error": self.error}


@dataclass
class Challenge:
    """What the report shows of a challenge: a result per model, and each model's rows of foregrounds.csv."""

    results: list[ChallengeResult]
    foregrounds: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)  # why something is not shown, one line each


def has_challenge(results_dir: Path) -> bool:
    return (results_dir / R.SUMMARY_NAME).is_file()


def _count(text: str) -> int | None:
    try:
        value = int(text)
    except (TypeError, ValueError):
        return None
    return value if value >= 0 else None


def _plain_name(model: str) -> bool:
    """A model id that names a folder under challenge/ and nothing else (the CSV is data)."""
    return bool(model) and model not in (".", "..") and Path(model).name == model and "\\" not in model


def read_challenge(results_dir: Path, per_space: dict[str, dict[str, ModelMetrics]], notes: Notes) -> Challenge:
    """challenge.csv's rows, each with its counts checked and the same model's clean accuracy beside it."""

    try:
        rows = R.read_summary(results_dir)
    except (OSError, csv.Error, UnicodeDecodeError, KeyError) as exc:
        why = f"no {exc} column" if isinstance(exc, KeyError) else str(exc)
        line = f"{R.SUMMARY_NAME} unreadable ({why}): no Backgrounds Challenge shown"
        notes.add(line)
        return Challenge([], lines=[line])
    challenge = Challenge([])
    for model, row in rows.items():
        if not _plain_name(model):
            notes.add(f"{R.SUMMARY_NAME}: model id {model!r} is not a plain name, row left out")
            continue
        label_space = row["label_space"]
        if label_space not in LABEL_SPACES:
            notes.add(f"{R.SUMMARY_NAME}: {model} has label space {label_space!r}, neither of "
                      f"{', '.join(LABEL_SPACES)}; its clean accuracy is left out")
        n, vulnerable = _count(row["foregrounds"]), _count(row["vulnerable"])
        error = row["error"].strip()
        accuracy = None
        if not error:
            if n and vulnerable is not None and vulnerable <= n:
                lo, hi = M.wilson_interval(n - vulnerable, n)
                accuracy = M.Estimate((n - vulnerable) / n, lo, hi, n)
                _check_written(model, row, accuracy, notes)
                challenge.foregrounds[model] = _checked_foregrounds(results_dir, model, n, vulnerable, notes)
            else:
                notes.add(f"{R.SUMMARY_NAME}: {model} has neither an error nor usable counts (foregrounds "
                          f"{row['foregrounds']!r}, vulnerable {row['vulnerable']!r})")
        scored = per_space.get(label_space, {}).get(model)
        challenge.results.append(ChallengeResult(
            model, label_space, n, vulnerable, accuracy, _count(row["backgrounds"]), row["exhaustive"] == "1", error,
            scored.clean if scored is not None else None))
    challenge.results.sort(key=lambda r: (r.label_space, r.accuracy is None,
                                          -(r.accuracy.value if r.accuracy else 0.0), r.model))
    return challenge


def _check_written(model: str, row: dict[str, str], accuracy: M.Estimate, notes: Notes) -> None:
    """The percentage challenge.csv states must be the one its counts give (a hand-edited file is noticed)."""
    try:
        written = float(row["challenge_accuracy"])
    except ValueError:
        return
    if not math.isclose(written, 100 * accuracy.value, abs_tol=5e-4):
        notes.add(f"{R.SUMMARY_NAME}: {model}'s challenge_accuracy {written} is not what its counts give "
                  f"({100 * accuracy.value:.3f}); the report shows the counts'")


def _checked_foregrounds(results_dir: Path, model: str, n: int, vulnerable: int, notes: Notes) -> list[dict[str, str]]:
    """The model's foregrounds.csv, when it holds the foregrounds challenge.csv counts ([] and a note when not)."""

    try:
        raw = R.read_foregrounds(results_dir, model)
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        notes.add(f"challenge: {model}'s {R.FOREGROUNDS_NAME} unreadable ({exc}): its foregrounds are not shown")
        return []
    rows = _clean_rows(raw, R.FOREGROUND_COLUMNS, R.FOREGROUNDS_NAME, model, notes)
    if raw and not rows:
        return []
    marked = sum(r["vulnerable"] == "1" for r in rows)
    if len(rows) != n or marked != vulnerable:
        notes.add(f"challenge: {model}'s {R.FOREGROUNDS_NAME} holds {len(rows)} foregrounds, {marked} vulnerable; "
                  f"{R.SUMMARY_NAME} says {n} and {vulnerable}: rerun python -m eval.challenge; its foregrounds "
                  "are not shown")
        return []
    return rows


def challenge_long_rows(challenge: Challenge) -> list[dict]:
    """metrics.csv rows: one ``challenge_accuracy`` per model with counts (columns as tables.CSV_COLUMNS)."""
    return [{"model": r.model, "label_space": r.label_space, "metric": "challenge_accuracy", "variant": "",
             "variants": ",".join(CHALLENGE_VARIANTS), "category": "", "class": "", "value": r.accuracy.value,
             "lo": r.accuracy.lo, "hi": r.accuracy.hi, "n": r.accuracy.n}
            for r in challenge.results if r.accuracy is not None]


# ---------------------------------------------------------------- the images


def _clean_rows(rows: Sequence[dict[Any, Any]], columns: Sequence[str], what: str, model: str,
                notes: Notes) -> list[dict[str, str]]:
    """A results file's rows with every column present as text ([] and a note when its header lacks one)."""
    if rows and not set(columns) <= set(rows[0]):
        notes.add(f"challenge: {model}'s {what} lacks column(s) {', '.join(sorted(set(columns) - set(rows[0])))}: "
                  "not shown")
        return []
    return [{c: r.get(c) or "" for c in columns} for r in rows]


def _recorded(entry: object) -> RecordedShard | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(entry.get("url"), str):
        return None
    sha256 = entry.get("sha256")
    return RecordedShard(entry["name"], entry["url"], sha256 if isinstance(sha256, str) else "")


class _Backgrounds:
    """backgrounds.json: each background's shard and classes, by key."""

    def __init__(self, index: Any) -> None:
        self.index = index
        self.at = {key: j for j, key in enumerate(index.keys)}
        self.shards = [_recorded(s) for s in index.shards]

    @classmethod
    def read(cls, results_dir: Path) -> _Backgrounds | None:

        index = R.read_background_index(results_dir)
        if index is None:
            return None
        n = len(index.keys)
        if not (len(index.labels) == len(index.in9_labels) == len(index.shard_of) == n) or not all(
                isinstance(s, int) and 0 <= s < len(index.shards) for s in index.shard_of):
            return None
        return cls(index)

    def shard(self, key: str) -> RecordedShard | None:
        return self.shards[self.index.shard_of[self.at[key]]] if key in self.at else None

    def label(self, key: str, label_space: str = "in1k") -> int:
        j = self.at[key]
        return int(self.index.in9_labels[j] if label_space == "in9" else self.index.labels[j])


@dataclass(frozen=True)
class _Wanted:
    """One image the challenge gallery shows: which shard holds it, and the ImageNet-1k label it must have there."""

    shard: RecordedShard
    key: str
    label: int
    mask: bool = False  # a foreground: its mask is read too


def fooled_choice(rows: Sequence[dict[str, str]], size: int) -> list[dict[str, str]]:
    """The first ``size`` vulnerable foregrounds by key: the same rows whatever the file's order."""
    return sorted((r for r in rows if r["vulnerable"] == "1" and r["fooled_by"]), key=lambda r: r["key"])[:size]


def strongest_choice(rows: Sequence[dict[str, str]]) -> list[tuple[str, list[dict[str, str]]]]:
    """(class name, its strongest backgrounds by rank) for the classes whose strongest background fools most,
    in class order."""
    by_class: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_class.setdefault(r["class_name"], []).append(r)
    for members in by_class.values():
        members.sort(key=lambda r: _count(r["rank"]) or 0)

    def rate(name: str) -> float:
        try:
            return float(by_class[name][0]["attack_success_rate"])
        except ValueError:
            return -1.0

    chosen = sorted(by_class, key=lambda c: (-rate(c), c))[:STRONGEST_CLASSES]
    chosen.sort(key=lambda c: (_count(by_class[c][0]["class"]) or 0, c))
    return [(c, by_class[c][:STRONGEST_SHOWN]) for c in chosen]


def composite_image(foreground: torch.Tensor, mask: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W): the foreground's masked pixels over the background, as the challenge composed them.

    ``mask`` is the decoded ``<key>.mask.png``, uint8 (H, W); eval.challenge.search.composite does the pasting.
    """
    import torch

    from eval.challenge.search import composite

    first = torch.zeros(1, dtype=torch.int64)
    return composite(foreground[None], (mask > R.MASK_THRESHOLD)[None, None], background[None], first, first)[0]


def _image(image: torch.Tensor | None, alt: str, label: str, lines: Sequence[CaptionLine], context: bool = False,
           why: str = "image not read") -> GalleryImage:
    if image is None:
        return GalleryImage("", f"{alt}: {why}", label, (CaptionLine(why, "muted"), *lines), THUMB_PX, THUMB_PX,
                            context)
    jpeg, width, height = thumbnail_jpeg(image)
    return GalleryImage(Thumbnail(alt, label, jpeg, width, height).src, alt, label, tuple(lines), width, height,
                        context)


def _class(label_space: str, index: int) -> str:
    names = class_names(label_space)
    if 0 <= index < len(names):
        return names[index]
    return "outside the 9 IN-9 classes" if label_space == "in9" else f"class {index}"


def _index(text: str) -> int:
    """A class index as foregrounds.csv writes it; -1 (no class) for anything else."""
    try:
        return int(text)
    except ValueError:
        return -1


@dataclass
class ChallengeGallery:
    """The challenge's rows of images, and one line per thing not shown."""

    sections: list[GallerySection] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Plan:
    result: ChallengeResult
    fooled: list[dict[str, str]]  # foregrounds.csv rows
    strongest: list[tuple[str, list[dict[str, str]]]]  # (class name, strongest.csv rows)
    fg_shards: dict[str, RecordedShard]


def challenge_gallery(results_dir: Path, challenge: Challenge, shards: Sequence[str] | None, size: int,
                      notes: Notes) -> ChallengeGallery:
    """Per model: ``size`` fooled foregrounds with the background that fooled them and their composite, and with
    --exhaustive the strongest backgrounds per class; images read from at most :data:`MAX_SHARDS` shards."""

    out = ChallengeGallery()
    if size <= 0:
        out.lines.append("No challenge images: --gallery-size 0.")
        return out
    backgrounds = _Backgrounds.read(results_dir)
    if backgrounds is None:
        out.lines.append(f"No challenge images: {R.challenge_dir(results_dir) / R.BACKGROUNDS_INDEX} is missing or "
                         "unreadable, so the backgrounds cannot be found.")
        return out
    plans: list[_Plan] = []
    wanted: list[_Wanted] = []  # in the order they are worth reading: fooled foregrounds first
    for result in challenge.results:
        if result.accuracy is None:
            continue
        fg_shards = {s.name: s for e in R.read_foreground_shards(results_dir, result.model)
                     if (s := _recorded(e)) is not None}
        fooled = [r for r in fooled_choice(challenge.foregrounds.get(result.model, []), size)
                  if r["shard"] in fg_shards and backgrounds.shard(r["fooled_by"]) is not None]
        strongest_rows = _clean_rows(R.read_strongest(results_dir, result.model), R.STRONGEST_COLUMNS,
                                     R.STRONGEST_NAME, result.model, notes)
        strongest = [(c, kept) for c, members in strongest_choice(strongest_rows)
                     if (kept := [b for b in members if backgrounds.shard(b["key"]) is not None])]
        for r in fooled:
            wanted.append(_Wanted(fg_shards[r["shard"]], r["key"], _index(r["label"]), mask=True))
            wanted.append(_Wanted(backgrounds.shard(r["fooled_by"]), r["fooled_by"],  # type: ignore[arg-type]
                                  backgrounds.label(r["fooled_by"])))
        plans.append(_Plan(result, fooled, strongest, fg_shards))
    for plan in plans:
        wanted += [_Wanted(backgrounds.shard(b["key"]), b["key"], backgrounds.label(b["key"]))  # type: ignore[arg-type]
                   for _, members in plan.strongest for b in members]
    if not wanted:
        out.lines.append("No challenge images: no model has a vulnerable foreground in foregrounds.csv, nor "
                         "strongest backgrounds (python -m eval.challenge --exhaustive writes them).")
        return out

    images, read, left_out = _read_images(wanted, shards, notes)
    out.summary = {"shards_read": read, "images": len(images)}
    if left_out:
        out.lines.append(f"{left_out} challenge image(s) left out: their shards are beyond the {MAX_SHARDS} read.")
    if not images:
        out.lines.append(f"No challenge images: none of the {len(wanted)} wanted images could be read from the "
                         "shards eval.challenge recorded (see the notes); pass --shards SPEC to say where they are.")
        return out
    for plan in plans:
        if plan.fooled:
            out.sections.append(_fooled_section(plan, images, backgrounds))
        if plan.strongest:
            out.sections.append(_strongest_section(plan, images, backgrounds))
    out.summary["sections"] = {s.ident: [r.key for r in s.rows] for s in out.sections}
    return out


def _read_images(wanted: list[_Wanted], shards: Sequence[str] | None, notes: Notes
                 ) -> tuple[dict[tuple[str, str], Sample], int, int]:
    """The wanted samples by (shard name, key), labels checked; how many shards were read; images left out."""
    finder = ShardFinder(shards, notes)
    refs: dict[RecordedShard, ShardRef | str] = {}
    keys: dict[ShardRef, set[str]] = {}
    with_masks: set[ShardRef] = set()
    left_out = 0
    for item in wanted:
        if item.shard not in refs:
            refs[item.shard] = finder.ref(item.shard)
            if isinstance(refs[item.shard], str):
                notes.add(f"challenge gallery: {refs[item.shard]}")
        ref = refs[item.shard]
        if isinstance(ref, str):
            continue
        if ref not in keys and len(keys) >= MAX_SHARDS:
            left_out += 1
            continue
        keys.setdefault(ref, set()).add(item.key)
        if item.mask:
            with_masks.add(ref)
    found = {**read_recorded({r: k for r, k in keys.items() if r in with_masks}, notes, masks=True),
             **read_recorded({r: k for r, k in keys.items() if r not in with_masks}, notes)}
    labels = {(item.shard.name, item.key): item.label for item in wanted}
    for at, sample in list(found.items()):
        if sample.label != labels.get(at, sample.label):
            notes.add(f"challenge gallery: {sample.key} in {sample.shard} has label {sample.label}, the challenge "
                      f"recorded {labels[at]}: not the shard it read, image left out")
            del found[at]
    return found, len(keys), left_out


def _fooled_section(plan: _Plan, images: dict[tuple[str, str], Sample], backgrounds: _Backgrounds) -> GallerySection:
    model, space = plan.result.model, plan.result.label_space
    rows = []
    for r in plan.fooled:
        key, bg_key = r["key"], r["fooled_by"]
        fg = images.get((r["shard"], key))
        bg = images.get((backgrounds.shard(bg_key).name, bg_key))  # type: ignore[union-attr]
        label = _index(r["in9_label"] if space == "in9" else r["label"])
        composite, why = None, "composite not made: foreground or background not read"
        if fg is not None and bg is not None:
            if fg.mask is None:
                why = "composite not made: the foreground shard has no mask"
            elif fg.image.shape != bg.image.shape:  # type: ignore[union-attr]
                why = "composite not made: foreground and background differ in size"
            else:
                composite = composite_image(fg.image, fg.mask, bg.image)  # type: ignore[arg-type]
        row_images = (
            _image(fg.image if fg else None, f"{key} foreground", "foreground", (CaptionLine(_class(space, label)),)),
            _image(bg.image if bg else None, f"{bg_key} background that fooled {model} on {key}",
                   "background that fooled it",
                   (CaptionLine(bg_key, "muted"), CaptionLine(_class(space, backgrounds.label(bg_key, space)))),
                   context=True),
            _image(composite, f"{key} on {bg_key}: composite", "composite",
                   (CaptionLine(f"✗ {_class(space, _index(r['pred']))}", "wrong"),), why=why),
        )
        tried = _count(r["tried"])
        head = (CaptionLine(key), CaptionLine(_class(space, label)),
                CaptionLine(f"fooled by background {tried} of {plan.result.backgrounds} in search order"
                            if tried else "fooled", "muted"))
        rows.append(GalleryRow(key, row_images, head))
    caption = (f"The first {len(rows)} of {model}'s {plan.result.vulnerable} vulnerable foregrounds (by key), each "
               "beside the first background in search order that fooled it and their composite (the foreground's "
               f"masked pixels over the background, as the challenge pasted them); under the composite {model}'s "
               f"{space} top-1 on it.")
    return GallerySection(f"challenge-fooled-{model}", f"Fooled foregrounds: {model} ({space})", caption, tuple(rows))


def _strongest_section(plan: _Plan, images: dict[tuple[str, str], Sample], backgrounds: _Backgrounds
                       ) -> GallerySection:
    model = plan.result.model
    rows = []
    for class_name, members in plan.strongest:
        row_images = []
        for b in members:
            sample = images.get((backgrounds.shard(b["key"]).name, b["key"]))  # type: ignore[union-attr]
            try:
                rate = f"{100 * float(b['attack_success_rate']):.1f}%"
            except ValueError:
                rate = "–"
            row_images.append(_image(sample.image if sample else None, f"{b['key']} background of class {class_name}",
                                     f"rank {b['rank']}", (CaptionLine(f"attack success {rate}"),
                                                           CaptionLine(f"{b['hits']} of {b['trials']} foregrounds",
                                                                       "muted"),
                                                           CaptionLine(b["key"], "muted")), context=True))
        head = (CaptionLine(class_name), CaptionLine(f"its {len(members)} strongest background(s)", "muted"))
        rows.append(GalleryRow(f"{model}-{class_name}", tuple(row_images), head))
    caption = (f"Per class (up to {STRONGEST_CLASSES}: those whose strongest background fools most), the backgrounds "
               f"of that class that most often make {model} predict it on another class's foreground; attack success "
               "rate = that share of the other classes' foregrounds (strongest.csv of an exhaustive run).")
    return GallerySection(f"challenge-strongest-{model}", f"Strongest backgrounds: {model} ({plan.result.label_space})",
                          caption, tuple(rows))


def challenge_json(challenge: Challenge, figure: dict[str, Any], gallery: ChallengeGallery) -> dict[str, Any]:
    return {"results": [r.to_json() for r in challenge.results], "figure": figure,
            "gallery": {**gallery.summary, "lines": gallery.lines}, "lines": challenge.lines,
            "reference": [{"model": m, "challenge_accuracy": a, "clean_accuracy": c, "label_space": "in9",
                           "source": M.NOS_README} for m, a, c in NOS_REFERENCE]}

