"""``python -m bench.eval_bench``: how close the evaluator gets to the models' own speed on the CPU.

Measured in one run, on shards built by the real builder from a generated
ImageNet-shaped tree (224x224 JPEG, quality 95, variant ``original``), so
every figure is a ratio of times taken on the same machine under the same load:

- forward-only images/s of each model on an in-memory batch (the ceiling),
  at 1 thread and at every core, best of the two;
- a decode pass: stream, verify, decode and batch the shards, no model;
- end to end through ``eval.score.run`` (read, verify, decode, preprocess,
  forward, per-shard commits, merge, scores.csv; random weights), for each
  ``--workers`` x torch thread setting, because on a small CPU the decode
  workers and the model compete for the same cores;
- one K-model pass (decode once, score many) against the sum of the K
  forward-only times plus one decode pass.

Forward-only timings cover as many images as the end-to-end runs, and every
measurement is repeated ``--repeats`` times, interleaved, keeping the best of
each (other load on the machine only ever slows a run down); the per-repeat
figures are in the JSON. The ceiling is the fastest forward-only setting
(threads, NCHW or channels-last); end-to-end runs use ``--channels-last``
plus one run with eval.score's defaults. Targets (PASS/MISS) are printed as a
table; ``--json`` writes everything.

OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE`` unless already set;
it must be set before torch loads): spinning threads fight the decoders and
any other load for the cores and make every figure erratic.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import math
import os
import pstats
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

if "torch" not in sys.modules:  # only before torch loads OpenMP (see above); later it changes nothing
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from bench.builder_bench import DEFAULT_CACHE  # noqa: E402

PRIMARY_MODEL = "mobilenet_v3_small"
SWEEP_MODELS = ("mobilenet_v3_small", "resnet18", "shufflenet_v2_x1_0", "squeezenet1_1")
WORKER_SETTINGS = (0, 1, 2)
N_SHARDS = 4  # so that two decode workers each have shards to read

# name -> (comparison, threshold): "ge" means the measured ratio must be >= threshold.
TARGETS = {
    "pipeline_over_forward": ("ge", 0.9),
    "k_pass_over_budget": ("le", 1.1),
}

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def bench_shards(cache: Path, n: int, log: Log = _quiet) -> Path:
    """``original`` shards of a generated ``n``-image tree, built once and cached; returns the variant folder."""
    from bench.make_tree import make_tree
    from builders.config import BuildConfig
    from builders.make_shards import build
    from pipeline.shard_format import MANIFEST_NAME

    out = cache / f"eval-shards-n{n}"
    variant_dir = out / "original"
    if (variant_dir / MANIFEST_NAME).is_file():
        return variant_dir
    log(f"generating a {n}-image tree and building shards under {out}")
    images, boxes = make_tree(cache, n, workers=2)
    shutil.rmtree(out, ignore_errors=True)
    config = BuildConfig(
        variants=("original",), source="imagenet-val", images=str(images), annotations=str(boxes),
        out=str(out), shard_size=max(1, math.ceil(n / N_SHARDS)), workers=2, quality=95, format="jpg",
    ).validate()  # fmt: skip
    build(config, progress=False)
    return variant_dir


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` intra-op threads, restoring the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def forward_rate(model_id: str, batch: int, threads: int, channels_last: bool, images: int) -> float:
    """Forward-only images/s on an in-memory fp32 batch, over about ``images`` images (no I/O, no preprocessing)."""
    from bench.gpu_eval import forward_only

    with torch_threads(threads):
        return forward_only(model_id, torch.device("cpu"), "fp32", channels_last, batch,
                            max(1, math.ceil(images / batch)), 2)


def decode_pass(shards: Path, batch: int, workers: int) -> tuple[int, float]:
    """(images, seconds) to stream, verify, decode and batch every shard, as eval.score reads them."""
    from eval.stream import ReadOptions, StreamError, make_loader
    from pipeline.shard_format import resolve_shards

    refs = resolve_shards(str(shards))
    started = time.perf_counter()
    n = 0
    # Decoders at normal priority: the fastest pass, so the K-model budget is the strictest.
    for item in make_loader(refs, list(range(len(refs))), batch, ReadOptions(), workers, pin_memory=False):
        if item.error:
            raise StreamError(item.error)
        n += len(item.keys)
    return n, time.perf_counter() - started


def score_pass(
    shards: Path, models: Sequence[str], batch: int, workers: int, threads: int, channels_last: bool,
    scratch: Path, profile: cProfile.Profile | None = None,
) -> dict[str, float]:
    """One fresh ``eval.score.run`` (random weights, fp32, CPU): images, its scoring-loop and whole-call seconds.

    ``loop_s`` is what eval.score reports as end to end (first read to last
    commit); ``wall_s`` is the whole call, model construction and merge included.
    """
    from bench.gpu_eval import score_run

    out = Path(tempfile.mkdtemp(prefix="score-", dir=scratch))
    try:
        with torch_threads(threads), contextlib.redirect_stderr(io.StringIO()):
            started = time.perf_counter()
            if profile is not None:
                profile.enable()
            try:
                stats = score_run(shards, ",".join(models), out, torch.device("cpu"), "fp32", batch, workers,
                                  channels_last, False)
            finally:
                if profile is not None:
                    profile.disable()
            wall = time.perf_counter() - started
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"images": stats.n_images, "loop_s": stats.seconds, "wall_s": wall}


# ---------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------


def evaluate(ratios: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Each target's measured value, threshold and PASS/MISS."""
    out = {}
    for name, (op, threshold) in TARGETS.items():
        value = ratios[name]
        ok = value >= threshold if op == "ge" else value <= threshold
        out[name] = {"value": value, "target": f"{'>=' if op == 'ge' else '<='} {threshold}", "pass": bool(ok)}
    return out


