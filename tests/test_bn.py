"""BatchNorm recalibration: exact pooled statistics, nothing else changes, modes restored."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.bn import batchnorm_layers, execution_order, needs_bn_recalibration, recalibrate_bn


def _randomise_bn(bn: nn.Module, seed: int) -> None:
    """Non-trivial affine parameters and stale running statistics, so a reset is visible."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=gen))
        bn.running_mean.fill_(3.0)
        bn.running_var.fill_(7.0)


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Conv2d(4, 5, 3, padding=1),
        nn.BatchNorm2d(5, momentum=0.3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
    )
    _randomise_bn(model[1], 1)
    _randomise_bn(model[5], 2)
    return model.eval()


def batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(n, 3, 7, 6, generator=gen) * 2 + 1 for n in (4, 4, 3)]  # a short last batch


def pooled(inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance per channel over every pixel of every batch."""
    x = torch.cat([t.double().transpose(0, 1).reshape(t.shape[1], -1) for t in inputs], dim=1)
    return x.mean(dim=1), x.var(dim=1, unbiased=True)


def train_mode_bn(x: torch.Tensor, bn: nn.Module) -> torch.Tensor:
    """BatchNorm as training computes it: this batch's mean and biased variance."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    w, b = bn.weight.view(1, -1, 1, 1), bn.bias.view(1, -1, 1, 1)
    return (x - mean) / torch.sqrt(var + bn.eps) * w + b


@torch.no_grad()
def expected_statistics(model: nn.Sequential, data: list[torch.Tensor]):
    """Direct computation: bn1 sees conv1(x); bn2 sees conv2 of bn1 (batch statistics) -> ReLU, Dropout off."""
    h1 = [model[0](x) for x in data]
    h2 = [model[4](torch.relu(train_mode_bn(h, model[1]))) for h in h1]
    return pooled(h1), pooled(h2)


def test_recalibration_equals_pooled_statistics_over_all_pixels():
    model, data = small_cnn(), batches()
    (m1, v1), (m2, v2) = expected_statistics(model, data)
    recalibrate_bn(model, data)
    for bn, mean, var in ((model[1], m1, v1), (model[5], m2, v2)):
        torch.testing.assert_close(bn.running_mean, mean.float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bn.running_var, var.float(), atol=1e-5, rtol=1e-5)


def test_recalibration_does_not_depend_on_how_the_images_are_batched():
    a, b = small_cnn(), small_cnn()
    data = torch.cat(batches())
    recalibrate_bn(a, [data[:5], data[5:]])
    recalibrate_bn(b, [data[:2], data[2:4], data[4:]])
    torch.testing.assert_close(a[1].running_var, b[1].running_var, atol=1e-5, rtol=1e-5)


def test_recalibration_changes_no_weight_and_restores_modes_and_momenta():
    model = small_cnn()
    params = {k: v.clone() for k, v in model.named_parameters()}
    model.train()
    model[3].eval()  # a mixed-mode model comes back mixed
    result = recalibrate_bn(model, batches())
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k]), k
        assert v.grad is None
    assert [m.training for m in model] == [True, True, True, False] + [True] * 6
    assert (model[1].momentum, model[5].momentum) == (0.1, 0.3)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert result["layers"] == 2 and result["batches"] == 3
    assert result["before"]["1"] == {"mean": 3.0, "var": 7.0}
    assert result["after"]["1"]["mean"] == pytest.approx(float(model[1].running_mean.mean()))


def test_dropout_stays_off_during_recalibration():
    """With Dropout in train mode bn2 would see a different input distribution on every call."""
    model = small_cnn()
    recalibrate_bn(model, batches())
    first = model[5].running_var.clone()
    recalibrate_bn(model, batches())
    assert torch.equal(model[5].running_var, first)


