"""Validate a row against the library that owns its weights: it constructs, counts right, preprocesses as stated."""

from __future__ import annotations

import math
from typing import Any

from eval.zoo.build import construct_on_meta, count_params
from eval.zoo.registry import ModelSpec
from eval.zoo.sources import source_for


def same_value(got: Any, expected: Any) -> bool:
    """Equal, with floats (and sequences of them) compared to rounding error: JSON round-trips floats."""
    if isinstance(got, (list, tuple)) and isinstance(expected, (list, tuple)):
        return len(got) == len(expected) and all(same_value(a, b) for a, b in zip(got, expected, strict=True))
    if isinstance(got, float) or isinstance(expected, float):
        return got is not None and expected is not None and math.isclose(got, expected, rel_tol=1e-9)
    return got == expected


def check_spec(spec: ModelSpec) -> list[str]:
    """Problems with one row (empty = fine): constructor, parameter count, fields the library states."""
    problems: list[str] = []
    try:
        params = count_params(construct_on_meta(spec))
    except Exception as exc:  # noqa: BLE001 - report any constructor failure as a row problem
        return [f"constructor failed: {type(exc).__name__}: {exc}".splitlines()[0]]
    if params != spec.params:
        problems.append(f"params {params} != registry {spec.params}")
    for key, value in source_for(spec).reference_fields(spec).items():
        got = getattr(spec, key)
        if not same_value(got, value):
            problems.append(f"{key} {got!r} != library {value!r}")
    return problems
