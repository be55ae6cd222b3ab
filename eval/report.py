"""Turn per-sample predictions into background-reliance tables and figures.

``python -m eval.report RESULTS_DIR [--out DIR]`` reads
``RESULTS_DIR/predictions/<model>/<variant>.csv`` (see eval.predictions),
joins variants by sample key, computes every metric in eval.metrics per model
and label space, and writes ``metrics.csv`` (long format), ``trends.csv``,
``metrics.json``, ``report.md`` and ``fig_*.png``. Metrics are recomputed
from predictions only, so a report never disagrees with the per-sample files.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eval import metrics as M
from eval.predictions import Predictions, atomic_write_text, list_predictions, read_predictions
from pipeline.shard_format import VARIANTS

LABEL_SPACES = ("in1k", "in9")
NUM_CLASSES = {"in1k": 1000, "in9": 9}
TREND_AXES = ("clean_acc", "log10_params", "log10_train_images")
CSV_COLUMNS = ("model", "label_space", "metric", "variant", "value", "lo", "hi", "n")
TREND_COLUMNS = ("label_space", "metric", "variant", "x", "slope", "intercept", "pearson_r", "n")
MAX_EXAMPLE_KEYS = 5


class ReportError(ValueError):
    """Input the report cannot work from (no results folder, no predictions)."""


@dataclass
class Notes:
    """Human-readable caveats collected while computing; shown in report.md and metrics.json."""

    items: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        if text not in self.items:
            self.items.append(text)


# ---------------------------------------------------------------- inputs


def models_json_path() -> Path:
    from data_manifests import data_file

    return data_file("models.json")


def load_model_metadata(path: Path, notes: Notes) -> dict[str, dict]:
    """``{model_id: row}`` from the model zoo file; a missing or unreadable file gives {} and a note."""
    if not path.is_file():
        notes.add(f"model metadata file {path.name} not found: trends against parameters and training images left out")
        return {}
    try:
        rows = json.loads(path.read_text(encoding="utf-8")).get("models", [])
        return {str(r["id"]): r for r in rows if isinstance(r, dict) and "id" in r}
    except (ValueError, AttributeError, TypeError) as exc:
        notes.add(f"model metadata file {path.name} unreadable ({exc}): trends against parameters and training images left out")
        return {}


def load_scores(results_dir: Path) -> dict[str, dict[str, str]]:
    """Optional run metadata from the evaluator's scores.csv: {model: first row seen}."""
    path = results_dir / "scores.csv"
    if not path.is_file():
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            out: dict[str, dict[str, str]] = {}
            for row in csv.DictReader(fh):
                if row.get("model"):
                    out.setdefault(row["model"], row)
            return out
    except (OSError, csv.Error, UnicodeDecodeError):
        return {}


def _positive_log10(value: object) -> float:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
    return math.log10(v) if v > 0 and math.isfinite(v) else math.nan


def _examples(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:MAX_EXAMPLE_KEYS])
    return shown + (", ..." if len(keys) > MAX_EXAMPLE_KEYS else "")


def check_keys(model: str, preds: dict[str, Predictions], notes: Notes) -> None:
    """Note keys that some variants of a model have and others lack (count + examples)."""
    key_sets = {v: set(p.keys.tolist()) for v, p in preds.items()}
    if len(key_sets) < 2:
        return
    union = set().union(*key_sets.values())
    for variant, keys in key_sets.items():
        missing = union - keys
        if missing:
            notes.add(
                f"{model}: {variant} lacks {len(missing)} key(s) present in other variants "
                f"(e.g. {_examples(missing)}); paired metrics use shared keys only"
            )


