"""Ground truth for the whole chain: builder -> evaluator -> report on a world where the answer is known.

Four ImageNet classes (from four different ImageNet-9 superclasses) are drawn as a class-specific
shape (disc, square, triangle, cross) on a class-specific background hue. Two tiny CNNs are trained
here: ``fg`` on images whose *shape* carries the label (background hue drawn independently), ``bg``
on images whose *background* carries the label (shape drawn independently). Both are right on test
images where shape and background agree; only the variants can tell them apart. The real chain
(``builders.make_shards`` -> ``eval.score`` with TorchScript registry rows -> ``eval.report``) must
then report what we built in: ``bg`` reads the background (high background-only accuracy, large
mixed_rand drop, large BG-Gap), ``fg`` does not. Negative tests break the chain on purpose (labels
permuted against the pixels, variants or models swapped) and show the same check fails.
"""

from __future__ import annotations

import colorsys
import contextlib
import csv
import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.imagenet_tree import write_voc_xml
from builders import make_shards
from eval import report, score, zoo
from pipeline.classes import imagenet_classes, in9_mapping, in9_members

SOURCE_SIZE = 64  # generated images; the builder frames them with --resize 64 --size 56
FRAME = 56
SUPERCLASSES = (0, 2, 4, 7)  # Dog, Vehicle, Carnivore, Primate: one ImageNet class from each
LABELS = tuple(in9_members()[s][0] for s in SUPERCLASSES)
K = len(LABELS)
SHAPES = ("disc", "square", "triangle", "cross")  # shape of class c is SHAPES[c]
MEAN = STD = (0.5, 0.5, 0.5)
N_TEST = 64  # 16 per class: mixed_same always finds a partner
VARIANTS = ("original", "only_fg", "only_bg_b", "only_bg_t", "mixed_rand", "mixed_same")
SCORE_ARGS = ["--device", "cpu", "--precision", "fp32", "--workers", "0", "--batch-size", "64"]


# ---------------------------------------------------------------- the synthetic world (pure functions)


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int = SOURCE_SIZE) -> np.ndarray:
    """(size, size) bool mask of one class shape centred at (cx, cy) with radius ``r``."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xs - cx, ys - cy
    if shape == "disc":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if shape == "triangle":
        return (dy >= -r) & (dy <= 0.8 * r) & (np.abs(dx) <= 0.6 * (dy + r))
    if shape == "cross":
        return ((np.abs(dx) <= 0.3 * r) & (np.abs(dy) <= r)) | ((np.abs(dy) <= 0.3 * r) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def background_rgb(rng: np.random.Generator, bg_class: int) -> np.ndarray:
    """A saturated mid-brightness hue around 360 * c / K degrees: the background's class signal."""
    hue = (bg_class / K + rng.uniform(-0.04, 0.04)) % 1.0
    return np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 0.9), rng.uniform(0.55, 0.75))) * 255.0


