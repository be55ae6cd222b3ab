"""The registry: one row per classifier (:class:`ModelSpec`), read from ``data_manifests/models.json``.

Rows carry their pinned weights and their own preprocessing (timm's ``PretrainedCfg`` idea),
so a results row can say exactly what was run. Besides the file, rows can be added in
process with :func:`register_model` (plugins, tests), optionally with a constructor that
replaces the source's; they extend the built-in registry, never a ``--registry`` file, which
stands alone.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from data_manifests import data_file
from eval.zoo.errors import UnknownModel
from eval.zoo.sources import SOURCES, source_for

REGISTRY_FILE = data_file("models.json")
# 2 split format 1's overloaded weights_file into weights_file / weights_url / hf_hub_id.
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
DEFAULT_MODEL = "tf_efficientnet_lite0"
INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass(frozen=True)
class ModelSpec:
    """One registry row: what to construct, which weights, and how to preprocess for it."""

    id: str
    source: str  # a key of eval.zoo.sources.SOURCES
    arch: str
    weights: str  # the pinned tag: a Weights enum member, a timm tag, a package pin
    weights_file: str | None  # checkpoint file name (looked up in --weights-dir and caches) or archive path
    weights_url: str | None  # where the checkpoint downloads from, when a plain URL
    hf_hub_id: str | None  # Hugging Face hub repo holding the checkpoint
    input_size: int
    interpolation: str
    crop_pct: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    params: int
    train_images: int
    train_data: str
    top1: float | None  # ImageNet-1k top-1 reported for these exact weights
    paper32: bool  # member of our 32-model set (CLI group ``paper32``)

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["mean"] = list(self.mean)
        row["std"] = list(self.std)
        return row


ROW_FIELDS = tuple(f.name for f in fields(ModelSpec))
# Absent from format-1 files and meaningless for some sources, so a row may leave them out.
OPTIONAL_FIELDS = ("weights_url", "hf_hub_id")


class ModelFactory(Protocol):
    """Builds a registered row's model instead of its source (``pretrained=False``: random weights)."""

    def __call__(self, spec: ModelSpec, *, pretrained: bool, weights_dir: Path | None) -> Any: ...


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


# A model id names folders of results (predictions/<id>/, challenge/<id>/): letters, digits, '_', '-' and
# '.', starting with a letter or digit, never '..': a registry from elsewhere cannot point outside --out.
MODEL_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def model_id_problem(model_id: object) -> str | None:
    """Why ``model_id`` cannot be a model id (None when it can)."""
    if not isinstance(model_id, str) or not MODEL_ID_PATTERN.fullmatch(model_id) or ".." in model_id:
        return (f"model id {str(model_id)[:60]!r} must be 1-128 letters, digits, '_', '-' or '.', start with a "
                "letter or digit and hold no '..' (it names a results folder)")
    return None


def spec_from_row(row: Mapping[str, Any]) -> ModelSpec:
    """Validate one JSON row; a bad registry should fail loudly at load time, not mid-run."""
    rid = row.get("id", "?")
    problem = model_id_problem(rid)
    if problem:
        raise ValueError(f"registry row: {problem}")
    missing = [k for k in ROW_FIELDS if k not in row and k not in OPTIONAL_FIELDS]
    extra = [k for k in row if k not in ROW_FIELDS]
    if missing or extra:
        raise ValueError(f"registry row {rid!r}: missing fields {missing}, unexpected fields {extra}")
    if row["source"] not in SOURCES:
        raise ValueError(f"registry row {rid!r}: source must be one of {tuple(SOURCES)}, got {row['source']!r}")
    if row["interpolation"] not in INTERPOLATIONS:
        raise ValueError(f"registry row {rid!r}: interpolation must be one of {INTERPOLATIONS}")
    if len(row["mean"]) != 3 or len(row["std"]) != 3:
        raise ValueError(f"registry row {rid!r}: mean and std need 3 values")
    if not (isinstance(row["input_size"], int) and row["input_size"] > 0):
        raise ValueError(f"registry row {rid!r}: input_size must be a positive int")
    if not 0.0 < float(row["crop_pct"]) <= 1.0:
        raise ValueError(f"registry row {rid!r}: crop_pct must be in (0, 1]")
    return ModelSpec(
        id=str(row["id"]),
        source=str(row["source"]),
        arch=str(row["arch"]),
        weights=str(row["weights"]),
        weights_file=_optional_str(row["weights_file"]),
        weights_url=_optional_str(row.get("weights_url")),
        hf_hub_id=_optional_str(row.get("hf_hub_id")),
        input_size=int(row["input_size"]),
        interpolation=str(row["interpolation"]),
        crop_pct=float(row["crop_pct"]),
        mean=tuple(float(v) for v in row["mean"]),  # type: ignore[arg-type]
        std=tuple(float(v) for v in row["std"]),  # type: ignore[arg-type]
        params=int(row["params"]),
        train_images=int(row["train_images"]),
        train_data=str(row["train_data"]),
        top1=None if row["top1"] is None else float(row["top1"]),
        paper32=bool(row["paper32"]),
    )


