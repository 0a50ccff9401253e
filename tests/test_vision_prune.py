"""Pruning timm classifiers: default layer selection (Linear + 1x1 conv inside the stages/blocks, stem and
head dense), exact per-layer counts, conv layers on request, and sequential calibration through ConvNeXt
stages / ViT blocks matching the Wanda paper's image protocol."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import prunekit
from prunekit.graph import find_blocks, is_vision_model, select_layers, weight_matrix
from tests.conftest import fixture_path


def tiny_convnext(conv_mlp: bool = True, num_classes: int = 10, seed: int = 0) -> nn.Module:
    """convnext_atto's layout (1x1-conv MLPs when ``conv_mlp``, else Linear MLPs) with tiny widths, 32 px."""
    torch.manual_seed(seed)
    model = timm.create_model(
        "convnext_atto",
        depths=(1, 1, 2, 1),
        dims=(8, 16, 16, 24),
        conv_mlp=conv_mlp,
        num_classes=num_classes,
        pretrained=False,
    )
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, 32, 32), crop_pct=1.0, test_input_size=None)
    return model.eval()


def tiny_vit(num_classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=16,
        patch_size=4,
        depth=2,
        embed_dim=32,
        num_heads=2,
        num_classes=num_classes,
        pretrained=False,
    )
    return model.eval()


def images(n: int = 8, size: int = 32, seed: int = 1) -> list[torch.Tensor]:
    return list(torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)).split(4))


def mlp_names(model: nn.Module) -> set[str]:
    return {f"{n}.{fc}" for n, m in model.named_modules() if n.endswith(".mlp") for fc in ("fc1", "fc2")}


@pytest.mark.parametrize("conv_mlp", [True, False])
def test_convnext_default_selection_is_mlps_inside_stages(conv_mlp):
    model = tiny_convnext(conv_mlp)
    layers = select_layers(model)
    assert set(layers) == mlp_names(model) and len(layers) == 10  # 5 blocks x (fc1, fc2)
    kind = nn.Conv2d if conv_mlp else nn.Linear
    assert all(isinstance(m, kind) for m in layers.values())
    assert find_blocks(model)[0] == "stages"


def test_vit_default_selection_is_block_linears():
    model = tiny_vit()
    layers = select_layers(model)
    expected = {f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert set(layers) == expected
    assert "head" not in layers and "patch_embed.proj" not in layers
    assert find_blocks(model)[0] == "blocks"


def test_conv_layer_type_adds_depthwise_and_downsample_but_keeps_stem_and_head_dense():
    model = tiny_convnext()
    layers = select_layers(model, layer_types=("linear", "conv"))
    convs = set(layers) - mlp_names(model)
    assert {n for n in convs if n.endswith("conv_dw")} == {n for n, _ in model.named_modules() if n.endswith("conv_dw")}
    assert {"stages.1.downsample.1", "stages.2.downsample.1", "stages.3.downsample.1"} <= convs
    assert "stem.0" not in layers and "head.fc" not in layers
    assert "stem.0" in select_layers(model, include=["stem.0"])


@pytest.mark.parametrize(
    "make, size", [(lambda: tiny_convnext(True), 32), (lambda: tiny_convnext(False), 32), (tiny_vit, 16)]
)
def test_wanda_per_layer_exact_counts_and_other_layers_untouched(make, size):
    model = make()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = prunekit.prune(model, "wanda", 0.5, group="per-layer", calib=images(8, size))
    assert report.settings["blocks"] in ("stages", "blocks")
    selected = {f"{n}.weight" for n in report.layers}
    for name, row in report.layers.items():
        assert row["zeros"] == int(row["numel"] * 0.5), name
    for name, p in model.named_parameters():
        if name not in selected:
            assert torch.equal(p, before[name]), name


def test_conv_layers_pruned_per_layer_exactly():
    model = tiny_convnext()
    report = prunekit.prune(model, "wanda", 0.6, group="per-layer", calib=images(), layer_types=("linear", "conv"))
    dw = [n for n in report.layers if n.endswith("conv_dw")]
    assert dw and all(report.layers[n]["zeros"] == int(report.layers[n]["numel"] * 0.6) for n in report.layers)
    assert (model.stem[0].weight != 0).all() and (model.head.fc.weight != 0).all()


def test_per_output_group_prunes_each_row_exactly():
    model = tiny_vit()
    prunekit.prune(model, "wanda", 0.5, group="per-output", calib=images(8, 16))
    w = weight_matrix(model.blocks[1].mlp.fc2)
    assert ((w == 0).sum(dim=1) == w.shape[1] // 2).all()


def _reference_wanda(model: nn.Module, blocks: list[dict[str, nn.Module]], batches, sparsity: float) -> None:
    """The published image protocol written out: for each unit in order, run the whole model (earlier
    units already pruned), take ||X_j|| of each layer's input channels, prune |W|*||X|| per layer."""
    for layers in blocks:
        sq = {n: 0.0 for n in layers}

        def hook(name, sq=sq):
            def fn(module, args, out):
                x = args[0].float()
                x = x.transpose(1, -1) if isinstance(module, nn.Conv2d) else x  # channels last
                sq[name] = sq[name] + x.reshape(-1, x.shape[-1]).square().sum(0)

            return fn

        handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
        with torch.no_grad():
            for b in batches:
                model(b)
        for h in handles:
            h.remove()
        for n, m in layers.items():
            w = weight_matrix(m)
            score = (w.abs() * sq[n].sqrt()).reshape(-1)
            drop = torch.sort(score, stable=True).indices[: int(score.numel() * sparsity)]
            with torch.no_grad():
                w.reshape(-1)[drop] = 0  # weight_matrix is a view for Linear and 1x1 conv


@pytest.mark.parametrize("make, size", [(lambda: tiny_convnext(True), 32), (tiny_vit, 16)])
def test_sequential_engine_matches_the_published_unit_by_unit_protocol(make, size):
    model, reference = make(), make()
    batches = images(8, size)
    prunekit.prune(model, "wanda", 0.5, group="per-layer", calib=batches)
    prefix, units = find_blocks(reference)
    layers = select_layers(reference)
    per_unit = [{n: m for n, m in layers.items() if n.startswith(f"{prefix}.{i}.")} for i in range(len(units))]
    _reference_wanda(reference, per_unit, batches, 0.5)
    got, want = select_layers(model), select_layers(reference)
    for name in got:
        assert torch.equal(got[name].weight == 0, want[name].weight == 0), name


def test_vision_models_are_detected_and_llms_are_not():
    from tests.conftest import tiny_llama

    assert is_vision_model(tiny_convnext()) and is_vision_model(tiny_vit())
    assert is_vision_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2)))
    assert not is_vision_model(tiny_llama())
    assert not is_vision_model(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))