@pytest.mark.parametrize(
    "bn, shape",
    [
        (lambda: nn.BatchNorm1d(4), (6, 4)),
        (lambda: nn.BatchNorm1d(4), (6, 4, 5)),
        (lambda: nn.BatchNorm3d(4), (3, 4, 2, 3, 2)),
        (lambda: nn.SyncBatchNorm(4), (3, 4, 5, 2)),
    ],
    ids=["bn1d-features", "bn1d-sequence", "bn3d", "syncbn"],
)
def test_every_batchnorm_kind(bn, shape):
    layer = bn()
    _randomise_bn(layer, 0)
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(*shape, generator=gen) * 3 - 1 for _ in range(3)]
    model = nn.Sequential(layer).eval()
    recalibrate_bn(model, data)
    mean, var = pooled(data)
    torch.testing.assert_close(layer.running_mean, mean.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.running_var, var.float(), atol=1e-5, rtol=1e-5)
    assert not layer.training


def test_timm_batchnorm_act_subclass_is_recalibrated():
    from timm.layers import BatchNormAct2d

    layer = BatchNormAct2d(4, act_layer=nn.ReLU)
    _randomise_bn(layer, 0)
    data = [torch.randn(2, 4, 3, 3) + 2 for _ in range(2)]
    recalibrate_bn(nn.Sequential(layer), data)
    torch.testing.assert_close(layer.running_mean, pooled(data)[0].float(), atol=1e-5, rtol=1e-5)


def test_batchnorm_off_the_forward_path_keeps_its_statistics(caplog):
    class WithAuxiliary(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.unused = small_cnn(), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.net(x)

    model = WithAuxiliary()
    _randomise_bn(model.unused, 5)
    with caplog.at_level("WARNING", logger="prunekit.bn"):
        recalibrate_bn(model, batches())
    assert "'unused' saw no calibration input" in caplog.text
    assert torch.equal(model.unused.running_mean, torch.full((4,), 3.0))
    assert float(model.net[1].running_mean.mean()) != 3.0


def test_batchnorm_without_running_statistics_is_skipped():
    model = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False), nn.BatchNorm2d(3)).eval()
    assert list(batchnorm_layers(model)) == ["1"]
    assert recalibrate_bn(model, batches())["layers"] == 1


def test_model_without_batchnorm_is_untouched_and_not_run():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm([4, 5, 4]), nn.Dropout(0.5)).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    result = recalibrate_bn(model, batches())
    assert calls == [] and result == {"layers": 0, "batches": 3, "before": {}, "after": {}}
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not needs_bn_recalibration(model, ["0"], example=batches()[0])


def test_recalibration_without_batches_is_an_error():
    with pytest.raises(ValueError, match="calibration batches"):
        recalibrate_bn(small_cnn(), [])


def test_dict_and_tuple_batches_and_device():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = small_cnn()

        def forward(self, pixel_values):
            return self.net(pixel_values)

    a, b = Keyword(), small_cnn()
    data = batches()
    recalibrate_bn(a, [{"pixel_values": x} for x in data], device="cpu")
    recalibrate_bn(b, [(x,) for x in data])
    torch.testing.assert_close(a.net[5].running_var, b[5].running_var)


# ---------------------------------------------------------------- when is recalibration needed


class RegisteredBackwards(nn.Module):
    """BatchNorm registered before the conv that feeds it: registration order misleads, execution does not."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_needs_recalibration_when_a_pruned_layer_runs_before_a_batchnorm():
    model, x = small_cnn(), batches()[0]
    assert needs_bn_recalibration(model, ["0"])
    assert needs_bn_recalibration(model, ["4"], example=x)
    assert not needs_bn_recalibration(model, ["9"], example=x)  # only the classifier, after every BN
    assert not needs_bn_recalibration(model, [], example=x)
    assert needs_bn_recalibration(RegisteredBackwards(), ["conv"], example=x)


def test_execution_trace_changes_no_statistics_and_restores_modes():
    model = small_cnn().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    order = execution_order(model, batches()[0])
    assert order == [str(i) for i in range(10)]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules())


def test_magnitude_without_calibration_data_warns_that_batchnorm_is_stale(caplog):
    import prunekit

    model = small_cnn()
    with caplog.at_level("WARNING", logger="prunekit.api"):
        report = prunekit.prune(model, "magnitude", 0.5, layer_types=["all"], include=["0", "4"])
    assert report.bn_recalibration is None and "statistics cannot be re-estimated" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="prunekit.api"):
        prunekit.prune(small_cnn(), "magnitude", 0.5, layer_types=["all"], include=["0", "4"], recalibrate_bn=False)
    assert "BatchNorm" not in caplog.text