def _layout(channels_last: bool) -> str:
    return "cl" if channels_last else "nchw"


def run_bench(
    n: int = 1000,
    batch: int = 64,
    repeats: int = 2,
    cache: Path = DEFAULT_CACHE,
    models: Sequence[str] = SWEEP_MODELS,
    primary: str = PRIMARY_MODEL,
    worker_settings: Sequence[int] = WORKER_SETTINGS,
    profile_best: bool = False,
    log: Log = _quiet,
) -> dict[str, Any]:
    """Every measurement, interleaved over ``repeats`` rounds; returns the JSON-able results."""
    shards = bench_shards(Path(cache), n, log)
    cores = os.cpu_count() or 1
    all_threads = torch.get_num_threads()
    thread_settings = sorted({1, all_threads})
    models = list(dict.fromkeys(models))
    # (model, threads, layout) forward-only settings: both layouts everywhere, 1 thread for the primary model.
    fwd_settings = [(m, t, cl) for m in dict.fromkeys([primary, *models]) for t in thread_settings
                    for cl in (False, True) if m == primary or t == all_threads]
    single_configs = [(w, t, True) for w in worker_settings for t in thread_settings]
    default_config = (min(8, cores), all_threads, False)  # eval.score's defaults: --workers, threads, layout
    if default_config not in single_configs:
        single_configs.append(default_config)
    fwd: dict[tuple[str, int, bool], list[float]] = {k: [] for k in fwd_settings}
    dec: dict[int, list[float]] = {w: [] for w in worker_settings}
    single: dict[tuple[int, int, bool], list[dict[str, float]]] = {c: [] for c in single_configs}
    multi: dict[int, list[dict[str, float]]] = {w: [] for w in worker_settings}
    n_images = 0
    with tempfile.TemporaryDirectory(prefix="bgcheck-eval-bench-") as tmp:
        scratch = Path(tmp)
        n_images, _ = decode_pass(shards, batch, 0)  # warm-up: page cache, imports; not recorded
        score_pass(shards, [primary], batch, 0, all_threads, True, scratch)
        for r in range(repeats):
            log(f"round {r + 1}/{repeats}: forward-only, {len(fwd_settings)} settings")
            for model_id, t, cl in fwd_settings:
                fwd[(model_id, t, cl)].append(forward_rate(model_id, batch, t, cl, n_images))
            log(f"round {r + 1}/{repeats}: decode passes")
            for w in worker_settings:
                images, seconds = decode_pass(shards, batch, w)
                dec[w].append(images / seconds)
            log(f"round {r + 1}/{repeats}: {primary} end to end, (workers, threads, channels-last) {single_configs}")
            for w, t, cl in single_configs:
                single[(w, t, cl)].append(score_pass(shards, [primary], batch, w, t, cl, scratch))
            log(f"round {r + 1}/{repeats}: {len(models)}-model pass, workers {list(worker_settings)}")
            for w in worker_settings:
                multi[w].append(score_pass(shards, models, batch, w, all_threads, True, scratch))

        best_fwd = {m: max(max(v) for (mm, _, _), v in fwd.items() if mm == m) for m in dict.fromkeys(k[0] for k in fwd)}
        best_fwd_setting = {
            m: max(((t, cl) for (mm, t, cl) in fwd if mm == m), key=lambda k, m=m: max(fwd[(m, *k)]))
            for m in best_fwd
        }
        best_dec = {w: max(v) for w, v in dec.items()}

        pipeline = {}
        for (w, t, cl), runs in single.items():
            key = f"workers{w}_threads{t}_{_layout(cl)}"
            pipeline[key] = {
                "workers": w, "threads": t, "channels_last": cl,
                "loop_images_per_s": [x["images"] / x["loop_s"] for x in runs],
                "wall_images_per_s": [x["images"] / x["wall_s"] for x in runs],
                "ratio_loop": max(x["images"] / x["loop_s"] for x in runs) / best_fwd[primary],
                "ratio_wall": max(x["images"] / x["wall_s"] for x in runs) / best_fwd[primary],
            }  # fmt: skip
        best_single = max(pipeline, key=lambda k: pipeline[k]["ratio_wall"])
        default_key = "workers{}_threads{}_{}".format(*default_config[:2], _layout(default_config[2]))

        k_pass = {}
        for w, runs in multi.items():
            images = runs[0]["images"]
            forward_s = {m: images / best_fwd[m] for m in models}
            budget = sum(forward_s.values()) + images / best_dec[w]
            k_pass[f"workers{w}_threads{all_threads}_cl"] = {
                "workers": w, "threads": all_threads, "channels_last": True, "images": images,
                "wall_s": [x["wall_s"] for x in runs], "loop_s": [x["loop_s"] for x in runs],
                "forward_only_s": forward_s, "decode_pass_s": images / best_dec[w], "budget_s": budget,
                "ratio_wall": min(x["wall_s"] for x in runs) / budget,
                "ratio_loop": min(x["loop_s"] for x in runs) / budget,
            }  # fmt: skip
        best_multi = min(k_pass, key=lambda k: k_pass[k]["ratio_wall"])

        profile_text = None
        if profile_best:
            prof = cProfile.Profile()
            cfg = pipeline[best_single]
            score_pass(shards, [primary], batch, cfg["workers"], cfg["threads"], cfg["channels_last"], scratch,
                       profile=prof)
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(15)
            profile_text = buf.getvalue()

    ratios = {
        "pipeline_over_forward": pipeline[best_single]["ratio_wall"],
        "k_pass_over_budget": k_pass[best_multi]["ratio_wall"],
    }
    return {
        "n_images": n_images,
        "batch_size": batch,
        "repeats": repeats,
        "cores": cores,
        "torch_threads": all_threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "precision": "fp32",
        "primary_model": primary,
        "models": models,
        "shards": str(shards),
        "forward_only_images_per_s": {f"{m}/threads{t}/{_layout(cl)}": v for (m, t, cl), v in fwd.items()},
        "forward_only_best": best_fwd,
        "forward_only_best_setting": {m: f"threads{t}/{_layout(cl)}" for m, (t, cl) in best_fwd_setting.items()},
        "decode_pass_images_per_s": {str(w): v for w, v in dec.items()},
        "pipeline": pipeline,
        "pipeline_best": best_single,
        "pipeline_defaults": default_key,
        "k_pass": k_pass,
        "k_pass_best": best_multi,
        "targets": evaluate(ratios),
        "profile": profile_text,
    }


