"""Smoke test of the evaluator benchmark: every measurement runs and every ratio is reported.

Speed targets are not asserted here (they depend on the machine); the
benchmark itself prints PASS/MISS. Also pins the two CPU fast paths the
benchmark relies on to the reference results they replace.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from bench.eval_bench import TARGETS, format_table, main, run_bench
from eval.decode import decode_image, jpeg_frame_size
from eval.device import ScoredModel
from pipeline.decode import MAX_IMAGE_PIXELS


def test_bench_reports_every_ratio(tmp_path):
    results = run_bench(n=16, batch=8, repeats=1, cache=tmp_path / "cache", worker_settings=(0, 1))
    results = json.loads(json.dumps(results))  # what --json writes
    assert set(results["targets"]) == set(TARGETS)
    for name, row in results["targets"].items():
        assert math.isfinite(row["value"]) and row["value"] > 0, name
        assert isinstance(row["pass"], bool)
    assert results["n_images"] > 0
    assert set(results["forward_only_best"]) == set(results["models"]) | {results["primary_model"]}
    assert all(v > 0 for v in results["forward_only_best"].values())
    assert set(results["decode_pass_images_per_s"]) == {"0", "1"}
    assert results["pipeline_defaults"] in results["pipeline"]
    assert len(results["pipeline"]) >= 4 and len(results["k_pass"]) == 2
    for row in (*results["pipeline"].values(), *results["k_pass"].values()):
        assert math.isfinite(row["ratio_wall"]) and row["ratio_wall"] > 0
    for row in results["k_pass"].values():
        assert row["images"] == results["n_images"]
        assert row["budget_s"] == pytest.approx(sum(row["forward_only_s"].values()) + row["decode_pass_s"])
    table = format_table(results)
    assert all(name in table for name in TARGETS) and ("PASS" in table or "MISS" in table)


def test_cli_rejects_bad_input(capsys):
    assert main(["--n", "2"]) == 2
    assert main(["--models", "no_such_model"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("eval_bench: error:") for line in lines)


def _jpeg(image: Image.Image, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", **options)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["444", "420", "progressive", "grey", "cmyk"])
def test_fast_jpeg_decode_equals_pil(kind):
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    data = {
        "444": lambda: _jpeg(rgb, quality=95, subsampling=0),
        "420": lambda: _jpeg(rgb, quality=80),
        "progressive": lambda: _jpeg(rgb, progressive=True),
        "grey": lambda: _jpeg(rgb.convert("L")),
        "cmyk": lambda: _jpeg(rgb.convert("CMYK")),
    }[kind]()
    assert jpeg_frame_size(data) == (53, 37, {"grey": 1, "cmyk": 4}.get(kind, 3))
    with Image.open(io.BytesIO(data)) as image:
        reference = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    decoded = decode_image(data)
    assert decoded.dtype == torch.uint8 and torch.equal(decoded, reference)


def test_jpeg_header_size_check_still_refuses_bombs(monkeypatch):
    from eval import decode

    decoded = []
    real = decode._decode_jpeg_libjpeg
    monkeypatch.setattr(decode, "_decode_jpeg_libjpeg", lambda data: decoded.append(1) or real(data))
    data = bytearray(_jpeg(Image.new("RGB", (8, 8)), quality=90))
    width, height, _ = jpeg_frame_size(bytes(data))
    sof = bytes(data).index(b"\xff\xc0")
    side = int(math.isqrt(MAX_IMAGE_PIXELS)) + 1
    data[sof + 5 : sof + 9] = side.to_bytes(2, "big") + side.to_bytes(2, "big")
    assert (width, height) == (8, 8) and jpeg_frame_size(bytes(data))[:2] == (side, side)
    with pytest.raises(ValueError, match="decompression_bomb"):
        decode_image(bytes(data))
    assert decoded == []  # refused from the header, never handed to the decoder
    assert jpeg_frame_size(b"\x89PNG\r\n") is None and jpeg_frame_size(b"\xff\xd8\xff\xd9") is None


@pytest.mark.parametrize("channels_last", [True, False])
def test_preprocess_fast_paths_equal_plain_normalise(channels_last):
    model = ScoredModel(
        id="m", module=torch.nn.Identity(), size=(24, 20), interpolation="bicubic", mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225), weights="random", device=torch.device("cpu"), dtype=torch.float32,
        channels_last=channels_last,
    )  # fmt: skip
    hwc = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (3, 24, 20, 3), dtype=np.uint8))
    reference = (hwc.permute(0, 3, 1, 2).float() - model._mean) / model._std
    for images in (hwc.permute(0, 3, 1, 2), hwc.permute(0, 3, 1, 2).contiguous()):  # stream layout, and NCHW
        x = model.preprocess(images)
        assert torch.equal(x, reference)
        assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