def draw_image(
    rng: np.random.Generator, shape_class: int, bg_class: int
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """(64, 64, 3) uint8 image and the shape's half-open box (x0, y0, x1, y1).

    The shape is near-black or near-white so it contrasts with every background hue; it stays
    inside the central 56 x 56 frame the builder crops to.
    """
    img = np.empty((SOURCE_SIZE, SOURCE_SIZE, 3), np.float32)
    img[:] = background_rgb(rng, bg_class)
    img += rng.normal(0.0, 12.0, img.shape)
    r = rng.uniform(9.0, 14.0)
    cx, cy = rng.uniform(6 + r, SOURCE_SIZE - 6 - r, size=2)
    mask = shape_mask(SHAPES[shape_class], cx, cy, r)
    grey = rng.uniform(0, 50) if rng.random() < 0.5 else rng.uniform(205, 255)
    img[mask] = grey + rng.uniform(-15, 15, 3)
    ys, xs = np.nonzero(mask)
    return np.clip(img, 0, 255).astype(np.uint8), (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def classes_for(carrier: str, c: int, other: int) -> tuple[int, int]:
    """(shape class, background class) for label ``c``: the carrier follows the label, the rest is ``other``."""
    return {"fg": (c, other), "bg": (other, c), "both": (c, c)}[carrier]


def training_set(seed: int, n: int, carrier: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre 56 x 56 crops (uint8, N x 3 x 56 x 56) and ImageNet labels; the crop is the builder's frame."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    off = (SOURCE_SIZE - FRAME) // 2
    for i in range(n):
        c = i % K
        pixels, _ = draw_image(rng, *classes_for(carrier, c, int(rng.integers(K))))
        images.append(pixels[off : off + FRAME, off : off + FRAME])
        labels.append(LABELS[c])
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


class TinyCNN(torch.nn.Sequential):
    """Three conv blocks on a half-resolution input and a 1000-way ImageNet head."""

    def __init__(self) -> None:
        def block(c_in: int, c_out: int) -> list[torch.nn.Module]:
            return [torch.nn.Conv2d(c_in, c_out, 3, padding=1), torch.nn.BatchNorm2d(c_out), torch.nn.ReLU()]

        super().__init__(
            torch.nn.AvgPool2d(2),
            *block(3, 16), torch.nn.MaxPool2d(2),
            *block(16, 32), torch.nn.MaxPool2d(2),
            *block(32, 32), torch.nn.AdaptiveMaxPool2d(1),
            torch.nn.Flatten(), torch.nn.Linear(32, 1000),
        )  # fmt: skip


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> the input the registry row describes (mean/std 0.5), as the evaluator will feed it."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def train_model(carrier: str, seed: int, n: int = 640, epochs: int = 4) -> torch.nn.Module:
    """A TinyCNN trained with cross-entropy on the K labels; seeded, without touching global RNG state."""
    images, labels = training_set(seed, n, carrier)
    threads = torch.get_num_threads()
    # One thread: batches this small train several times faster than with threads contending.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            return _fit(images, labels, seed, epochs)
    finally:
        torch.set_num_threads(threads)


def _fit(images: torch.Tensor, labels: torch.Tensor, seed: int, epochs: int) -> torch.nn.Module:
    """Adam on mini-batches of 32 in a seeded order (call inside a forked RNG)."""
    torch.manual_seed(seed)
    model = TinyCNN()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(labels), generator=order)
        for start in range(0, len(labels), 32):
            idx = perm[start : start + 32]
            loss = torch.nn.functional.cross_entropy(model(normalise(images[idx])), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@contextlib.contextmanager
def _quiet_torchscript() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream, still supported
        yield


def registry_row(model_id: str, weights_file: str, params: int) -> dict:
    return {
        "id": model_id, "source": "torchscript", "arch": "tiny_cnn", "weights": f"ground-truth-{model_id}",
        "weights_file": weights_file, "input_size": FRAME, "interpolation": "bilinear", "crop_pct": 1.0,
        "mean": list(MEAN), "std": list(STD), "params": params, "train_images": 640,
        "train_data": f"synthetic shapes, label carried by the {model_id} only", "top1": None, "paper32": False,
    }  # fmt: skip


def write_registry(folder: Path, models: dict[str, torch.nn.Module]) -> Path:
    """TorchScript archives next to a registry that names them by relative path."""
    rows = []
    for model_id, model in models.items():
        with _quiet_torchscript():
            torch.jit.save(torch.jit.script(model), str(folder / f"{model_id}.pt"))
        rows.append(registry_row(model_id, f"{model_id}.pt", sum(p.numel() for p in model.parameters())))
    path = folder / "models.json"
    path.write_text(json.dumps({"format": zoo.FORMAT_VERSION, "note": "ground-truth models", "models": rows}))
    return path


def write_val_tree(root: Path, n: int, seed: int, xml_class_shift: int = 0) -> tuple[Path, Path]:
    """ImageNet-val-shaped tree of test images whose shape and background both carry the label.

    ``xml_class_shift`` != 0 writes the wnid of class (c + shift) mod K into the XML of an image
    drawn as class c: labels permuted against the pixels, to prove the test notices.
    """
    wnids = imagenet_classes().wnids
    images, boxes = root / "val", root / "bbox_val"
    images.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        c = i % K
        key = f"ILSVRC2012_val_{i + 1:08d}"
        pixels, (x0, y0, x1, y1) = draw_image(rng, *classes_for("both", c, c))
        Image.fromarray(pixels, "RGB").save(images / f"{key}.JPEG", format="JPEG", quality=95)
        wnid = wnids[LABELS[(c + xml_class_shift) % K]]
        # VOC corners are 1-based inclusive.
        write_voc_xml(boxes / f"{key}.xml", key, (SOURCE_SIZE, SOURCE_SIZE), [(wnid, (x0 + 1, y0 + 1, x1, y1))])
    return images, boxes


# ---------------------------------------------------------------- running the real chain


def run_chain(root: Path, images: Path, boxes: Path, registry: Path, models: str, variants=VARIANTS) -> dict:
    """make_shards -> eval.score -> eval.report, all in-process; returns the report summary."""
    shards, results = root / "shards", root / "results"
    build = ["--source", "imagenet-val", "--images", str(images), "--annotations", str(boxes)]
    for v in variants:
        build += ["--variant", v]
    build += ["--out", str(shards), "--size", str(FRAME), "--resize", str(SOURCE_SIZE), "--seed", "0", "--no-progress"]
    assert make_shards.main(build) == 0
    args = [a for v in variants for a in ("--shards", str(shards / v))]
    with _quiet_torchscript():
        rc = score.main([*args, "--registry", str(registry), "--models", models, "--out", str(results), *SCORE_ARGS])
    assert rc == 0
    return report.build_report(results, root / "report", n_boot=200, seed=0, models_json=registry)


def read_metrics_csv(report_dir: Path) -> dict[tuple[str, str, str], float]:
    """(model, metric, variant) -> value for ImageNet-1k rows of metrics.csv without a category or class."""
    with open(report_dir / "metrics.csv", newline="", encoding="utf-8") as fh:
        return {
            (r["model"], r["metric"], r["variant"]): float(r["value"])
            for r in csv.DictReader(fh)
            if r["label_space"] == "in1k" and r["value"] != "" and not r["category"] and not r["class"]
        }


def check_ground_truth(report_dir: Path) -> dict[str, dict[str, float]]:
    """Assert that the report says what the world was built to say; returns the numbers it read.

    Chance in the report is 1/1000 (ImageNet-1k); with only K classes present the meaningful
    chance is 1/K, so background-only accuracy is also checked against that.
    """
    doc = json.loads((report_dir / "metrics.json").read_text(encoding="utf-8"))
    table = read_metrics_csv(report_dir)
    spaces = doc["label_spaces"]["in1k"]
    seen: dict[str, dict[str, float]] = {}
    for model in ("fg", "bg"):
        mm = spaces[model]
        nums = {
            "clean": mm["accuracy"]["original"]["value"],
            "only_bg_b": mm["influence"]["only_bg_b"]["acc"]["value"],
            "only_bg_t": mm["influence"]["only_bg_t"]["acc"]["value"],
            "drop_mixed_rand": mm["invariance"]["mixed_rand"]["drop"],
            "bg_gap": mm["bg_gap"]["value"],
            "chance": mm["influence"]["only_bg_t"]["chance"],
            "bg_class_mixed_rand": mm["background_class"]["mixed_rand"]["value"],
        }
        seen[model] = nums
        # metrics.csv and metrics.json are two views of one computation.
        assert table[(model, "accuracy", "original")] == pytest.approx(nums["clean"])
        assert table[(model, "accuracy", "only_bg_t")] == pytest.approx(nums["only_bg_t"])
        assert table[(model, "influence_above_chance", "only_bg_t")] == pytest.approx(nums["only_bg_t"] - 1 / 1000)
        assert table[(model, "invariance_drop", "mixed_rand")] == pytest.approx(nums["drop_mixed_rand"])
        assert table[(model, "bg_gap", "")] == pytest.approx(nums["bg_gap"])
        assert table[(model, "background_class_rate", "mixed_rand")] == pytest.approx(nums["bg_class_mixed_rand"])
        assert nums["chance"] == pytest.approx(1 / 1000) == doc["chance"]["in1k"]
        assert nums["clean"] > 0.85, (model, nums)
    bg, fg = seen["bg"], seen["fg"]
    for variant in ("only_bg_b", "only_bg_t"):
        assert bg[variant] > 0.6 and bg[variant] > 1 / K + 0.3, ("bg reads the background", variant, bg)
        assert fg[variant] < 0.45, ("fg ignores the background", variant, fg)
    assert bg["drop_mixed_rand"] > 0.3, ("bg falls on a random background", bg)
    assert fg["drop_mixed_rand"] < 0.15, ("fg survives a random background", fg)
    assert bg["bg_gap"] > 0.3, ("bg gains from a same-class background", bg)
    assert abs(fg["bg_gap"]) < 0.15, ("fg does not care whose background", fg)
    # A random partner is of the label's own class about 1/K of the time (21 of 64 here), and then fg, right
    # on the foreground, answers the background's class too: its rate sits near that share, not near 0.
    assert bg["bg_class_mixed_rand"] > 0.5, ("bg answers the background's class on mixed_rand", bg)
    assert fg["bg_class_mixed_rand"] < 0.45, ("fg answers the foreground's class on mixed_rand", fg)
    assert bg["bg_class_mixed_rand"] > fg["bg_class_mixed_rand"] + 0.25, ("bg follows the background more", bg, fg)
    return seen


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Both models trained and exported, the test tree written, the full chain run once."""
    root = tmp_path_factory.mktemp("ground-truth")
    models = {"fg": train_model("fg", seed=1), "bg": train_model("bg", seed=2)}
    zoo_dir = root / "zoo"
    zoo_dir.mkdir()
    registry = write_registry(zoo_dir, models)
    images, boxes = write_val_tree(root / "imagenet", N_TEST, seed=3)
    summary = run_chain(root / "run", images, boxes, registry, "fg,bg")
    return {"root": root, "models": models, "registry": registry, "summary": summary, "report": root / "run" / "report"}


# ---------------------------------------------------------------- tests


def test_labels_are_four_superclasses():
    supers = [in9_mapping()[label] for label in LABELS]
    assert sorted(supers) == sorted(SUPERCLASSES) and len(set(LABELS)) == K


def test_models_learned_their_carrier(world):
    """Sanity on the raw models, before any chain: each is right only when its carrier holds the label."""
    for carrier, model in world["models"].items():
        for probe in ("fg", "bg"):
            images, labels = training_set(seed=50, n=80, carrier=probe)
            with torch.no_grad():
                acc = (model(normalise(images)).argmax(1) == labels).float().mean().item()
            assert (acc > 0.9) if probe == carrier else (acc < 0.45), (carrier, probe, acc)


def test_report_recovers_the_built_in_reliance(world):
    seen = check_ground_truth(world["report"])
    assert seen["bg"]["bg_gap"] > seen["fg"]["bg_gap"]
    assert world["summary"]["metadata"]["bg"]["weights"] == "ground-truth-bg"


@pytest.mark.parametrize(
    "swap",
    [("predictions/fg", "predictions/bg"), ("predictions/bg/mixed_same.csv", "predictions/bg/mixed_rand.csv")],
    ids=["models-swapped", "mixed-variants-swapped"],
)
def test_check_fails_when_models_or_variants_are_swapped(world, tmp_path, swap):
    results = tmp_path / "results"
    shutil.copytree(world["root"] / "run" / "results", results)
    a, b = results / swap[0], results / swap[1]
    a.rename(tmp_path / "swap-tmp")
    b.rename(a)
    (tmp_path / "swap-tmp").rename(b)
    report.build_report(results, tmp_path / "report", n_boot=0, models_json=world["registry"])
    with pytest.raises(AssertionError):
        check_ground_truth(tmp_path / "report")


def test_check_fails_when_labels_are_permuted(world, tmp_path, monkeypatch):
    """XML labels shifted by one class against the pixels: the fg model's clean accuracy collapses."""
    monkeypatch.setenv("BGCHECK_CACHE", str(tmp_path / "cache"))
    images, boxes = write_val_tree(tmp_path / "imagenet", N_TEST, seed=3, xml_class_shift=1)
    run_chain(tmp_path / "run", images, boxes, world["registry"], "fg,bg")
    fg_clean = read_metrics_csv(tmp_path / "run" / "report")[("fg", "accuracy", "original")]
    assert fg_clean < 0.15
    with pytest.raises(AssertionError):
        check_ground_truth(tmp_path / "run" / "report")


def test_torchscript_rows_resolve_relative_to_their_registry(world, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(world["registry"].parent, moved)
    spec = zoo.resolve_models("bg", zoo.load_registry(moved / "models.json"))[0]
    assert Path(spec.weights_file) == (moved / "bg.pt").resolve()
    assert zoo.find_local_weights(spec) == Path(spec.weights_file)
    with _quiet_torchscript():
        model = zoo.build_model(spec)
    x = normalise(training_set(seed=60, n=8, carrier="both")[0])
    with torch.no_grad():
        torch.testing.assert_close(model(x), world["models"]["bg"](x))
    (moved / "bg.pt").unlink()
    with pytest.raises(zoo.WeightsUnavailable, match="bg.pt"):
        zoo.build_model(spec)


def test_score_registry_option_errors_are_one_line(world, tmp_path, capsys):
    shards = str(world["root"] / "run" / "shards" / "original")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    for registry in (tmp_path / "missing.json", broken):
        rc = score.main(["--shards", shards, "--registry", str(registry), "--models", "fg", *SCORE_ARGS,
                         "--out", str(tmp_path / "r")])  # fmt: skip
        assert rc == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and registry.name in err
