import copy

import pytest
import torch
from torch import nn

import prunekit
from prunekit.errors import PrunekitError
from tests.conftest import tiny_llama
from tests.reference import reference_wanda


def test_sequential_matters_and_oneshot_runs(token_batch):
    seq, one = tiny_llama(), tiny_llama()
    prunekit.prune(seq, "wanda", 0.6, calib=token_batch)
    prunekit.prune(one, "wanda", 0.6, calib=token_batch, sequential=False)
    w_seq = seq.model.layers[1].mlp.down_proj.weight
    w_one = one.model.layers[1].mlp.down_proj.weight
    assert not torch.equal(w_seq == 0, w_one == 0)  # block 1 sees the pruned block 0's outputs
    assert torch.equal(
        seq.model.layers[0].self_attn.q_proj.weight == 0, one.model.layers[0].self_attn.q_proj.weight == 0
    )  # block 0 sees the same inputs


def test_report_contents(token_batch):
    model = tiny_llama()
    report = prunekit.prune(model, "wanda", 0.5, calib=token_batch)
    assert report.sparsity == pytest.approx(0.5)
    assert set(report.layers) == set(prunekit.select_layers(model))
    assert report.settings["group"] == "per-output" and report.settings["blocks"] == "model.layers"
    assert report.timings["total_s"] > 0 and "torch" in report.versions
    assert model.lm_head.weight.ne(0).all()  # head dense


def test_global_group_and_per_input():
    model = tiny_llama()
    report = prunekit.prune(model, "magnitude", 0.5, group="global")
    total = sum(r["numel"] for r in report.layers.values())
    assert sum(r["zeros"] for r in report.layers.values()) == total // 2
    model = tiny_llama()
    prunekit.prune(model, "wanda", 0.5, group="per-input", calib=torch.randint(0, 128, (2, 8)))
    w = model.model.layers[0].self_attn.q_proj.weight
    assert ((w == 0).sum(0) == w.shape[0] // 2).all()


def test_bf16_model():
    model = tiny_llama().to(torch.bfloat16)
    report = prunekit.prune(model, "wanda", 0.5, calib=torch.randint(0, 128, (2, 8)))
    assert report.sparsity == pytest.approx(0.5)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


def test_plain_sequential_model_and_conv_groups():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=4, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 1),
        nn.Flatten(),
        nn.LazyLinear(4),
    )
    model(torch.randn(1, 3, 8, 8))
    batches = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    report = prunekit.prune(model, "wanda", 0.5, group="per-output", calib=batches, layer_types=["all"])
    assert set(report.layers) == {"2", "4"}  # stem and head dense
    w = model[2].weight.reshape(8, -1)
    assert ((w == 0).sum(1) == w.shape[1] // 2).all()


def test_dataloader_of_dicts(token_batch):
    loader = torch.utils.data.DataLoader([{"input_ids": t} for t in token_batch], batch_size=4)
    model = tiny_llama()
    assert prunekit.prune(model, "wanda", 0.5, calib=loader).sparsity == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sparsity=1.0), r"sparsity must be in \[0, 1\)"),
        (dict(sparsity=-0.1), r"sparsity must be in \[0, 1\)"),
        (dict(pattern="2:6"), "multiple of 6"),
        (dict(pattern="4:4"), "0 < N < M"),
        (dict(method="nope"), "unknown method 'nope'"),
        (dict(group="rows"), "unknown comparison group"),
        (dict(include=["nothing.*"]), "no prunable layers"),
        (dict(method_params={"alpha": 1}), "has no parameter"),
        (dict(calib=None), "needs calibration data"),
    ],
)
def test_bad_inputs_fail_before_any_change(kwargs, match):
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    args = dict(method="wanda", sparsity=0.5, calib=torch.randint(0, 128, (2, 8)))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        prunekit.prune(model, **args)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_nan_activations_error():
    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[5] = float("nan")
    with pytest.raises(PrunekitError, match="NaN/inf"):
        prunekit.prune(model, "wanda", 0.5, calib=torch.full((1, 8), 5))


