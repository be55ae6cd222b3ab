"""Which source images the gallery shows, and the rows of thumbnails and captions it shows them in.

Rows are chosen from one model's ImageNet-1k predictions (the *reference*
model: the first ``--gallery-model``, else the most accurate on original):

- per Noise or Signal category (BG Required, BG Fools, BG+FG Required, BG+FG
  Fools, from correctness on original, mixed_rand and only_bg_t), a seeded
  sample of ``size`` keys: each member key is ranked by
  sha256(seed, category, key), so the choice depends on the seed and the key
  alone, not on file order or on which other keys exist;
- the largest background-driven flips over every novel-background variant
  scored (only_fg, mixed_rand, texture): wrong there where original was right,
  or switched to the class of the image the background came from; those that
  switched first, then by the largest drop in p(true);
- without only_bg_t (the background_check recipe) the categories cannot be
  formed: the flips alone, said in one line.

Each row shows every variant of the key side by side, with every gallery
model's top-1 class name and p(true) under each thumbnail. Predictions are
kept compact (:class:`PredictionStore`) while the metrics pass reads them, so
no predictions file is parsed twice.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from eval import metrics as M
from eval.predictions import Predictions
from eval.report.html import CaptionLine, GalleryImage, GalleryRow, GallerySection
from pipeline.classes import imagenet_classes, in9_names, to_in9
from pipeline.variants import VARIANT_SPECS

GALLERY_SIZE = 6  # rows per section: ~30 rows x up to 9 variants stays a few hundred thumbnails
GALLERY_SEED = 0
# The four categories a picture explains; BG Irrelevant (O = M) is the unremarkable rest.
GALLERY_CATEGORIES = tuple(c for c in M.CATEGORIES if c != "bg_irrelevant")  # the four that involve the background
CATEGORY_VARIANTS = M.METRIC_BY_NAME["category_share"].reads()  # O, M, B as eval.metrics reads them


# ---------------------------------------------------------------- compact predictions


@dataclass
class VariantRows:
    """One model's ImageNet-1k results on one variant; ``rows`` index :attr:`PredictionStore.keys`."""

    rows: np.ndarray  # int32
    label: np.ndarray  # int16
    pred: np.ndarray  # int16
    p_true: np.ndarray  # float32
    bg_label: np.ndarray  # int16, -1 where the sample carries no other image's background

    @property
    def correct(self) -> np.ndarray:
        return self.pred == self.label


@dataclass
class PredictionStore:
    """What the gallery needs of every model's predictions, about 14 bytes a row, keys interned once."""

    keys: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)  # by key index, as first seen
    models: dict[str, dict[str, VariantRows]] = field(default_factory=dict)
    _index: dict[str, int] = field(default_factory=dict)

    def add(self, model: str, preds: dict[str, Predictions]) -> None:
        by_variant = self.models.setdefault(model, {})
        for variant, p in preds.items():
            rows = np.fromiter((self._intern(str(k), int(y)) for k, y in zip(p.keys, p.label, strict=True)),
                               dtype=np.int32, count=len(p))
            by_variant[variant] = VariantRows(rows, p.label.astype(np.int16), p.pred.astype(np.int16),
                                              p.p_true.astype(np.float32), p.bg_label.astype(np.int16))

    def _intern(self, key: str, label: int) -> int:
        index = self._index.get(key)
        if index is None:
            index = self._index[key] = len(self.keys)
            self.keys.append(key)
            self.labels.append(label)
        return index

    def label_of(self, key: str) -> int | None:
        """The key's ImageNet-1k label as its predictions give it; None for a key no model scored."""
        index = self._index.get(key)
        return None if index is None else self.labels[index]

    def clean_accuracy(self, model: str) -> float:
        original = self.models.get(model, {}).get("original")
        return float(original.correct.mean()) if original is not None and len(original.rows) else -1.0

    def lookup(self, model: str, variant: str, keys: Iterable[str]) -> dict[str, tuple[int, float, int]]:
        """``{key: (pred, p_true, label)}`` for those of ``keys`` the model scored on ``variant``."""
        data = self.models.get(model, {}).get(variant)
        wanted = {self._index[k]: k for k in keys if k in self._index}
        if data is None or not wanted:
            return {}
        at = np.flatnonzero(np.isin(data.rows, np.fromiter(wanted, dtype=np.int32)))
        return {wanted[int(data.rows[i])]: (int(data.pred[i]), float(data.p_true[i]), int(data.label[i])) for i in at}


