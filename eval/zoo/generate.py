"""Refresh a registry file from library metadata, so every number in it traces back to a library.

The file is the list of models: ``generate`` keeps each row's identity and curated fields
(``id, source, arch, weights, train_images, train_data, paper32``, and ``top1`` where the
library ships none, e.g. timm's, which comes from its results-imagenet.csv) and rewrites what
the owning library states (weight location, preprocessing, torchvision's top-1) plus the
parameter count of the meta-device model. Adding a model is therefore one row in the file:
copy a row of the same source, change its identity, run ``generate``, then ``check``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from eval.zoo.build import construct_on_meta, count_params
from eval.zoo.registry import FORMAT_VERSION, REGISTRY_FILE, ROW_FIELDS, clear_cache, read_registry_file
from eval.zoo.sources import source_for


def generate_registry(path: str | Path = REGISTRY_FILE) -> dict[str, Any]:
    """The registry document at ``path`` with its library-derived fields recomputed (offline)."""
    doc, specs = read_registry_file(path)
    folder = Path(path).resolve().parent
    rows = []
    for spec in specs:
        source = source_for(spec)
        usable = source.validate(spec, folder)  # e.g. a TorchScript archive found next to the file
        row = {**spec.to_row(), **source.reference_fields(usable)}
        row["params"] = count_params(construct_on_meta(usable))
        rows.append({key: list(row[key]) if key in ("mean", "std") else row[key] for key in ROW_FIELDS})
    return {"format": FORMAT_VERSION, "note": doc.get("note", ""), "models": rows}


def write_registry(doc: Mapping[str, Any], path: str | Path = REGISTRY_FILE) -> None:
    """One row per line, so a diff of the file shows which models changed."""
    lines = ",\n".join("    " + json.dumps(row) for row in doc["models"])
    head = json.dumps({"format": doc["format"], "note": doc["note"]}, indent=2)[:-2]
    Path(path).write_text(f'{head},\n  "models": [\n{lines}\n  ]\n}}\n', encoding="utf-8")
    clear_cache()