def outcomes(preds: Predictions, label_space: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(keys, correct) for one label space; None when that label space was not scored."""
    if label_space == "in1k":
        return preds.keys.astype(str), preds.correct
    eligible = preds.in9_label >= 0
    if not eligible.any() or (preds.in9_pred[eligible] < 0).all():
        return None
    return preds.keys[eligible].astype(str), preds.in9_correct[eligible]


# ---------------------------------------------------------------- computation


def _est(e: M.Estimate) -> dict:
    return {"value": e.value, "lo": e.lo, "hi": e.hi, "n": e.n}


def model_metrics(
    data: dict[str, tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    n_boot: int,
    seed: int,
    where: str,
    notes: Notes,
) -> dict:
    """Every metric for one model in one label space; ``data`` maps variant -> (keys, correct)."""
    out: dict = {"accuracy": {}, "invariance": {}, "influence": {}}
    for variant in VARIANTS:
        if variant in data:
            out["accuracy"][variant] = _est(M.accuracy(data[variant][1]))

    if "original" in data:
        for variant in M.NOVEL_BACKGROUND_VARIANTS:
            if variant not in data:
                notes.add(f"{where}: {variant} missing, its background invariance is left out")
                continue
            keys, (clean, alt) = M.join_by_key(data["original"], data[variant])
            if keys.size == 0:
                notes.add(f"{where}: original and {variant} share no keys, invariance left out")
                continue
            inv = M.background_invariance(clean, alt)
            out["invariance"][variant] = {
                "clean": _est(inv.clean), "acc": _est(inv.acc), "drop": inv.drop, "ratio": inv.ratio, "n": inv.n,
            }
    else:
        notes.add(f"{where}: original missing, clean accuracy and background invariance are left out")

    for variant in M.BACKGROUND_ONLY_VARIANTS:
        if variant not in data:
            notes.add(f"{where}: {variant} missing, its background influence is left out")
            continue
        infl = M.background_influence(data[variant][1], num_classes)
        out["influence"][variant] = {"acc": _est(infl.acc), "chance": infl.chance, "above_chance": infl.above_chance}

    if "mixed_same" in data and "mixed_rand" in data:
        keys, (same, rand) = M.join_by_key(data["mixed_same"], data["mixed_rand"])
        gap = M.bg_gap(same, rand, n_boot=n_boot, seed=seed)
        out["bg_gap"] = {
            **_est(gap),
            "acc_mixed_same": float(same.mean()) if keys.size else math.nan,
            "acc_mixed_rand": float(rand.mean()) if keys.size else math.nan,
        }
    else:
        lacking = [v for v in ("mixed_same", "mixed_rand") if v not in data]
        notes.add(f"{where}: {' and '.join(lacking)} missing, BG-Gap is left out")

    needed = ("original", "mixed_rand", "only_bg_t")
    if all(v in data for v in needed):
        keys, (o, m, b) = M.join_by_key(*(data[v] for v in needed))
        cats = M.prediction_categories(o, m, b)
        out["categories"] = {
            "n": cats.n,
            "counts": {**cats.counts, "other": cats.other},
            "fractions": {
                **cats.fractions,
                "other": cats.other / cats.n if cats.n else math.nan,
            },
        }
    else:
        lacking = [v for v in needed if v not in data]
        notes.add(f"{where}: {' and '.join(lacking)} missing, prediction categories are left out")
    return out


def long_rows(model: str, label_space: str, mm: dict) -> list[dict]:
    """metrics.csv rows (model, label_space, metric, variant, value, lo, hi, n) for one model."""
    rows: list[dict] = []

    def row(metric: str, variant: str, value: float, lo: float = math.nan, hi: float = math.nan, n: int = 0) -> None:
        rows.append(dict(model=model, label_space=label_space, metric=metric, variant=variant,
                         value=value, lo=lo, hi=hi, n=n))

    for variant, e in mm["accuracy"].items():
        row("acc", variant, e["value"], e["lo"], e["hi"], e["n"])
    for variant, inv in mm["invariance"].items():
        c, a = inv["clean"], inv["acc"]
        row("inv_clean_acc", variant, c["value"], c["lo"], c["hi"], c["n"])
        row("inv_acc", variant, a["value"], a["lo"], a["hi"], a["n"])
        row("inv_drop", variant, inv["drop"], n=inv["n"])
        row("inv_ratio", variant, inv["ratio"], n=inv["n"])
    for variant, infl in mm["influence"].items():
        a = infl["acc"]
        row("infl_acc", variant, a["value"], a["lo"], a["hi"], a["n"])
        row("infl_chance", variant, infl["chance"], n=a["n"])
        row("infl_above_chance", variant, infl["above_chance"], n=a["n"])
    if "bg_gap" in mm:
        g = mm["bg_gap"]
        row("bg_gap", "mixed_same-mixed_rand", g["value"], g["lo"], g["hi"], g["n"])
    if "categories" in mm:
        cats = mm["categories"]
        for name, count in cats["counts"].items():
            lo, hi = M.wilson_interval(count, cats["n"])
            row("category", name, cats["fractions"][name], lo, hi, cats["n"])
    return rows


def scalar_metrics(mm: dict) -> dict[tuple[str, str], float]:
    """(metric, variant) -> value for everything worth trending across models."""
    out: dict[tuple[str, str], float] = {}
    for variant, e in mm["accuracy"].items():
        if variant != "original":
            out[("acc", variant)] = e["value"]
    for variant, inv in mm["invariance"].items():
        out[("inv_drop", variant)] = inv["drop"]
        out[("inv_ratio", variant)] = inv["ratio"]
    for variant, infl in mm["influence"].items():
        out[("infl_above_chance", variant)] = infl["above_chance"]
    if "bg_gap" in mm:
        out[("bg_gap", "mixed_same-mixed_rand")] = mm["bg_gap"]["value"]
    if "categories" in mm:
        for name, frac in mm["categories"]["fractions"].items():
            if name != "other":
                out[("category", name)] = frac
    return out


def trends(per_model: dict[str, dict], axes: dict[str, dict[str, float]], notes: Notes, label_space: str) -> list[dict]:
    """Linear trend of each metric across models against each x axis with >= 2 known points."""
    scalars = {model: scalar_metrics(mm) for model, mm in per_model.items()}
    names = sorted({name for s in scalars.values() for name in s})
    models = sorted(per_model)
    rows: list[dict] = []
    for axis in TREND_AXES:
        xs = np.array([axes[axis].get(m, math.nan) for m in models], dtype=np.float64)
        known = int(np.isfinite(xs).sum())
        if known < 2:
            if axis != "clean_acc" or len(models) >= 2:
                notes.add(f"{label_space}: fewer than two models with {axis}, trends against it left out")
            continue
        for metric, variant in names:
            ys = [scalars[m].get((metric, variant), math.nan) for m in models]
            slope, intercept, r, n = M.linear_trend(xs, ys)
            if n >= 2:
                rows.append(dict(label_space=label_space, metric=metric, variant=variant, x=axis,
                                 slope=slope, intercept=intercept, pearson_r=r, n=n))
    return rows


# ---------------------------------------------------------------- outputs


def _json_safe(obj: object) -> object:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj


def _csv_text(columns: tuple[str, ...], rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()})
    return buf.getvalue()


def _pct(v: float | None, digits: int = 1) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{100 * v:.{digits}f}"


def _ci(e: dict) -> str:
    return f"{_pct(e['value'])} [{_pct(e['lo'])}, {_pct(e['hi'])}]"


def _num(v: float | None, digits: int = 3) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:.{digits}g}" if abs(v) >= 1e4 else f"{v:.{digits}f}"


def _cell(v: object) -> str:
    if v is None or v == "":
        return "–"
    if isinstance(v, int | float) and not isinstance(v, bool):
        return f"{v:.4g}" if isinstance(v, float) or abs(v) >= 1e4 else str(v)
    return str(v)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return ["_No data._", ""]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return [*lines, ""]


def model_order(per_model: dict[str, dict]) -> list[str]:
    """Models by clean accuracy (unknown last), then name: trends read left to right."""
    def clean(m: str) -> float:
        v = per_model[m]["accuracy"].get("original", {}).get("value")
        return v if v is not None and math.isfinite(v) else math.inf

    return sorted(per_model, key=lambda m: (clean(m), m))


def markdown(summary: dict, figures: list[str]) -> str:
    lines = ["# Background reliance report", ""]
    lines += [
        f"Results: `{summary['results_dir']}`. Models: {len(summary['models_seen'])}. "
        f"Intervals: Wilson 95% for accuracies; paired bootstrap ({summary['bootstrap']} resamples, "
        f"seed {summary['seed']}) for BG-Gap. Values in %.",
        "",
    ]
    meta = summary["metadata"]
    lines += ["## Models", ""]
    lines += _table(
        ["model", "params", "train images", "train data", "reference top-1", "weights", "precision"],
        [[m, *(_cell(meta.get(m, {}).get(f)) for f in ("params", "train_images", "train_data", "top1", "weights", "precision"))]
         for m in summary["models_seen"]],
    )
    for ls, per_model in summary["label_spaces"].items():
        order = model_order(per_model)
        variants = [v for v in VARIANTS if any(v in per_model[m]["accuracy"] for m in order)]
        lines += [f"## Label space: {ls} (chance {_pct(1 / NUM_CLASSES[ls], 2)}%)", ""]
        lines += ["### Clean accuracy (original)", ""]
        lines += _table(
            ["model", "n", "top-1 [95% CI]"],
            [[m, str(per_model[m]["accuracy"]["original"]["n"]), _ci(per_model[m]["accuracy"]["original"])]
             for m in order if "original" in per_model[m]["accuracy"]],
        )
        lines += ["### Accuracy on every variant", ""]
        lines += _table(
            ["model", *variants],
            [[m, *(_pct(per_model[m]["accuracy"].get(v, {}).get("value")) for v in variants)] for m in order],
        )
        lines += ["### Background invariance (Background Check)", "",
                  "Paired over keys in both original and the variant: drop = clean − variant, ratio = variant / clean.", ""]
        lines += _table(
            ["model", "variant", "n", "clean", "variant acc [95% CI]", "drop", "ratio"],
            [[m, v, str(inv["n"]), _pct(inv["clean"]["value"]), _ci(inv["acc"]), _pct(inv["drop"]), _num(inv["ratio"])]
             for m in order for v, inv in per_model[m]["invariance"].items()],
        )
        lines += ["### Background influence (Background Check)", "",
                  "Foreground removed; above chance = accuracy − 1/classes.", ""]
        lines += _table(
            ["model", "variant", "n", "acc [95% CI]", "chance", "above chance"],
            [[m, v, str(i["acc"]["n"]), _ci(i["acc"]), _pct(i["chance"], 2), _pct(i["above_chance"])]
             for m in order for v, i in per_model[m]["influence"].items()],
        )
        lines += ["### BG-Gap (Noise or Signal)", "", "acc(mixed_same) − acc(mixed_rand) over shared keys.", ""]
        lines += _table(
            ["model", "n", "mixed_same", "mixed_rand", "BG-Gap [95% CI]"],
            [[m, str(g["n"]), _pct(g["acc_mixed_same"]), _pct(g["acc_mixed_rand"]), _ci(g)]
             for m in order if (g := per_model[m].get("bg_gap"))],
        )
        cat_names = [*M.CATEGORIES, "other"]
        lines += ["### Prediction categories (Noise or Signal, Table 3)", "",
                  "From correctness on original (full image), mixed_rand (foreground) and only_bg_t (background).", ""]
        lines += _table(
            ["model", "n", *(M.CATEGORY_TITLES[c] for c in cat_names)],
            [[m, str(c["n"]), *(_pct(c["fractions"][name]) for name in cat_names)]
             for m in order if (c := per_model[m].get("categories"))],
        )
        lines += ["### Trends across models", "",
                  "Least-squares slope and Pearson r of each metric against clean accuracy, "
                  "log10(parameters) and log10(training images).", ""]
        lines += _table(
            ["metric", "variant", "x", "slope", "intercept", "r", "models"],
            [[t["metric"], t["variant"], t["x"], _num(t["slope"]), _num(t["intercept"]), _num(t["pearson_r"]), str(t["n"])]
             for t in summary["trends"].get(ls, [])],
        )
    if figures:
        lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    lines += ["## Notes", ""]
    lines += [f"- {n}" for n in summary["notes"]] or ["- none"]
    return "\n".join(lines) + "\n"


def _fit_line(ax, xs: list[float], ys: list[float], color: str) -> None:
    slope, intercept, _, n = M.linear_trend(xs, ys)
    if n >= 2 and math.isfinite(slope):
        grid = np.linspace(min(xs), max(xs), 2)
        ax.plot(grid, slope * grid + intercept, color=color, linewidth=1)


def figures(out_dir: Path, ls: str, per_model: dict[str, dict]) -> list[str]:
    """The four report figures for one label space; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suffix = "" if ls == "in1k" else f"_{ls}"
    order = model_order(per_model)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written: list[str] = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(name)

    def scatter(kind: str, variants: tuple[str, ...], name: str, title: str, ylabel: str) -> None:
        fig, ax = plt.subplots(figsize=(6, 5))
        for i, v in enumerate(variants):
            pts = []
            for m in order:
                mm = per_model[m]
                if kind == "invariance" and v in mm["invariance"]:
                    pts.append((mm["invariance"][v]["clean"]["value"], mm["invariance"][v]["acc"]["value"]))
                elif kind == "influence" and v in mm["influence"] and "original" in mm["accuracy"]:
                    pts.append((mm["accuracy"]["original"]["value"], mm["influence"][v]["acc"]["value"]))
            pts = [(100 * x, 100 * y) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
            if not pts:
                continue
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            color = colors[i % len(colors)]
            ax.scatter(xs, ys, color=color, label=v, s=20)
            _fit_line(ax, xs, ys, color)
        if kind == "invariance":
            ax.plot([0, 100], [0, 100], "k--", linewidth=1, label="y = x")
        else:
            ax.axhline(100 / NUM_CLASSES[ls], color="k", linestyle=":", linewidth=1, label="chance")
        ax.set_xlabel(f"clean accuracy ({ls}, %)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
        save(fig, name)

    scatter("invariance", M.NOVEL_BACKGROUND_VARIANTS, f"fig_invariance{suffix}.png",
            "Background invariance", "accuracy with a novel background (%)")
    scatter("influence", M.BACKGROUND_ONLY_VARIANTS, f"fig_influence{suffix}.png",
            "Background influence", "accuracy on background only (%)")

    gap_models = [m for m in order if "bg_gap" in per_model[m]]
    fig, ax = plt.subplots(figsize=(max(5, 0.4 * len(gap_models) + 2), 4))
    if gap_models:
        vals = np.array([per_model[m]["bg_gap"]["value"] for m in gap_models]) * 100
        lo = np.array([per_model[m]["bg_gap"]["lo"] for m in gap_models]) * 100
        hi = np.array([per_model[m]["bg_gap"]["hi"] for m in gap_models]) * 100
        err = np.nan_to_num(np.vstack([vals - lo, hi - vals]), nan=0.0)
        ax.errorbar(range(len(gap_models)), vals, yerr=err, fmt="o", capsize=3)
        ax.set_xticks(range(len(gap_models)), gap_models, rotation=60, ha="right", fontsize=7)
    ax.axhline(0, color="k", linewidth=0.8)
    ax.set_ylabel("BG-Gap (%)")
    ax.set_title("BG-Gap: acc(mixed_same) − acc(mixed_rand)", fontsize=10)
    save(fig, f"fig_bg_gap{suffix}.png")

    cat_models = [m for m in order if "categories" in per_model[m]]
    fig, ax = plt.subplots(figsize=(max(5, 0.4 * len(cat_models) + 3), 4))
    bottom = np.zeros(len(cat_models))
    for i, name in enumerate((*M.CATEGORIES, "other")):
        vals = np.array([per_model[m]["categories"]["fractions"][name] for m in cat_models]) * 100
        vals = np.nan_to_num(vals, nan=0.0)
        if name == "other" and not vals.any():
            continue
        ax.bar(range(len(cat_models)), vals, bottom=bottom, label=M.CATEGORY_TITLES[name],
               color=colors[i % len(colors)])
        bottom += vals
    if cat_models:
        ax.set_xticks(range(len(cat_models)), cat_models, rotation=60, ha="right", fontsize=7)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_ylabel("images (%)")
    ax.set_title("Prediction categories (Noise or Signal)")
    save(fig, f"fig_categories{suffix}.png")
    return written


# ---------------------------------------------------------------- entry points


def build_report(
    results_dir: str | Path,
    out_dir: str | Path | None = None,
    label_space: str = "both",
    n_boot: int = 1000,
    seed: int = 0,
    models_json: str | Path | None = None,
    progress: bool = False,
) -> dict:
    """Compute every metric and write metrics.csv, trends.csv, metrics.json, report.md and figures.

    Returns the metrics.json content plus ``outputs`` (paths written). Raises
    ReportError when ``results_dir`` is missing or holds no predictions.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ReportError(f"results directory not found: {results_dir}")
    found = list_predictions(results_dir)
    if not found:
        raise ReportError(f"no predictions under {results_dir / 'predictions'}")
    if label_space not in (*LABEL_SPACES, "both"):
        raise ReportError(f"unknown label space {label_space!r}")
    spaces = LABEL_SPACES if label_space == "both" else (label_space,)
    out_dir = Path(out_dir) if out_dir is not None else results_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    notes = Notes()

    meta_rows = load_model_metadata(Path(models_json) if models_json else models_json_path(), notes)
    scores = load_scores(results_dir)

    from tqdm import tqdm

    per_space: dict[str, dict[str, dict]] = {ls: {} for ls in spaces}
    for model in tqdm(sorted(found), desc="models", unit="model", disable=not progress):
        preds: dict[str, Predictions] = {}
        for variant, path in found[model].items():
            if variant not in VARIANTS:
                notes.add(f"{model}: unknown variant file {path.name} ignored")
                continue
            try:
                p = read_predictions(path)
            except (ValueError, KeyError, OSError) as exc:
                notes.add(f"{model}: unreadable predictions {path.name} skipped ({exc})")
                continue
            if np.unique(p.keys.astype(str)).size != len(p):
                notes.add(f"{model}: {variant} has duplicate keys, skipped")
                continue
            preds[variant] = p
        check_keys(model, preds, notes)
        for ls in spaces:
            data = {}
            for v, p in preds.items():
                o = outcomes(p, ls)
                if o is None:
                    notes.add(f"{model}: no {ls} predictions for {v}, left out of {ls} metrics")
                    continue
                data[v] = o
            if not data:
                continue
            per_space[ls][model] = model_metrics(
                data, NUM_CLASSES[ls], n_boot, seed, f"{model} [{ls}]", notes
            )

    metadata: dict[str, dict] = {}
    for model in sorted(found):
        row = meta_rows.get(model, {})
        score = scores.get(model, {})
        metadata[model] = {
            "params": row.get("params"),
            "train_images": row.get("train_images"),
            "train_data": row.get("train_data"),
            "top1": row.get("top1"),
            "weights": score.get("weights") or row.get("weights") or row.get("tag"),
            "precision": score.get("precision"),
        }
    if meta_rows:
        lacking = [m for m in sorted(found) if m not in meta_rows]
        if lacking:
            notes.add(f"no metadata row in models.json for {len(lacking)} model(s) ({_examples(lacking)}): "
                      "they are left out of trends against parameters and training images")

    csv_rows: list[dict] = []
    trend_rows: dict[str, list[dict]] = {}
    fig_names: list[str] = []
    for ls in spaces:
        per_model = per_space[ls]
        if not per_model:
            notes.add(f"{ls}: no model has predictions in this label space, left out")
            continue
        for model in model_order(per_model):
            csv_rows += long_rows(model, ls, per_model[model])
        axes = {
            "clean_acc": {m: mm["accuracy"].get("original", {}).get("value", math.nan) for m, mm in per_model.items()},
            "log10_params": {m: _positive_log10(metadata[m]["params"]) for m in per_model},
            "log10_train_images": {m: _positive_log10(metadata[m]["train_images"]) for m in per_model},
        }
        trend_rows[ls] = trends(per_model, axes, notes, ls)
        fig_names += figures(out_dir, ls, per_model)

    summary = {
        "results_dir": str(results_dir),
        "bootstrap": n_boot,
        "seed": seed,
        "models_seen": sorted(found),
        "metadata": metadata,
        "label_spaces": {ls: per_space[ls] for ls in spaces if per_space[ls]},
        "trends": trend_rows,
        "notes": notes.items,
    }
    safe = _json_safe(summary)
    atomic_write_text(out_dir / "metrics.csv", _csv_text(CSV_COLUMNS, csv_rows))
    atomic_write_text(out_dir / "trends.csv", _csv_text(TREND_COLUMNS, [r for rs in trend_rows.values() for r in rs]))
    atomic_write_text(out_dir / "metrics.json", json.dumps(safe, indent=1, sort_keys=False) + "\n")
    atomic_write_text(out_dir / "report.md", markdown(safe, fig_names))  # type: ignore[arg-type]
    outputs = [out_dir / n for n in ("metrics.csv", "trends.csv", "metrics.json", "report.md", *fig_names)]
    return {**safe, "outputs": [str(p) for p in outputs]}  # type: ignore[dict-item]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval.report",
        description="Background-reliance metrics, tables and figures from per-sample predictions "
        "(RESULTS_DIR/predictions/<model>/<variant>.csv).",
    )
    parser.add_argument("results_dir", metavar="RESULTS_DIR", type=Path, help="evaluator output folder")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: RESULTS_DIR/report)")
    parser.add_argument("--label-space", choices=("in1k", "in9", "both"), default="both",
                        help="ImageNet-1k (pred == label), ImageNet-9 superclasses, or both (default)")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="B",
                        help="bootstrap resamples for the BG-Gap interval (0 = none; default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--models-json", type=Path, default=None,
                        help="model zoo file with params/train_images (default: data_manifests/models.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.bootstrap < 0:
        print("error: --bootstrap must be >= 0", file=sys.stderr)
        return 2
    try:
        result = build_report(
            args.results_dir, args.out, label_space=args.label_space, n_boot=args.bootstrap,
            seed=args.seed, models_json=args.models_json, progress=True,
        )
    except (ReportError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(result["outputs"][0]).parent
    print(f"report written to {out}: {', '.join(Path(p).name for p in result['outputs'])}")
    if result["notes"]:
        print(f"{len(result['notes'])} note(s), see {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
