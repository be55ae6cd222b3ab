"""The evaluator against a peer: eval.score's predictions for a real model equal timm's own pipeline.

On ``original`` shards of the embedded demo, ``tf_efficientnet_lite0`` scored by ``eval.score``
(decode once, uint8 to the device, resize/normalise there) must predict what timm's eval transform
plus the same model predict when applied image by image to the very same framed JPEGs.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from builders import make_shards
from eval import score, zoo
from eval.predictions import predictions_path, read_predictions

MODEL = "tf_efficientnet_lite0"

pytestmark = pytest.mark.skipif(
    zoo.find_local_weights(MODEL) is None, reason=f"{MODEL} weights not installed ({zoo.LITE0_PACKAGE})"
)


def shard_samples(folder: Path) -> dict[str, tuple[bytes, int]]:
    """key -> (encoded image, label) for every sample in a variant folder's tars."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(folder.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                if ext in ("jpg", "cls"):
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return {key: (m["jpg"], int(m["cls"].decode("ascii"))) for key, m in samples.items()}


def timm_predictions(
    samples: dict[str, tuple[bytes, int]], crop_pct: float = 1.0
) -> dict[str, tuple[list[int], float]]:
    """key -> (top-5 classes, p_true) from timm's eval transform and the registry model, one image at a time."""
    import timm.data

    spec = zoo.resolve_models(MODEL)[0]
    # crop_pct=1.0: the shard frame already is the centre crop (resize 256, crop 224), so timm must
    # only resize to the input size (a no-op here) rather than crop a second time.
    transform = timm.data.create_transform(
        input_size=spec.input_size, interpolation=spec.interpolation, mean=spec.mean, std=spec.std, crop_pct=crop_pct
    )
    model = zoo.build_model(MODEL, device="cpu")
    out: dict[str, tuple[list[int], float]] = {}
    with torch.inference_mode():
        for key, (encoded, label) in samples.items():
            image = Image.open(io.BytesIO(encoded)).convert("RGB")
            logits = model(transform(image).unsqueeze(0))[0]
            probs = logits.softmax(0)
            out[key] = (logits.topk(5).indices.tolist(), float(probs[label]))
    return out


@pytest.fixture(scope="module")
def demo_original(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("peer")
    assert make_shards.main(["--variant", "original", "--out", str(root / "shards"), "--no-progress"]) == 0
    return root / "shards" / "original"


@pytest.fixture(scope="module")
def scored(demo_original, tmp_path_factory):
    """eval.score's predictions for the demo shards, and the samples they came from."""
    results = tmp_path_factory.mktemp("peer-results")
    rc = score.main([
        "--shards", str(demo_original), "--models", MODEL, "--out", str(results),
        "--device", "cpu", "--precision", "fp32", "--workers", "0", "--batch-size", "8",
    ])  # fmt: skip
    assert rc == 0
    return read_predictions(predictions_path(results, MODEL, "original")), shard_samples(demo_original)


def test_score_matches_timm_eval_pipeline(scored):
    ours, samples = scored
    peer = timm_predictions(samples)

    assert sorted(ours.keys.astype(str).tolist()) == sorted(peer) and len(peer) >= 4
    for i, key in enumerate(ours.keys.astype(str)):
        top5, p_true = peer[key]
        assert int(ours.label[i]) == samples[key][1], key
        assert int(ours.pred[i]) == top5[0], key
        assert set(ours.top5[i].tolist()) == set(top5), key
        assert float(ours.p_true[i]) == pytest.approx(p_true, abs=1e-3), key
    # The comparison has teeth: a real model on real photos gets some right and is confident on them.
    assert ours.correct.any() and np.max(ours.p_true) > 0.5


def test_comparison_detects_a_preprocessing_mismatch(scored):
    """Cropping the frame a second time (timm's default crop_pct) is caught by the same comparison."""
    ours, samples = scored
    peer = timm_predictions(samples, crop_pct=0.875)
    differs = [
        set(ours.top5[i].tolist()) != set(peer[key][0]) or abs(float(ours.p_true[i]) - peer[key][1]) > 1e-3
        for i, key in enumerate(ours.keys.astype(str))
    ]
    assert sum(differs) >= len(differs) // 2
