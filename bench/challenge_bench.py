"""``python -m bench.challenge_bench``: our Backgrounds Challenge against a faithful port of theirs, on the CPU.

Same shards, same model, same process, one after the other:

- **ours**: ``eval.challenge`` end to end (read and verify the shards, decode
  every background once, composite on the device, early stop per
  foreground, commit, merge);
- **theirs**: Noise or Signal's ``challenge_eval.py`` loop ported faithfully:
  the backgrounds written out as JPEG files (their ``only_bg_t`` folder) and
  read through a batch-32 DataLoader of PIL decodes + ``ToTensor`` once per
  foreground, ``bg * (1 - mask) + mask * fg`` in float, normalisation inside
  the model, the 1000-way argmax mapped to ImageNet-9 through a dict, stop
  at the first batch holding a misclassified composite.

Both must find the same vulnerable foregrounds (checked). The model has random
weights with the logits of one ImageNet-9 superclass raised, and a fifth of
the foregrounds are of that superclass: those survive every background (as
about a fifth do for the pretrained ResNet-50, 22.3%), the others fall to the
first; the robust fifth decides the cost, as in the real challenge.
Synthetic shards (smooth random images, an elliptical mask per foreground)
are written through the shard format to a temporary folder.

    python -m bench.challenge_bench                  # 100 x 100 at 224 px
    python -m bench.challenge_bench --quick          # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if "torch" not in sys.modules:  # only before torch loads OpenMP (bench/eval_bench.py says why)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

SMALL_MODEL = "mobilenet_v3_small"
ROBUST_SUPERCLASS = 0  # the superclass the biased model always answers
SUPERCLASSES = (0, 2, 4, 6, 8)  # foregrounds and backgrounds come from these in turn: a fifth are robust
BIAS = 1e4  # added to the robust superclass's logits after scaling the network's own by SCALE
SCALE = 1e-3
TARGET_SPEEDUP = 3.0


# ---------------------------------------------------------------- inputs


def _smooth_image(rng: np.random.Generator, size: int) -> np.ndarray:
    coarse = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC)).astype(np.int16)
    return np.clip(pixels + rng.integers(-10, 11, size=pixels.shape), 0, 255).astype(np.uint8)


def _ellipse_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    ys, xs = np.mgrid[0:size, 0:size]
    cx, cy = rng.uniform(0.35, 0.65, 2) * size
    rx, ry = rng.uniform(0.15, 0.3, 2) * size
    return ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0


def write_challenge_shards(folder: Path, n_foregrounds: int, n_backgrounds: int, size: int, per_shard: int = 1000,
                           seed: int = 0) -> dict[str, Path]:
    """``original`` (with masks) and ``only_bg_t`` shards with manifests; classes from SUPERCLASSES in turn."""
    from builders.shards import encode_image, encode_mask
    from pipeline.classes import imagenet_classes, in9_members, to_in9
    from pipeline.shard_format import MANIFEST_NAME, shard_name
    from pipeline.shard_format.manifest import Manifest, ShardEntry, Totals
    from pipeline.shard_format.spec import META_FIELDS, sample_members
    from pipeline.shard_format.writer import ShardFile

    rng = np.random.default_rng(seed)
    wnids = imagenet_classes().wnids
    members = in9_members()
    out = {}
    for variant, n, with_masks in (("original", n_foregrounds, True), ("only_bg_t", n_backgrounds, False)):
        variant_dir = folder / variant
        variant_dir.mkdir(parents=True, exist_ok=True)
        entries = []
        for s, start in enumerate(range(0, n, per_shard)):
            shard = ShardFile(variant_dir / shard_name(variant, s))
            count = min(per_shard, n - start)
            for i in range(start, start + count):
                group = members[SUPERCLASSES[i % len(SUPERCLASSES)]]
                label = group[(i // len(SUPERCLASSES)) % len(group)]
                key = f"syn{i:06d}"
                meta = dict.fromkeys(META_FIELDS)
                meta.update(key=key, variant=variant, label=label, wnid=wnids[label], in9_label=to_in9(label),
                            source="synthetic", seed=seed)
                image = encode_image(_smooth_image(rng, size), "jpg", 95)
                mask = encode_mask(_ellipse_mask(rng, size)) if with_masks else None
                shard.write(sample_members(key, image, "jpg", label, meta, mask_png=mask))
            sha, nbytes = shard.close()
            entries.append(ShardEntry(shard_name(variant, s), sha, nbytes, count))
        manifest = Manifest(variant=variant, shards=tuple(entries), totals=Totals(samples=n, shards=len(entries)),
                            config={"size": size, "resize": size * 8 // 7, "format": "jpg", "with_masks": with_masks})
        (variant_dir / MANIFEST_NAME).write_text(manifest.to_json())
        out[variant] = variant_dir
    return out


class AlwaysOneSuperclass(torch.nn.Module):
    """A network's logits scaled down, plus a large bias on one ImageNet-9 superclass's member classes."""

    def __init__(self, network: torch.nn.Module, superclass: int) -> None:
        super().__init__()
        from pipeline.classes import in9_members

        self.network = network
        bias = torch.zeros(1000)
        bias[in9_members()[superclass]] = BIAS
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x).float() * SCALE + self.bias


@contextlib.contextmanager
def biased_model(base_id: str) -> Iterator[str]:
    """``<base>_one_superclass`` (the base architecture, random weights, biased head) registered for the block."""
    from eval import zoo

    base = zoo.resolve_models(base_id)[0]
    spec = dataclasses.replace(base, id=f"{base_id.replace('.', '_')}_one_superclass", paper32=False)

    def build(spec_: Any, *, pretrained: bool, weights_dir: Path | None) -> torch.nn.Module:
        return AlwaysOneSuperclass(zoo.build_model(base, pretrained=False), ROBUST_SUPERCLASS)

    with zoo.registered(spec, factory=build, replace=True):
        yield spec.id


# ---------------------------------------------------------------- ours


def run_ours(shards: dict[str, Path], model_id: str, out: Path, device: str, precision: str, batch: int,
             channels_last: bool) -> dict[str, Any]:
    from eval import challenge

    argv = ["--foregrounds", str(shards["original"]), "--backgrounds", str(shards["only_bg_t"]), "--models", model_id,
            "--out", str(out), "--random-weights", "--device", device, "--precision", precision,
            "--batch-size", str(batch)]
    if channels_last:
        argv.append("--channels-last")
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        stats = challenge.run(challenge.build_parser().parse_args(argv))
    wall = time.perf_counter() - t0
    row = stats.rows[0]
    from eval.challenge import results

    vulnerable = {r["key"] for r in results.read_foregrounds(out, model_id) if r["vulnerable"] == "1"}
    return {"wall_s": wall, "search_s": stats.seconds, "composites": stats.composites,
            "foregrounds": int(row["foregrounds"]), "vulnerable": vulnerable,
            "challenge_accuracy": float(row["challenge_accuracy"])}


# ---------------------------------------------------------------- theirs, ported


class _Folder(torch.utils.data.Dataset):
    """Their ImageFolder of backgrounds: every item opened and decoded from its file when it is asked for."""

    def __init__(self, files: list[Path], labels: list[int]) -> None:
        self.files, self.labels = files, labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from torchvision.transforms import functional as TF

        with Image.open(self.files[i]) as im:
            return TF.to_tensor(im.convert("RGB")), self.labels[i]


class _Normalized(torch.nn.Module):
    """Their NormalizedModel: clamp to [0, 1], normalise, the network."""

    def __init__(self, network: torch.nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network((x.clamp(0, 1) - self.mean) / self.std)


def _members(variant_dir: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} of every shard of a variant folder, in shard order."""
    import tarfile

    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(variant_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return samples


def export_their_layout(shards: dict[str, Path], folder: Path) -> dict[str, Any]:
    """Their data folder: the very JPEG bytes of our shards as files, each mask as a .npy array."""
    (folder / "only_bg_t").mkdir(parents=True)
    (folder / "original").mkdir()
    bg_files, bg_labels = [], []
    for key, m in _members(shards["only_bg_t"]).items():
        path = folder / "only_bg_t" / f"{key}.JPEG"
        path.write_bytes(m["jpg"])
        bg_files.append(path)
        bg_labels.append(json.loads(m["json"])["in9_label"])
    fgs = []
    for key, m in _members(shards["original"]).items():
        path = folder / "original" / f"{key}.JPEG"
        path.write_bytes(m["jpg"])
        mask = np.asarray(Image.open(io.BytesIO(m["mask.png"]))) > 127
        np.save(folder / "original" / f"{key}.npy", mask.astype(np.uint8))
        fgs.append((key, path, folder / "original" / f"{key}.npy", json.loads(m["json"])["in9_label"]))
    return {"bg_files": bg_files, "bg_labels": bg_labels, "foregrounds": fgs}


def run_theirs(layout: dict[str, Any], network: torch.nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
               device: torch.device, workers: int, batch: int = 32) -> dict[str, Any]:
    """Their challenge loop: per foreground, the whole background DataLoader until one batch holds a miss."""
    from torchvision.transforms import functional as TF

    from pipeline.classes import in9_mapping

    map_to_in9 = {str(i): v for i, v in enumerate(in9_mapping())}  # their in_to_in9.json, as a dict of strings
    model = _Normalized(network, mean, std).to(device).eval()
    loader = torch.utils.data.DataLoader(_Folder(layout["bg_files"], layout["bg_labels"]), batch_size=batch,
                                         shuffle=False, num_workers=workers)
    vulnerable: set[str] = set()
    composites = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for key, image_path, mask_path, fg_class in layout["foregrounds"]:
            mask = np.tile(np.load(mask_path)[:, :, None], [1, 1, 3]).astype("uint8")
            mask_t = TF.to_tensor(Image.fromarray(mask * 255)).to(device)
            with Image.open(image_path) as im:
                img = TF.to_tensor(im.convert("RGB")).to(device)
            for inp, _ in loader:
                inp = inp.to(device)
                big_im, big_mask = img.repeat(inp.shape[0], 1, 1, 1), mask_t.repeat(inp.shape[0], 1, 1, 1)
                combined = inp * (1 - big_mask) + big_mask * big_im
                pred = model(combined).topk(1, 1, True, True)[1].cpu()[:, 0]
                pred = torch.LongTensor([map_to_in9[str(x)] for x in list(pred.numpy())])
                composites += inp.shape[0]
                if (pred != fg_class).any().item():
                    vulnerable.add(key)
                    break
    wall = time.perf_counter() - t0
    n = len(layout["foregrounds"])
    return {"wall_s": wall, "composites": composites, "foregrounds": n, "vulnerable": vulnerable,
            "challenge_accuracy": 100.0 * (n - len(vulnerable)) / n}


# ---------------------------------------------------------------- the run


def run_bench(n_foregrounds: int, n_backgrounds: int, size: int, model: str, batch: int, workers: int,
              threads: int | None = None) -> dict[str, Any]:
    from eval.device import build_models

    if threads:
        torch.set_num_threads(threads)
    with biased_model(model) as model_id, tempfile.TemporaryDirectory(prefix="bgcheck-challenge-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        shards = write_challenge_shards(root / "shards", n_foregrounds, n_backgrounds, size)
        layout = export_their_layout(shards, root / "theirs")
        setup_s = time.perf_counter() - t0
        ours = run_ours(shards, model_id, root / "ours", "cpu", "fp32", batch, channels_last=True)
        t0 = time.perf_counter()  # both sides' times include building the model
        built = build_models(model_id, torch.device("cpu"), random_weights=True)[0]  # the very same weights
        theirs = run_theirs(layout, built.module, built.mean, built.std, torch.device("cpu"), workers)
        theirs["wall_s"] = time.perf_counter() - t0
    same = ours["vulnerable"] == theirs["vulnerable"]
    speedup = theirs["wall_s"] / ours["wall_s"]
    for side in (ours, theirs):
        side["composites_per_s"] = side["composites"] / side["wall_s"]
    return {
        "model": model_id, "image_size": size, "foregrounds": n_foregrounds, "backgrounds": n_backgrounds,
        "torch_threads": torch.get_num_threads(), "their_loader_workers": workers, "our_batch_size": batch,
        "setup_s": round(setup_s, 2),
        "ours": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in ours.items() if k != "vulnerable"},
        "theirs": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in theirs.items() if k != "vulnerable"},
        "same_vulnerable_foregrounds": same,
        "speedup_end_to_end": round(speedup, 2),
        # The speedup is the product of these two: fewer composites (a foreground leaves at the composite that
        # fools it, not at the end of a batch of 32) and cheaper ones (no decode, uint8 compositing).
        "their_composites_over_ours": round(theirs["composites"] / ours["composites"], 2),
        "our_composites_per_s_over_theirs": round(ours["composites_per_s"] / theirs["composites_per_s"], 2),
        "target": {"speedup_at_least": TARGET_SPEEDUP, "pass": bool(speedup >= TARGET_SPEEDUP and same)},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.challenge_bench", description=__doc__.splitlines()[0])
    p.add_argument("--foregrounds", type=int, default=100)
    p.add_argument("--backgrounds", type=int, default=100)
    p.add_argument("--size", type=int, default=224, help="image size (the model's input size is used as is)")
    p.add_argument("--model", default=SMALL_MODEL, help=f"base architecture (registry id; default {SMALL_MODEL})")
    p.add_argument("--batch-size", type=int, default=32, help="our composites per forward pass (eval.challenge's "
                   "CPU default, 32)")
    p.add_argument("--workers", type=int, default=0, help="their DataLoader workers (theirs: 8; default 0 here)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="10 x 10 foregrounds x backgrounds (smoke run)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.quick:
        args.foregrounds, args.backgrounds = 10, 10
    if min(args.foregrounds, args.backgrounds, args.size, args.batch_size) < 1 or args.workers < 0:
        print("challenge_bench: error: sizes must be positive and --workers >= 0", file=sys.stderr)
        return 2
    results = run_bench(args.foregrounds, args.backgrounds, args.size, args.model, args.batch_size, args.workers,
                        args.threads)
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
