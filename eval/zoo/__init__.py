"""Model zoo: one registry row per classifier, carrying its pinned weights and its own preprocessing.

The rows live in ``data_manifests/models.json`` (:mod:`eval.zoo.registry`); each row's
``source`` names the :class:`ModelSource` that constructs it, finds and loads its weights and
states its reference preprocessing (:mod:`eval.zoo.sources`); :mod:`eval.zoo.build` turns
rows into models, :mod:`eval.zoo.check` and :mod:`eval.zoo.generate` keep the file true to
the libraries, :mod:`eval.zoo.cli` is ``python -m eval.zoo``. Extend it by declaring, not
patching: :func:`register_model` adds a row (optionally with its own constructor),
:func:`register_source` a kind of source.
"""

from __future__ import annotations

from eval.zoo.build import (
    build_model,
    construct_on_meta,
    count_params,
    downloads_disabled,
    find_local_weights,
)
from eval.zoo.check import check_spec
from eval.zoo.cli import build_parser, main
from eval.zoo.convert import lite_to_timm_state_dict
from eval.zoo.errors import UnknownModel, WeightsUnavailable
from eval.zoo.generate import generate_registry, write_registry
from eval.zoo.registry import (
    DEFAULT_MODEL,
    FORMAT_VERSION,
    INTERPOLATIONS,
    MODEL_SETS,
    REGISTRY_FILE,
    ROW_FIELDS,
    ModelFactory,
    ModelSpec,
    load_registry,
    preprocess_config,
    register_model,
    registered,
    resolve_models,
    spec_from_row,
    unregister_model,
)
from eval.zoo.sources import SOURCES, ModelSource, register_source, unregister_source
from eval.zoo.sources.package import LITE0_PACKAGE, LITE0_PACKAGE_PIN

__all__ = [
    "DEFAULT_MODEL",
    "FORMAT_VERSION",
    "MODEL_SETS",
    "INTERPOLATIONS",
    "LITE0_PACKAGE",
    "LITE0_PACKAGE_PIN",
    "REGISTRY_FILE",
    "ROW_FIELDS",
    "SOURCES",
    "ModelFactory",
    "ModelSource",
    "ModelSpec",
    "UnknownModel",
    "WeightsUnavailable",
    "build_model",
    "check_spec",
    "construct_on_meta",
    "count_params",
    "downloads_disabled",
    "find_local_weights",
    "generate_registry",
    "lite_to_timm_state_dict",
    "load_registry",
    "build_parser",
    "main",
    "preprocess_config",
    "register_model",
    "register_source",
    "registered",
    "resolve_models",
    "spec_from_row",
    "unregister_model",
    "unregister_source",
    "write_registry",
]