def read_registry_file(path: str | Path) -> tuple[dict[str, Any], list[ModelSpec]]:
    """The document and its rows as written (paths not yet anchored): what ``generate`` rewrites."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    if doc.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{path}: unsupported registry format {doc.get('format')!r}")
    specs = [spec_from_row(row) for row in doc["models"]]
    ids = [s.id for s in specs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"{path}: duplicate model ids {duplicates}")
    return doc, specs


@lru_cache(maxsize=8)
def _load_registry_cached(path: str) -> tuple[ModelSpec, ...]:
    _, specs = read_registry_file(path)
    folder = Path(path).parent
    return tuple(source_for(s).validate(s, folder) for s in specs)


# In-process rows (register_model): id -> (row, constructor or None).
_REGISTERED: dict[str, tuple[ModelSpec, ModelFactory | None]] = {}


def load_registry(path: str | Path | None = None) -> dict[str, ModelSpec]:
    """All rows by id, in file order; without ``path``, the built-in file plus the registered rows."""
    resolved = Path(path) if path is not None else REGISTRY_FILE
    rows = {s.id: s for s in _load_registry_cached(str(resolved.resolve()))}
    if path is None:
        rows.update((model_id, spec) for model_id, (spec, _) in _REGISTERED.items())
    return rows


def clear_cache() -> None:
    """Forget parsed registry files (after rewriting one in place)."""
    _load_registry_cached.cache_clear()


def register_model(
    spec: ModelSpec | Mapping[str, Any], factory: ModelFactory | None = None, *, replace: bool = False
) -> ModelSpec:
    """Add a row to the built-in registry for this process; ``factory`` builds it instead of its source.

    An id that exists already is an error unless ``replace``, so two plugins cannot silently
    swap each other's models.
    """
    row = spec if isinstance(spec, ModelSpec) else spec_from_row(spec)
    problem = model_id_problem(row.id)
    if problem:
        raise ValueError(problem)
    row = source_for(row).validate(row, None)
    if not replace and row.id in load_registry():
        raise ValueError(f"model id {row.id!r} is already in the registry (pass replace=True to override it)")
    _REGISTERED[row.id] = (row, factory)
    return row


def unregister_model(model_id: str) -> None:
    """Remove a row added with :func:`register_model`; rows of the file cannot be removed."""
    if model_id not in _REGISTERED:
        raise KeyError(f"model id {model_id!r} was not registered in this process")
    del _REGISTERED[model_id]


@contextmanager
def registered(
    *specs: ModelSpec | Mapping[str, Any], factory: ModelFactory | None = None, replace: bool = False
) -> Iterator[list[ModelSpec]]:
    """Rows registered for the ``with`` block only, then the registry as it was (tests)."""
    before = dict(_REGISTERED)
    try:
        yield [register_model(s, factory, replace=replace) for s in specs]
    finally:
        _REGISTERED.clear()
        _REGISTERED.update(before)


def factory_for(spec: ModelSpec) -> ModelFactory | None:
    """The registered constructor for exactly this row (an equal id from another file does not count)."""
    entry = _REGISTERED.get(spec.id)
    return entry[1] if entry is not None and entry[0] == spec else None


# ----------------------------------------------------------------------------- choosing rows


def _unknown(model_id: str, known: Iterable[str]) -> UnknownModel:
    close = difflib.get_close_matches(model_id, list(known), n=5, cutoff=0.5)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    return UnknownModel(f"unknown model id {model_id!r}{hint} (see `python -m eval.zoo list`)")


def _ids_from_file(path: Path) -> list[str]:
    """A JSON list of ids (or rows with 'id', or {'models': [...]}) or a text file, one id per line."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        doc = json.loads(text)
        items = doc["models"] if isinstance(doc, dict) else doc
        return [item["id"] if isinstance(item, dict) else str(item) for item in items]
    ids: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        ids.extend(tok.strip() for tok in line.replace(",", " ").split() if tok.strip())
    return ids


def _tokens(item: str) -> list[str]:
    candidate = Path(item.strip())
    if item.strip() and candidate.is_file():
        return _ids_from_file(candidate)
    return [t.strip() for t in item.split(",") if t.strip()]


# "paper32" is our 32-model set, chosen to span the range the Background Check paper describes
# (its list was never published); the rows say which they are.
MODEL_SETS: dict[str, Callable[[Mapping[str, ModelSpec]], list[ModelSpec]]] = {
    "paper32": lambda reg: [s for s in reg.values() if s.paper32],
    "all": lambda reg: list(reg.values()),
}


def resolve_models(
    spec: str | Sequence[str] | None, registry: Mapping[str, ModelSpec] | None = None
) -> list[ModelSpec]:
    """Turn ``--models``/``--ids`` values into registry rows, in order, each once.

    None or empty -> the default model; each value is a comma list of ids and groups
    (``paper32``: our 32-model set, ``all``: every row) or a path to a text/JSON file of ids.
    """
    reg = load_registry() if registry is None else registry
    items = [spec] if isinstance(spec, str) else list(spec or [])
    if not any(item.strip() for item in items):
        return [reg[DEFAULT_MODEL]]
    chosen: list[ModelSpec] = []
    for token in (t for item in items for t in _tokens(item)):
        if token in MODEL_SETS:
            group = MODEL_SETS[token](reg)
        elif token in reg:
            group = [reg[token]]
        else:
            raise _unknown(token, [*reg, *MODEL_SETS])
        chosen.extend(s for s in group if s not in chosen)
    if not chosen:
        raise UnknownModel(f"no model ids in {spec!r}")
    return chosen


def as_spec(spec: ModelSpec | str) -> ModelSpec:
    """A row, or the built-in registry's row of that id."""
    if isinstance(spec, ModelSpec):
        return spec
    reg = load_registry()
    if spec not in reg:
        raise _unknown(spec, reg)
    return reg[spec]


def preprocess_config(spec: ModelSpec | str) -> dict[str, Any]:
    """What the evaluator applies on device for this model (timm ``resolve_data_config`` style)."""
    s = as_spec(spec)
    return {
        "input_size": s.input_size,
        "interpolation": s.interpolation,
        "mean": s.mean,
        "std": s.std,
        "crop_pct": s.crop_pct,
    }