def format_table(results: dict[str, Any]) -> str:
    lines = [f"{'measure':<24} {'value':>7}  {'target':<8} result  config", "-" * 78]
    configs = {"pipeline_over_forward": results["pipeline_best"], "k_pass_over_budget": results["k_pass_best"]}
    for name, row in results["targets"].items():
        lines.append(f"{name:<24} {row['value']:>7.3f}  {row['target']:<8} {'PASS' if row['pass'] else 'MISS'}"
                     f"    {configs[name]}")
    lines.append("")
    lines.append(f"{results['n_images']} images, batch {results['batch_size']}, fp32, best of {results['repeats']} "
                 f"rounds, {results['cores']} cores, OMP_WAIT_POLICY={results['omp_wait_policy']}")
    if results["n_images"] < N_SHARDS * results["batch_size"]:
        lines.append("note: shards hold fewer images than a batch, so end-to-end batches are smaller than "
                     "forward-only ones: ratios are indicative only")
    lines.append("forward-only images/s (best setting): " + ", ".join(
        f"{m} {v:.1f} ({results['forward_only_best_setting'][m]})" for m, v in results["forward_only_best"].items()))
    lines.append("decode pass images/s by workers: "
                 + ", ".join(f"{w}: {max(v):.1f}" for w, v in results["decode_pass_images_per_s"].items()))
    lines.append(f"{results['primary_model']} end to end / forward-only: whole run (scoring loop)")
    for key, row in results["pipeline"].items():
        mark = "  <- eval.score defaults" if key == results["pipeline_defaults"] else ""
        lines.append(f"  {key:<26} {row['ratio_wall']:.3f} ({row['ratio_loop']:.3f}){mark}")
    lines.append(f"{len(results['models'])}-model pass / (sum of forward-only + one decode pass): whole run (loop)")
    for key, row in results["k_pass"].items():
        lines.append(f"  {key:<26} {row['ratio_wall']:.3f} ({row['ratio_loop']:.3f})  "
                     f"best {min(row['wall_s']):.1f} s vs budget {row['budget_s']:.1f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.eval_bench", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=None, help="images in the generated tree (default 1000; 100 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="about 100 images, one round, workers 0 and 1 (under a minute; fixed costs dominate, "
                   "so its ratios are indicative only)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size everywhere (default 64)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds, best of each kept (default 2; 1 quick)")
    p.add_argument("--models", default=",".join(SWEEP_MODELS), help="models of the K-model pass (comma-separated)")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="where generated trees and shards are kept")
    p.add_argument("--profile", action="store_true", help="cProfile the best end-to-end configuration once more")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    n = args.n if args.n is not None else (100 if args.quick else 1000)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 2)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if n < 4 or args.batch_size < 1 or repeats < 1 or not models:
        print("eval_bench: error: need --n >= 4, --batch-size >= 1, --repeats >= 1 and at least one model",
              file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights only: never reach for a download
    from eval import zoo

    try:
        zoo.resolve_models(",".join([PRIMARY_MODEL, *models]))
    except (zoo.UnknownModel, ValueError) as exc:
        print(f"eval_bench: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    workers = WORKER_SETTINGS[:2] if args.quick else WORKER_SETTINGS  # quick: in-process and one worker
    results = run_bench(n, args.batch_size, repeats, Path(args.cache), models, worker_settings=workers,
                        profile_best=args.profile, log=log)
    print(format_table(results))
    if results["profile"]:
        print(results["profile"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