def test_explicit_device_path_gives_same_result(token_batch):
    """The onload/offload path (block on --device, the rest where it was) must not change the result."""
    a, b = tiny_llama(), tiny_llama()
    prunekit.prune(a, "wanda", 0.5, calib=token_batch)
    prunekit.prune(b, "wanda", 0.5, calib=token_batch, device="cpu")
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in b.modules())  # no hook outlives its use


def test_nm_error_names_every_layer_it_does_not_divide():
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4))
    message = r"multiple of 4; these are not: 2 \(6 columns\), 4 \(10 columns\); exclude them"
    with pytest.raises(ValueError, match=message):
        prunekit.prune(model, "magnitude", pattern="2:4", include=["*"])


def test_blocks_after_the_last_pruned_one_are_not_run():
    """The last pruned block's outputs feed nothing, and later blocks are neither pruned nor run; earlier blocks
    run twice (statistics on the dense block, then the pruned one), as published."""
    model, calls = tiny_llama(layers=3), {0: 0, 1: 0, 2: 0}
    for i, block in enumerate(model.model.layers):
        block.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
    original, reference = copy.deepcopy(model.state_dict()), copy.deepcopy(model)
    calib = torch.randint(0, 128, (4, 8))
    prunekit.prune(model, "wanda", 0.5, calib=calib, batch_size=2, exclude=["model.layers.2.*"])
    # 2 batches, one pass each over block 1, plus the one-sample probe for per-block arguments; block 2 never
    assert calls[1] == 3 and calls[2] == 0
    assert calls[0] >= 4
    reference_wanda(reference, calib, 0.5)  # prunes every block; blocks 0 and 1 do not depend on block 2
    pruned, expected = model.state_dict(), reference.state_dict()
    for name, value in pruned.items():
        assert torch.equal(value, original[name] if name.startswith("model.layers.2.") else expected[name]), name


# ---------------------------------------------------------------- front-end defects (issue 16) and API input checks


def test_allocation_dense_pass_runs_in_eval_mode(token_batch):
    """Defect 5: OWL's dense pass ran before model.eval(), with dropout on; every forward is in eval mode now."""
    model = tiny_llama(layers=2)
    modes = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda m, a: modes.append(m.training))
    model.train()
    prunekit.prune(model, "wanda", 0.5, calib=token_batch, allocation="owl")
    assert modes and not any(modes) and model.training


def test_magnitude_with_explicit_allocation_needs_no_calibration():
    """Defect 5: magnitude + explicit failed with "this method needs calibration data"."""
    model = tiny_llama(layers=2)
    report = prunekit.prune(
        model,
        "magnitude",
        0.5,
        allocation="explicit",
        allocation_params={"sparsities": {"model.layers.0.*": 0.25, "*": 0.75}},
    )
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)
    assert {round(row["sparsity"], 2) for row in report.layers.values()} == {0.25, 0.75}


@pytest.mark.parametrize(
    "calib, message", [(torch.rand(2, 8), "integer ids"), (torch.full((2, 8), 500), "vocabulary has 128")]
)
def test_bad_token_ids_are_one_clear_error(calib, message):
    with pytest.raises(PrunekitError, match=message):
        prunekit.prune(tiny_llama(), "wanda", 0.5, calib=calib)


def test_meta_model_and_nan_weights_are_refused():
    with torch.device("meta"):
        meta = tiny_llama()
    with pytest.raises(PrunekitError, match="meta device"):
        prunekit.prune(meta, "magnitude", 0.5)
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(PrunekitError, match="NaN/inf weights"):
        prunekit.prune(model, "magnitude", 0.5)


def test_seqlen_defaults_to_the_context_and_longer_is_an_error(tmp_path):
    from prunekit.api import resolve_seqlen

    model = tiny_llama()  # max_position_embeddings 128
    assert resolve_seqlen(None, model) == 128 and resolve_seqlen(64, model) == 64
    assert resolve_seqlen(None, torch.nn.Linear(2, 2)) == 2048
    with pytest.raises(PrunekitError, match="longer than the model's context of 128"):
        resolve_seqlen(256, model)