# ---------------------------------------------------------------- which keys


@dataclass(frozen=True)
class RowChoice:
    key: str
    reason: str  # one line: why this key is in its section


@dataclass(frozen=True)
class SectionChoice:
    ident: str  # a category name, or "flips"
    title: str
    caption: str
    rows: tuple[RowChoice, ...]
    candidates: int  # keys that qualified, of which ``rows`` were shown


def gallery_models(store: PredictionStore, requested: Sequence[str] | None) -> list[str]:
    """The models the captions show, reference first: as requested, else all by clean accuracy (best first)."""
    if requested:
        unknown = [m for m in requested if m not in store.models]
        if unknown:
            raise ValueError(f"--gallery-model {', '.join(unknown)}: no predictions for it "
                             f"(models: {', '.join(sorted(store.models))})")
        return list(dict.fromkeys(requested))
    return sorted(store.models, key=lambda m: (-store.clean_accuracy(m), m))


def seeded_rank(seed: int, section: str, key: str) -> str:
    """A key's place in a section's seeded sample: the same for the same (seed, section, key), whatever else exists."""
    return hashlib.sha256(f"{seed}\0{section}\0{key}".encode()).hexdigest()


def _join(a: VariantRows, b: VariantRows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(store key indices, positions in a, positions in b) of the keys both hold."""
    shared, ia, ib = np.intersect1d(a.rows, b.rows, assume_unique=True, return_indices=True)
    return shared, ia, ib


def outcome_categories() -> dict[tuple[bool, bool, bool], str]:
    """(O, M, B) -> category, read off eval.metrics.prediction_categories itself (one definition, not two)."""
    table: dict[tuple[bool, bool, bool], str] = {}
    for o in (False, True):
        for m in (False, True):
            for b in (False, True):
                counts = M.prediction_categories(np.array([o]), np.array([m]), np.array([b])).counts
                table[(o, m, b)] = next(c for c, n in counts.items() if n)
    return table


def _category_sections(store: PredictionStore, data: dict[str, VariantRows], reference: str, size: int,
                       seed: int) -> list[SectionChoice]:
    o, m, b = (data[v] for v in CATEGORY_VARIANTS)
    shared_om, io, im = _join(o, m)
    _, keep, ib = np.intersect1d(shared_om, b.rows, assume_unique=True, return_indices=True)
    keys = shared_om[keep]
    io, im = io[keep], im[keep]
    correct = (o.correct[io], m.correct[im], b.correct[ib])
    table = outcome_categories()
    category = [table[(bool(x), bool(y), bool(z))] for x, y, z in zip(*correct, strict=True)]
    sections = []
    for name in GALLERY_CATEGORIES:
        members = [i for i, c in enumerate(category) if c == name]
        members.sort(key=lambda i: seeded_rank(seed, name, store.keys[keys[i]]))
        rows = tuple(RowChoice(store.keys[keys[i]], "p(true): " + ", ".join(
            f"{v} {p:.2f}" for v, p in zip(CATEGORY_VARIANTS, (o.p_true[io[i]], m.p_true[im[i]], b.p_true[ib[i]]),
                                           strict=True))) for i in members[:size])
        sections.append(SectionChoice(
            name, M.CATEGORY_TITLES[name],
            f"{M.CATEGORY_RULES[name]} for {reference}, with O, M, B = right on original, mixed_rand, only_bg_t "
            f"(ImageNet-1k top-1): {len(rows)} of {len(members)} image(s), a sample drawn with seed {seed}.",
            rows, len(members)))
    return sections


def _flip_section(store: PredictionStore, data: dict[str, VariantRows], variants: Sequence[str], reference: str,
                  size: int) -> SectionChoice:
    """Keys whose top-1 a new background (or none) broke: wrong on a variant where original was right, or where
    the model switched to the class of the image the background came from."""
    o = data["original"]
    to_bg: dict[int, bool] = {}
    drop: dict[int, float] = {}
    flips: dict[int, list[str]] = {}
    o_at = {int(k): i for i, k in enumerate(o.rows.tolist())}
    for variant in variants:
        v = data[variant]
        shared, io, iv = _join(o, v)
        switched = (v.bg_label[iv] >= 0) & (v.pred[iv] == v.bg_label[iv]) & (v.pred[iv] != o.pred[io])
        flipped = ~v.correct[iv] & (o.correct[io] | switched)
        for i in np.flatnonzero(flipped).tolist():
            key, a, b = int(shared[i]), io[i], iv[i]
            what = f"{variant} {v.p_true[b]:.2f}"
            if switched[i]:
                what += f", predicted {class_name(int(v.pred[b]))} (the background's class)"
            flips.setdefault(key, []).append(what)
            to_bg[key] = to_bg.get(key, False) or bool(switched[i])
            drop[key] = max(drop.get(key, -np.inf), float(o.p_true[a]) - float(v.p_true[b]))
    order = sorted(flips, key=lambda k: (not to_bg[k], -drop[k], store.keys[k]))
    rows = tuple(RowChoice(store.keys[k], f"p(true): original {o.p_true[o_at[k]]:.2f}; " + "; ".join(flips[k]))
                 for k in order[:size])
    mixed = [v for v in variants if VARIANT_SPECS[v].partner is not None]
    ranking = "first those that switched to the background's class, then " if mixed else ""
    return SectionChoice(
        "flips", "Largest background-driven flips",
        f"Wrong on {', '.join(variants)} where {reference} was right on original"
        + (f", or switched to the class of the image the background came from ({', '.join(mixed)})" if mixed else "")
        + f": {len(rows)} of {len(flips)} image(s), {ranking}by the largest drop in p(true).",
        rows, len(flips))


def choose_sections(store: PredictionStore, reference: str, size: int, seed: int
                    ) -> tuple[list[SectionChoice], list[str]]:
    """The gallery's sections and the one-line notices that explain a fallback."""
    data = store.models[reference]
    if "original" not in data:
        return [], [f"No gallery: {reference} has no original predictions, and every section compares with them."]
    flip_variants = [v for v in M.NOVEL_BACKGROUND_VARIANTS if v in data]
    flips = [_flip_section(store, data, flip_variants, reference, size)] if flip_variants else []
    lacking = [v for v in CATEGORY_VARIANTS if v not in data]
    if not lacking:
        return [*_category_sections(store, data, reference, size, seed), *flips], []
    why = (f"Noise or Signal categories need original, mixed_rand and only_bg_t; {reference} has no "
           f"{' or '.join(lacking)} predictions")
    if not flips:
        return [], [f"No gallery: {why}, nor a novel-background variant ({', '.join(M.NOVEL_BACKGROUND_VARIANTS)}) "
                    "to show flips on."]
    return flips, [f"{why}: showing the largest flips on {', '.join(flip_variants)} instead."]


# ---------------------------------------------------------------- rows of thumbnails


@dataclass(frozen=True)
class Thumbnail:
    """A variant image of one key, as a small JPEG, with the provenance its caption shows."""

    key: str
    variant: str
    jpeg: bytes
    width: int
    height: int
    bg_key: str | None = None
    bg_label: int = -1
    texture: str | None = None

    @property
    def src(self) -> str:
        return "data:image/jpeg;base64," + base64.b64encode(self.jpeg).decode("ascii")


def class_name(index: int) -> str:
    """The ImageNet-1k name of a class index (a file's damaged index reads as such, never an IndexError)."""
    names = imagenet_classes().names
    return names[index] if 0 <= index < len(names) else f"class {index}"


def _class_line(label: int) -> str:
    """A class as people read it: its ImageNet-1k name, and its IN-9 superclass when it has one."""
    if not 0 <= label < len(imagenet_classes().names):
        return "class unknown"
    in9 = to_in9(label)
    return f"{class_name(label)} (IN-9 {in9_names()[in9]})" if in9 >= 0 else class_name(label)


def _prediction_lines(store: PredictionStore, models: Sequence[str], variant: str, key: str,
                      lookups: dict[tuple[str, str], dict[str, tuple[int, float, int]]]) -> list[CaptionLine]:
    lines: list[CaptionLine] = []
    for model in models:
        if len(models) > 1:
            lines.append(CaptionLine(model, "muted"))
        hit = lookups[(model, variant)].get(key)
        if hit is None:
            lines.append(CaptionLine("not scored", "muted"))
            continue
        pred, p_true, label = hit
        right = pred == label
        lines.append(CaptionLine(f"{'✓' if right else '✗'} {class_name(pred)} · p(true) {p_true:.2f}",
                                 "right" if right else "wrong"))
    return lines


def gallery_sections(store: PredictionStore, choices: Sequence[SectionChoice], models: Sequence[str],
                     variants: Sequence[str], thumbs: dict[tuple[str, str], Thumbnail], placeholder_px: int
                     ) -> list[GallerySection]:
    """Rows of ``variants`` side by side per chosen key, each thumbnail captioned with every model's top-1."""
    keys = {r.key for c in choices for r in c.rows}
    lookups = {(m, v): store.lookup(m, v, keys) for m in models for v in variants}
    reference_labels = {k: hit[2] for v in variants for k, hit in lookups[(models[0], v)].items()}
    sections = []
    for choice in choices:
        rows = []
        for row in choice.rows:
            images: list[GalleryImage] = []
            for variant in variants:
                images.append(_variant_image(store, models, variant, row.key, thumbs, lookups, placeholder_px))
                thumb = thumbs.get((variant, row.key))
                source = thumbs.get(("original", thumb.bg_key)) if thumb and thumb.bg_key else None
                if source is not None and thumb is not None:
                    images.append(GalleryImage(
                        source.src, f"{thumb.bg_key} original (background of {row.key} {variant})",
                        f"{variant}'s background from", (CaptionLine(thumb.bg_key, "muted"),
                                                         CaptionLine(_class_line(thumb.bg_label))),
                        source.width, source.height, context=True))
            label = reference_labels.get(row.key, -1)
            head = (CaptionLine(row.key), CaptionLine(_class_line(label)), CaptionLine(row.reason, "muted"))
            rows.append(GalleryRow(row.key, tuple(images), head))
        sections.append(GallerySection(choice.ident, choice.title, choice.caption, tuple(rows),
                                       empty=f"No image is {choice.title} for {models[0]}."))
    return sections


def _variant_image(store: PredictionStore, models: Sequence[str], variant: str, key: str,
                   thumbs: dict[tuple[str, str], Thumbnail],
                   lookups: dict[tuple[str, str], dict[str, tuple[int, float, int]]], placeholder_px: int
                   ) -> GalleryImage:
    thumb = thumbs.get((variant, key))
    lines = _prediction_lines(store, models, variant, key, lookups)
    if thumb is None:
        scored = any(key in lookups[(m, variant)] for m in models)
        why = "image not found in the shards" if scored else f"not in {variant}"
        return GalleryImage("", f"{key} {variant}: {why}", variant, (CaptionLine(why, "muted"), *lines)
                            if scored else (CaptionLine(why, "muted"),), placeholder_px, placeholder_px)
    if thumb.bg_key:
        lines.append(CaptionLine(f"background from {thumb.bg_key} ({_class_line(thumb.bg_label)})", "muted"))
    if thumb.texture:
        lines.append(CaptionLine(f"texture: {thumb.texture}", "muted"))
    return GalleryImage(thumb.src, f"{key} {variant}", variant, tuple(lines), thumb.width, thumb.height)
