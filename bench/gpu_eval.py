"""How close does the streaming evaluator get to the GPU's own speed?

Measures, for ResNet-50 (random weights; bf16 + channels-last on CUDA):

1. forward-only images/s on in-memory tensors (the ceiling),
2. end-to-end images/s from shards through ``eval.score`` (read, verify,
   decode, resize/normalise on device, forward, write predictions),

prints their ratio, then times a sweep of several models (``paper32`` by
default on CUDA) over the same shards, decoding each image once for all of
them, and the full-size Backgrounds Challenge: 4050 foregrounds x 4050
backgrounds (the size of ImageNet-9's test set), ResNet-50, bf16, random
weights biased so that a fifth of the foregrounds survive every background
(``bench.challenge_bench``; the pretrained ResNet-50's figure is 22.3%),
through ``eval.challenge`` end to end; their loop (``challenge_eval.py``,
ported) runs on the first ``--their-foregrounds`` foregrounds and is
projected to all of them. Without ``--shards`` it writes synthetic 224 px
JPEG shards (with a manifest) to a temporary folder. Prints one JSON summary
on stdout.

    python bench/gpu_eval.py                 # CUDA, synthetic shards
    python bench/gpu_eval.py --quick         # tiny CPU run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from eval import score, zoo  # noqa: E402
from eval.device import PRECISIONS  # noqa: E402
from pipeline.shard_format import MANIFEST_NAME, shard_name  # noqa: E402

QUICK_SWEEP = "mobilenet_v3_small,resnet18,squeezenet1_1"


def synthetic_jpegs(rng: np.random.Generator, n_unique: int, size: int) -> list[bytes]:
    """Smooth random images encoded as the builder encodes them (its own encoder); reused across keys."""
    from builders.shards import encode_image

    out = []
    for _ in range(n_unique):
        coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        pixels = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))
        noise = rng.integers(-12, 13, size=pixels.shape)
        out.append(encode_image(np.clip(pixels + noise, 0, 255).astype(np.uint8), "jpg", 95))
    return out


def write_synthetic_shards(folder: Path, n_shards: int, per_shard: int, size: int, seed: int = 0) -> Path:
    """``folder/original/`` with ``n_shards`` shards and a manifest, written through the shard format."""
    from pipeline.classes import imagenet_classes, to_in9
    from pipeline.shard_format.manifest import Manifest, ShardEntry, Totals
    from pipeline.shard_format.spec import META_FIELDS, sample_members
    from pipeline.shard_format.writer import ShardFile

    rng = np.random.default_rng(seed)
    images = synthetic_jpegs(rng, min(256, n_shards * per_shard), size)
    variant_dir = folder / "original"
    variant_dir.mkdir(parents=True, exist_ok=True)
    wnids = imagenet_classes().wnids
    entries = []
    i = 0
    for s in range(n_shards):
        shard = ShardFile(variant_dir / shard_name("original", s))
        for _ in range(per_shard):
            key, label = f"syn{i:07d}", (i * 7) % 1000
            meta = dict.fromkeys(META_FIELDS)
            meta.update(key=key, variant="original", label=label, wnid=wnids[label], in9_label=to_in9(label),
                        source="synthetic", seed=seed)
            shard.write(sample_members(key, images[i % len(images)], "jpg", label, meta))
            i += 1
        sha, nbytes = shard.close()
        entries.append(ShardEntry(shard_name("original", s), sha, nbytes, per_shard))
    manifest = Manifest(variant="original", shards=tuple(entries), totals=Totals(samples=i, shards=n_shards),
                        config={"size": size, "resize": size * 8 // 7, "format": "jpg"})
    (variant_dir / MANIFEST_NAME).write_text(manifest.to_json())
    return variant_dir


def forward_only(model_id: str, device: torch.device, precision: str, channels_last: bool, batch: int,
                 iters: int, warmup: int) -> float:
    """Images/s of the model alone on a fixed in-memory batch (no I/O, no preprocessing)."""
    spec = zoo.resolve_models(model_id)[0]
    model = zoo.build_model(spec, pretrained=False, device=device).eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    size = spec.input_size
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    dtype = PRECISIONS[precision]

    def step() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            model(x)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - t0)


def gpu_decode_check(shards: Path, device: torch.device, batch: int) -> dict[str, Any] | None:
    """Largest pixel difference between nvJPEG and CPU (PIL) decoding of one batch; None off CUDA."""
    if device.type != "cuda":
        return None
    from eval.stream import ReadOptions, images_to_device, make_loader
    from pipeline.shard_format import resolve_shards

    refs = resolve_shards(str(shards))[:1]
    cpu = next(iter(make_loader(refs, [0], batch, ReadOptions(), 0, False)))
    gpu = next(iter(make_loader(refs, [0], batch, ReadOptions(defer_jpeg=True), 0, False)))
    decoded = images_to_device(gpu, device).cpu()
    diff = (decoded.int() - cpu.images.int()).abs()
    return {"images": int(decoded.shape[0]), "max_abs_diff": int(diff.max()), "mean_abs_diff": float(diff.float().mean())}


def score_run(shards: Path, models: str, out: Path, device: torch.device, precision: str, batch: int, workers: int,
              channels_last: bool, compile_: bool, limit: int | None = None) -> score.RunStats:
    argv = ["--shards", str(shards), "--models", models, "--out", str(out), "--random-weights",
            "--device", device.type, "--precision", precision, "--batch-size", str(batch), "--workers", str(workers)]
    if channels_last:
        argv.append("--channels-last")
    if compile_:
        argv.append("--compile")
    if limit is not None:
        argv += ["--limit", str(limit)]
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the JSON summary
        return score.run(score.build_parser().parse_args(argv))


def challenge_run(root: Path, n: int, device: torch.device, precision: str, batch: int, workers: int,
                  their_foregrounds: int) -> dict[str, Any]:
    """The challenge at n x n: ours end to end, and their loop on the first few foregrounds, projected."""
    from bench import challenge_bench as cb
    from eval.device import build_models

    t0 = time.perf_counter()
    shards = cb.write_challenge_shards(root / "challenge", n, n, 224)
    write_s = time.perf_counter() - t0
    with cb.biased_model("resnet50") as model_id:  # registered for this run only
        ours = cb.run_ours(shards, model_id, root / "challenge-results", device.type, precision, batch, channels_last=True)
        summary: dict[str, Any] = {
            "foregrounds": n, "backgrounds": n, "model": model_id, "precision": precision, "batch_size": batch,
            "synthetic_shards_write_s": round(write_s, 2),
            "challenge_accuracy": ours["challenge_accuracy"],
            "composites": ours["composites"],
            "ours_wall_s": round(ours["wall_s"], 2),
            "ours_composites_per_s": round(ours["composites"] / ours["search_s"], 1),
            "goal_wall_s": 600, "goal_met": ours["wall_s"] < 600,
        }
        if their_foregrounds > 0:
            k = min(n, their_foregrounds)
            layout = cb.export_their_layout(shards, root / "theirs")
            layout["foregrounds"] = layout["foregrounds"][:k]  # classes come in turn: the first k have the same mix
            built = build_models(model_id, device, random_weights=True, precision=precision)[0]
            with torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32"):
                theirs = cb.run_theirs(layout, built.module, built.mean, built.std, device, workers)
            summary["theirs_foregrounds_timed"] = k
            summary["theirs_projected_wall_s"] = round(theirs["wall_s"] * n / k, 1)
            summary["speedup_projected"] = round(theirs["wall_s"] * n / k / ours["wall_s"], 2)
        return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default=None, help="shard spec to read (default: synthetic shards in a temp folder)")
    p.add_argument("--models", default=None, help="sweep models: paper32 (default on CUDA) or ID,ID,...")
    p.add_argument("--synthetic-shards", type=int, default=8)
    p.add_argument("--samples-per-shard", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--device", choices=("cuda", "cpu"), default=None)
    p.add_argument("--precision", choices=tuple(PRECISIONS), default=None)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-sweep", action="store_true", help="skip the multi-model sweep")
    p.add_argument("--challenge-size", type=int, default=4050,
                   help="foregrounds = backgrounds of the challenge run (0 skips it; default 4050)")
    p.add_argument("--their-foregrounds", type=int, default=45,
                   help="foregrounds their ported loop is timed on, then projected (0 skips it; default 45)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if args.quick:
        args.synthetic_shards, args.samples_per_shard = 2, 8
        args.batch_size, args.workers = 4, min(args.workers, 2)
        args.challenge_size, args.their_foregrounds = min(args.challenge_size, 10), min(args.their_foregrounds, 5)
    sweep_models = args.models or ("paper32" if device.type == "cuda" and not args.quick else QUICK_SWEEP)
    iters, warmup = (3, 1) if args.quick else (30, 10)

    with tempfile.TemporaryDirectory(prefix="bgcheck-bench-") as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        shards = Path(args.shards) if args.shards else write_synthetic_shards(
            tmp_path / "shards", args.synthetic_shards, args.samples_per_shard, 224)
        write_s = time.perf_counter() - t0

        fwd = forward_only("resnet50", device, precision, True, args.batch_size, iters, warmup)
        # warm-up pass (worker start, cudnn autotune) on one shard's worth, then the measured pass
        score_run(shards, "resnet50", tmp_path / "warm", device, precision, args.batch_size, args.workers, True,
                  args.compile, limit=args.batch_size)
        t0 = time.perf_counter()
        e2e = score_run(shards, "resnet50", tmp_path / "r50", device, precision, args.batch_size, args.workers, True,
                        args.compile)
        e2e_wall = time.perf_counter() - t0
        summary: dict[str, Any] = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "precision": precision,
            "channels_last": True,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "images": e2e.n_images,
            "synthetic_shards_write_s": round(write_s, 2) if not args.shards else None,
            "resnet50_forward_only_images_per_s": round(fwd, 1),
            "resnet50_end_to_end_images_per_s": round(e2e.n_images / e2e.seconds, 1),
            "resnet50_end_to_end_wall_s": round(e2e_wall, 2),
            "end_to_end_over_forward_only": round(e2e.n_images / e2e.seconds / fwd, 3),
            "gpu_jpeg_decode": gpu_decode_check(shards, device, args.batch_size),
        }
        if not args.no_sweep:
            t0 = time.perf_counter()
            sweep = score_run(shards, sweep_models, tmp_path / "sweep", device, precision, args.batch_size,
                              args.workers, True, args.compile)
            sweep_wall = time.perf_counter() - t0
            per_model = {}
            for row in sweep.rows:
                per_model[row["model"]] = float(row["images_per_s"]) if row["images_per_s"] else None
            summary["sweep"] = {
                "models": sweep_models,
                "n_models": len(per_model),
                "images": sweep.n_images,
                "scoring_s": round(sweep.seconds, 2),
                "wall_s_incl_model_build": round(sweep_wall, 2),
                "images_x_models_per_s": round(sweep.n_images * len(per_model) / sweep.seconds, 1),
                "per_model_images_per_s": per_model,
            }
        if args.challenge_size > 0:
            summary["challenge"] = challenge_run(tmp_path, args.challenge_size, device, precision, args.batch_size,
                                                 0 if device.type == "cpu" else args.workers, args.their_foregrounds)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