def test_pruning_an_already_sparser_model_says_so(caplog):
    model = tiny_llama()
    prunekit.prune(model, "magnitude", 0.7)
    with caplog.at_level("WARNING", logger="prunekit.api"):
        prunekit.prune(model, "magnitude", 0.5)
    assert "already hold more zeros" in caplog.text


def test_blocks_override_names_the_block_list(token_batch):
    model = tiny_llama()
    plan = prunekit.plan_prune(model, "wanda", blocks="model.layers")
    assert [prefix for prefix, _ in plan.stacks] == ["model.layers"]
    with pytest.raises(PrunekitError, match="candidates: model.layers"):
        prunekit.plan_prune(model, "wanda", blocks="model.decoder")


def test_save_and_load_pick_the_format(tmp_path):
    model = tiny_llama()
    prunekit.prune(model, "magnitude", 0.5)
    prunekit.save(model, tmp_path / "m")
    again = prunekit.load(tmp_path / "m")
    ids = torch.randint(0, 128, (1, 8))
    assert torch.equal(again(ids).logits, model(ids).logits)


@pytest.mark.parametrize("name", ["t5", "bert", "llava"])
def test_load_returns_the_class_the_config_names(name, tmp_path):
    """``prunekit.load`` once loaded every Hugging Face checkpoint as a causal LM."""
    from tests.zoo import build

    model = build(name)
    prunekit.save(model, tmp_path)
    assert type(prunekit.load(tmp_path)) is type(model)


# ---------------------------------------------------------------- issue 27: families beyond the LLaMA shape


def test_packed_patches_are_probed_whole():
    """Qwen2.5-VL packs every image's patches into one tensor: the one-sample probe cut image_grid_thw to one row but
    not the patches ("shape '[256, -1]' is invalid"). Such a batch is probed whole; batches of 2 prune."""
    from prunekit.forward import first_sample
    from tests import zoo

    batch = zoo.batch("qwen2_5_vl", zoo.token_ids(2))
    assert first_sample(batch) is batch
    assert first_sample({"input_ids": batch["input_ids"]})["input_ids"].shape[0] == 1
    prunekit.prune(zoo.build("qwen2_5_vl"), "wanda", 0.5, calib=[batch])


@pytest.mark.parametrize(
    "name, layer", [("siglip", "vision_model.head.attention.out_proj"), ("jamba", "model.layers.0.mamba.dt_proj")]
)
def test_layers_the_model_never_calls_stay_dense_with_their_reason(name, layer, caplog):
    """nn.MultiheadAttention reads out_proj's weight itself, Jamba's Mamba mixer dt_proj's: no calibration input
    reaches them. They were refused as "saw no input during calibration: is it used in forward()?"; they stay dense,
    reported, and naming one with --include says what happens and the fix."""
    from prunekit.errors import PrunekitError
    from tests import zoo

    model, calib = zoo.build(name), [zoo.batch(name, zoo.token_ids())]
    report = prunekit.prune(model, "wanda", 0.5, calib=calib)
    assert layer not in report.layers and layer in report.coverage["never_called"]
    assert float((model.get_submodule(layer).weight == 0).float().mean()) == 0
    assert "reads its weight directly" in caplog.text
    with pytest.raises(
        PrunekitError, match=f"layer '{layer}' is never called: .* reads its weight directly .*--exclude"
    ):
        prunekit.prune(zoo.build(name), "wanda", 0.5, calib=calib, include=[layer])
    prunekit.prune(zoo.build(name), "magnitude", 0.5, include=[layer])  # no calibration needed: pruned


def test_the_called_layers_probe_is_one_forward_pass(monkeypatch):
    """The probe for layers no calibration input reaches ran the model once per selected layer (28 passes on a
    4-block LLaMA: a third of a Wanda prune's time); it is one pass, on one sample."""
    from prunekit import engine

    calls = []
    real = engine.called_layers
    monkeypatch.setattr(engine, "called_layers", lambda *args: calls.append(1) or real(*args))
    model = tiny_llama()
    plan = prunekit.api.plan_prune(model, "wanda")
    assert len(plan.layers) > 1
    assert engine.uncalled(model, plan, [torch.randint(0, 100, (4, 16))]) == {} and calls == [1]