@pytest.mark.slow
def test_digits_convnext_wanda_per_layer_keeps_accuracy():
    """convnext-digits (convnext_atto: 1x1-conv MLPs) at 50%: 24 layers pruned, top-1 within 2 points
    (on every third validation image, to stay fast)."""
    from torch.utils.data import Subset

    from prunekit.data.images import data_config, image_calibration, image_dataset, image_transform
    from prunekit.eval.image import evaluate_image
    from prunekit.io.timm import load_vision_model

    model = load_vision_model(f"local-dir:{fixture_path('convnext-digits')}")
    val = image_dataset(fixture_path("digits", "val"), image_transform(data_config(model)))
    val = Subset(val, range(0, len(val), 3))
    dense = evaluate_image(model, val, batch_size=150, progress=False)["top1"]
    calib = image_calibration(model, fixture_path("digits", "train"), nsamples=64, batch_size=32, seed=0)
    report = prunekit.prune(model, "wanda", 0.5, group="per-layer", calib=calib)
    assert len(report.layers) == 24 and report.sparsity == pytest.approx(0.5, abs=1e-3)
    assert evaluate_image(model, val, batch_size=150, progress=False)["top1"] >= dense - 0.02


def test_user_flow_local_dir_model_and_image_folders(tmp_path):
    """What `prunekit prune --model local-dir:... --calib-data TRAIN --out OUT` then `prunekit eval image
    --model OUT --data VAL` run, through the functions the CLI calls."""
    import numpy as np
    from PIL import Image

    from prunekit.data.images import image_calibration
    from prunekit.eval.image import evaluate_image
    from prunekit.io import atomic_dir
    from prunekit.io.timm import load_vision_model, save_vision_model

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(3):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    tmp_path / split / f"c{c}" / f"{i}.png"
                )
    save_vision_model(tiny_convnext(num_classes=3), tmp_path / "dense")
    model = load_vision_model(f"local-dir:{tmp_path / 'dense'}")
    assert is_vision_model(model)
    calib = image_calibration(model, tmp_path / "train", nsamples=8, batch_size=4, seed=0)
    report = prunekit.prune(model, "wanda", 0.5, group="per-layer", calib=calib)
    with atomic_dir(tmp_path / "out") as tmp:
        save_vision_model(model, tmp)
    direct = evaluate_image(model, tmp_path / "val", batch_size=4, progress=False, accelerator="cpu")
    reloaded = evaluate_image(
        load_vision_model(tmp_path / "out"), tmp_path / "val", batch_size=5, progress=False, accelerator="cpu"
    )
    assert reloaded["images"] == 9 and reloaded["top1"] == direct["top1"] and "top5" not in reloaded
    assert reloaded["loss"] == pytest.approx(direct["loss"], rel=1e-5) and report.sparsity == pytest.approx(
        0.5, abs=1e-3
    )
