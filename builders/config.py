"""Build configuration: CLI options, recipes, and the hash that identifies a build's output."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import builders.version
from data_manifests import data_file
from pipeline.frame import FRAME_INTERPOLATIONS
from pipeline.masks import MASK_SOURCES
from pipeline.shard_format.spec import FORMAT_VERSION, IMAGE_CODECS
from pipeline.sources import READERS
from pipeline.variants import FILLS, VARIANTS

SOURCES = tuple(READERS)  # the source kinds, in --help order: pipeline.sources.READERS is the table
RECIPES_DIR = data_file("recipes")

# Fields that never change a shard's bytes: where it goes and how it is scheduled.
_RUNTIME_FIELDS = {"variants", "out", "workers", "backend", "scheduler", "recipe", "partner_cache_limit"}
DEFAULT_PARTNER_CACHE_GB = 16.0


class ConfigError(ValueError):
    """Bad options or recipe; reported as a one-line error with exit code 2."""


@dataclass(frozen=True)
class BuildConfig:
    variants: tuple[str, ...] = ("mixed_rand",)
    source: str = "demo"
    images: str | None = None
    annotations: str | None = None
    category_map: str | None = None
    out: str = "shards"
    size: int = 224
    resize: int = 256
    interpolation: str = "bilinear"
    mask: str = "box"
    fill: str = "black"
    textures: str | None = None
    classes: str = "all"
    per_class: int | None = None
    partner_level: str = "class"  # mixed_same/mixed_next relation: "class" (1000-way) or "in9"
    exactly_one_box: bool = False
    max_box_fraction: float | None = 0.9
    max_box_cropped: float | None = 0.5
    seed: int = 0
    shard_size: int = 1000
    format: str = "jpg"
    quality: int = 95
    with_masks: bool = False
    workers: int = 1
    backend: str = "loky"
    scheduler: str | None = None
    recipe: str | None = None
    partner_cache_limit: float = DEFAULT_PARTNER_CACHE_GB  # GB (10^9 bytes) under <out>/.partner-cache; 0 = off

    def validate(self) -> BuildConfig:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ConfigError(f"unknown variant {','.join(unknown) or '(none)'}; choose from {', '.join(VARIANTS)} or all")
        if self.source not in READERS:
            raise ConfigError(f"unknown --source {self.source!r}; choose from {', '.join(SOURCES)}")
        if READERS[self.source].needs_images and not self.images:
            raise ConfigError(f"--source {self.source} needs --images DIR")
        if READERS[self.source].needs_annotations and not self.annotations:
            raise ConfigError(f"--source {self.source} needs --annotations PATH")
        if self.fill not in FILLS:
            raise ConfigError(f"unknown --fill {self.fill!r}; choose from {', '.join(FILLS)}")
        if self.mask not in MASK_SOURCES:
            raise ConfigError(f"unknown --mask {self.mask!r}; choose {', '.join(MASK_SOURCES)}")
        if self.format not in IMAGE_CODECS:
            raise ConfigError(f"unknown --format {self.format!r}; choose {', '.join(IMAGE_CODECS)}")
        if self.interpolation not in FRAME_INTERPOLATIONS:
            raise ConfigError(f"unknown --interpolation {self.interpolation!r}; choose {', '.join(FRAME_INTERPOLATIONS)}")
        if not (1 <= self.quality <= 100):
            raise ConfigError("--quality must be between 1 and 100")
        if self.size < 8 or self.resize < self.size:
            raise ConfigError(f"need 8 <= --size <= --resize (got size {self.size}, resize {self.resize})")
        if self.shard_size < 1:
            raise ConfigError("--shard-size must be at least 1")
        if self.per_class is not None and self.per_class < 1:
            raise ConfigError("--per-class must be at least 1")
        if self.partner_level not in ("class", "in9"):
            raise ConfigError("--partner-level must be class or in9")
        if self.backend not in ("loky", "dask"):
            raise ConfigError("--backend must be loky or dask")
        if self.backend == "dask" and not self.scheduler:
            raise ConfigError("--backend dask needs --scheduler tcp://HOST:PORT")
        if self.scheduler and self.backend != "dask":
            raise ConfigError("--scheduler is for --backend dask (it would be ignored)")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ConfigError(f"--out {self.out} is a file, not a folder")
        if self.workers < 1:
            raise ConfigError("--workers must be at least 1")
        if not self.partner_cache_limit >= 0:  # also refuses NaN
            raise ConfigError("--partner-cache-limit must be a number of GB >= 0 (0 = off)")
        for name in ("images", "annotations", "textures", "category_map"):
            value = getattr(self, name)
            if value and "://" not in value and not Path(value).exists():
                raise ConfigError(f"--{name.replace('_', '-')} {value}: no such file or folder")
        if self.classes not in ("all", "in9") and not Path(self.classes).is_file():
            raise ConfigError(f"--classes {self.classes}: expected all, in9 or a file of wnids/indices")
        return self

    def output_config(self) -> dict:
        """Everything that determines the bytes of a variant's shards (paths made portable)."""
        row = {k: v for k, v in asdict(self).items() if k not in _RUNTIME_FIELDS}
        for name in ("images", "annotations", "textures", "category_map", "classes"):
            if row.get(name) and row[name] not in ("all", "in9"):
                row[name] = Path(row[name]).name  # the folder's name, not where it lives on this machine
        row["format_version"] = FORMAT_VERSION
        row["builder_version"] = builders.version.BUILDER_VERSION  # new code that changes pixels rebuilds: never stale shards
        return row

    def variant_hash(self, variant: str) -> str:
        payload = json.dumps({"variant": variant, **self.output_config()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_recipe(path: str | Path) -> dict:
    """A recipe is a JSON object of BuildConfig fields; a bare name looks in data_manifests/recipes/."""
    p = Path(path)
    if not p.exists() and (RECIPES_DIR / f"{path}.json").exists():
        p = RECIPES_DIR / f"{path}.json"
    if not p.exists():
        raise ConfigError(f"--recipe {path}: no such file (built-in: {', '.join(list_recipes())})")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--recipe {p}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    known = {f.name for f in fields(BuildConfig)}
    body = {k: v for k, v in raw.items() if not k.startswith("_") and k not in ("name", "description")}
    bad = sorted(set(body) - known)
    if bad:
        raise ConfigError(f"--recipe {p}: unknown field(s) {', '.join(bad)}")
    if "variants" in body:
        body["variants"] = tuple(VARIANTS if body["variants"] == "all" else body["variants"])
    return body


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.json"))

