"""``python -m eval.zoo list|check|generate``: inspect, validate and refresh the model registry."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eval.zoo.build import find_local_weights
from eval.zoo.check import check_spec
from eval.zoo.errors import UnknownModel
from eval.zoo.generate import generate_registry, write_registry
from eval.zoo.registry import REGISTRY_FILE, ModelSpec, load_registry, resolve_models
from pipeline.cli import OneLineParser

IDS_HELP = (
    "ids, comma lists, 'paper32' (our 32-model set), 'all' or files of ids; several after one flag "
    "or the flag repeated (default: all)"
)


def _list_rows(specs: Sequence[ModelSpec], weights_dir: str | None) -> list[dict[str, Any]]:
    return [{**s.to_row(), "local_weights": find_local_weights(s, weights_dir) is not None} for s in specs]


def _print_table(rows: Sequence[dict[str, Any]]) -> None:
    header = ("id", "source", "weights", "input", "interp", "params(M)", "train_images", "top1", "paper32", "local")
    table = [
        (
            r["id"],
            r["source"],
            r["weights"],
            str(r["input_size"]),
            r["interpolation"],
            f"{r['params'] / 1e6:.2f}",
            f"{r['train_images']:,}",
            "-" if r["top1"] is None else f"{r['top1']:.2f}",
            "yes" if r["paper32"] else "no",
            "yes" if r["local_weights"] else "no",
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
    for row in (header, *table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _check(specs: Sequence[ModelSpec]) -> int:
    from tqdm import tqdm

    failures = 0
    # A bar is for a person watching; in a pipe or a log it is only carriage-return noise.
    bar = tqdm(specs, desc="check", unit="model", file=sys.stderr, disable=not sys.stderr.isatty())
    for spec in bar:
        problems = check_spec(spec)
        failures += bool(problems)
        tqdm.write(f"{'FAIL' if problems else 'ok  '} {spec.id}" + (": " + "; ".join(problems) if problems else ""))
    print(f"{len(specs) - failures}/{len(specs)} rows ok")
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m eval.zoo", description="Inspect and validate the model zoo.")
    parser.add_argument("--registry", default=None, help="registry JSON (default: data_manifests/models.json)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="print the registry with local weight availability")
    p_list.add_argument("--ids", nargs="+", action="extend", default=None, metavar="ID", help=IDS_HELP)
    p_list.add_argument("--weights-dir", default=None, help="directory searched before the caches")
    p_list.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p_check = sub.add_parser("check", help="construct every row on the meta device and compare with library configs")
    p_check.add_argument("--ids", nargs="+", action="extend", default=None, metavar="ID", help=IDS_HELP)
    p_gen = sub.add_parser(
        "generate", help="refresh the registry's library-derived fields from torchvision/timm metadata"
    )
    p_gen.add_argument("--out", default=None, help="output path (default: the registry path)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            source = Path(args.registry or REGISTRY_FILE)
            out = Path(args.out or source)
            doc = generate_registry(source)
            write_registry(doc, out)
            print(f"wrote {len(doc['models'])} models to {out}")
            return 0
        registry = load_registry(args.registry)
        specs = resolve_models(args.ids or ["all"], registry)
    except (UnknownModel, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if args.command == "list":
        rows = _list_rows(specs, args.weights_dir)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            _print_table(rows)
        return 0
    return _check(specs)
