"""Vision model sources and saving: pruned timm models reload with timm's own ``local-dir:`` scheme."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn

import prunekit
from prunekit.errors import PrunekitError
from prunekit.io.timm import is_vision_source, load_vision_model, num_classes_of, save_vision_model
from tests.conftest import fixture_path
from tests.test_vision_prune import images, tiny_convnext, tiny_vit


def _outputs(model: nn.Module, size: int) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize(
    "make, size", [(lambda: tiny_convnext(True), 32), (lambda: tiny_convnext(False), 32), (tiny_vit, 16)]
)
def test_pruned_timm_model_round_trips_through_local_dir(tmp_path, make, size):
    model = make()
    prunekit.prune(model, "magnitude", 0.5)
    save_vision_model(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {"architecture", "num_classes", "pretrained_cfg"} <= set(config)
    assert (tmp_path / "out" / "model.safetensors").is_file()
    for reloaded in (
        timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval(),
        load_vision_model(tmp_path / "out"),
    ):
        assert type(reloaded) is type(model)
        state = reloaded.state_dict()
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        assert torch.allclose(_outputs(reloaded, size), _outputs(model, size), atol=1e-6)


def test_saved_timm_config_keeps_preprocessing(tmp_path):
    model = tiny_convnext()
    save_vision_model(model, tmp_path)
    reloaded = load_vision_model(f"local-dir:{tmp_path}")
    assert tuple(reloaded.pretrained_cfg["input_size"]) == (3, 32, 32)
    assert reloaded.pretrained_cfg["crop_pct"] == 1.0


def test_timm_registry_name_without_download():
    model = load_vision_model("timm:convnext_atto", pretrained=False, num_classes=7)
    assert num_classes_of(model) == 7 and not model.training


def test_num_classes_replaces_the_head_of_a_saved_model(tmp_path):
    save_vision_model(tiny_vit(), tmp_path)
    model = load_vision_model(tmp_path, num_classes=3)
    assert model.head.out_features == 3


def test_torchvision_model_round_trip_with_local_weights(tmp_path):
    model = load_vision_model("torchvision:resnet18", num_classes=4)
    with torch.no_grad():
        model.fc.weight.fill_(0.5)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    loaded = load_vision_model("torchvision:resnet18", num_classes=4, weights=tmp_path / "w.pth")
    assert torch.equal(loaded.fc.weight, model.fc.weight)
    save_vision_model(loaded, tmp_path / "out")
    assert is_vision_source(tmp_path / "out")
    again = load_vision_model(tmp_path / "out")
    assert torch.equal(again.fc.weight, model.fc.weight) and num_classes_of(again) == 4


def test_sources_are_recognised(tmp_path):
    for source in ("timm:resnet50.a1_in1k", "local-dir:/x", "hf-hub:timm/vit", "torchvision:resnet18"):
        assert is_vision_source(source)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert not is_vision_source(tmp_path)  # a Hugging Face checkpoint
    assert not is_vision_source(tmp_path / "missing") and not is_vision_source("meta-llama/Llama-2-7b-hf")


def test_fixture_directory_is_a_vision_source():
    assert is_vision_source(fixture_path("convnext-digits")) and is_vision_source(fixture_path("vit-digits"))
    assert not is_vision_source(fixture_path("kjv-llama-5m"))


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="torchvision has no model"):
        load_vision_model("torchvision:not_a_model")
    with pytest.raises(PrunekitError, match="timm model directory .* does not exist; give a directory"):
        load_vision_model(f"local-dir:{tmp_path / 'missing'}")
    with pytest.raises(PrunekitError, match="does not exist"):
        load_vision_model(tmp_path / "missing")
    with pytest.raises(PrunekitError, match="not a vision model"):
        load_vision_model(tmp_path)
    with pytest.raises(ValueError, match="weights= is for torchvision"):
        load_vision_model("timm:convnext_atto", weights="w.pth")
    with pytest.raises(ValueError, match="cannot save"):
        save_vision_model(nn.Linear(2, 2), tmp_path / "out")


def test_calibrated_prune_then_save_keeps_zeros(tmp_path):
    model = tiny_convnext()
    report = prunekit.prune(model, "wanda", 0.5, group="per-layer", calib=images())
    save_vision_model(model, tmp_path)
    reloaded = load_vision_model(tmp_path)
    layers = dict(reloaded.named_modules())
    for name, row in report.layers.items():
        assert int((layers[name].weight == 0).sum()) == row["zeros"]


class Custom:
    """A class a weights-only load refuses to unpickle."""


def test_torchvision_weights_files_fail_in_one_line(tmp_path):
    import torchvision

    state = torchvision.models.get_model("resnet18", weights=None, num_classes=3).state_dict()
    torch.save({"state": state, "extra": Custom()}, tmp_path / "pickled.pth")
    with pytest.raises(PrunekitError, match="pickled.pth' is not weights-only loadable .* re-save it as"):
        load_vision_model("torchvision:resnet18", num_classes=3, weights=tmp_path / "pickled.pth")
    torch.save(state, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(PrunekitError, match="cut.pth' is truncated or corrupt"):
        load_vision_model("torchvision:resnet18", num_classes=3, weights=tmp_path / "cut.pth")
    with pytest.raises(PrunekitError, match=r"ok.pth' does not fit torchvision:resnet18 \(.*size mismatch for fc"):
        load_vision_model("torchvision:resnet18", num_classes=5, weights=tmp_path / "ok.pth")
    torch.save({"state_dict": state}, tmp_path / "nested.pth")
    with pytest.raises(PrunekitError, match="holds a dict, not a state dict of tensors"):
        load_vision_model("torchvision:resnet18", num_classes=3, weights=tmp_path / "nested.pth")
    assert load_vision_model("torchvision:resnet18", num_classes=3, weights=tmp_path / "ok.pth").fc.out_features == 3


def test_local_path_of_sources(tmp_path):
    from prunekit.io.timm import local_path

    assert local_path(f"local-dir:{tmp_path}") == tmp_path and local_path(str(tmp_path)) == tmp_path
    assert local_path("timm:convnext_tiny.fb_in1k") is None and local_path("torchvision:resnet18") is None
