"""BatchNorm recalibration after pruning.

Pruning a conv shifts the distribution of everything downstream, but BatchNorm layers keep normalising
with the running mean/variance of the dense model. Re-estimating those statistics on a few hundred
calibration images (no gradients, no weight change) recovers much of the lost accuracy for free.

The new statistics are the exact pooled moments over every calibration pixel: mean and unbiased
variance per channel, accumulated in float64 from the BatchNorm inputs. (PyTorch's own ``momentum=None``
cumulative average averages per-batch variances, which drops the spread between batch means and
weights a short last batch like a full one.) During the pass the BatchNorm layers run in train mode,
as they would in training, so later layers see batch-normalised inputs; everything else stays in
eval mode (Dropout off, stochastic depth off). Their momentum is 0 for the pass, so PyTorch's own
running update is a no-op and a BatchNorm the data never reaches keeps its statistics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .distributed import active, sum_over_ranks, together
from .errors import PrunekitError
from .forward import Batch, eval_mode, hooks, on_device, run_model

log = logging.getLogger(__name__)

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batchnorm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every BatchNorm that keeps running statistics (``track_running_stats=False`` ones always use
    batch statistics, so there is nothing to recalibrate)."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, BN_TYPES) and m.track_running_stats and m.running_mean is not None
    }


class _Moments:
    """Per-channel count, sum and sum of squares of a BatchNorm's input, in float64."""

    def __init__(self) -> None:
        self.count, self.sum, self.sq_sum = 0, None, None

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().double().transpose(0, 1).reshape(module.num_features, -1)  # [C, pixels]
        if self.sum is None:
            self.sum, self.sq_sum = torch.zeros_like(x[:, 0]), torch.zeros_like(x[:, 0])
        self.count += x.shape[1]
        self.sum += x.sum(dim=1)
        self.sq_sum += x.square().sum(dim=1)

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and unbiased variance (BatchNorm's ``running_var`` convention)."""
        mean = self.sum / self.count
        var = (self.sq_sum - self.count * mean.square()) / max(self.count - 1, 1)
        return mean, var.clamp_min(0)


def _summary(layers: dict[str, nn.Module]) -> dict[str, dict[str, float]]:
    """Channel-averaged running mean and variance of each layer: enough to see the shift in a report."""
    return {
        name: {"mean": float(m.running_mean.float().mean()), "var": float(m.running_var.float().mean())}
        for name, m in layers.items()
    }


@contextmanager
def _batchnorm_train_mode(model: nn.Module, layers: dict[str, nn.Module]):
    """The model in eval mode except ``layers`` (train mode, momentum 0: running statistics frozen);
    modes and momenta are restored on exit, also when the forward pass raises."""
    momenta = {m: m.momentum for m in layers.values()}
    with eval_mode(model):
        for m in layers.values():
            m.train()
            m.momentum = 0.0
        try:
            yield
        finally:
            for m, momentum in momenta.items():
                m.momentum = momentum


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module, batches: Sequence[Batch], device: str | torch.device | None = None
) -> dict[str, Any]:
    """Re-estimate every BatchNorm's running mean/variance on ``batches`` (model inputs, as for
    ``prunekit.prune``). Weights and affine parameters are untouched. Returns before/after summaries.
    A model without BatchNorm is left alone (no forward pass)."""
    layers = batchnorm_layers(model)
    result: dict[str, Any] = {"layers": len(layers), "batches": len(batches), "before": _summary(layers)}
    if not layers:
        return {**result, "after": {}}
    if not batches:
        raise PrunekitError(
            "BatchNorm recalibration needs calibration batches (calib=...); pass recalibrate_bn=False to skip it"
        )
    moments = _input_moments(model, layers, batches, torch.device(device) if device is not None else None)
    _write_statistics(layers, moments)
    result["after"] = _summary(layers)
    log.info("recalibrated %d BatchNorm layers on %d batches", len(layers), len(batches))
    return result


def _input_moments(
    model: nn.Module, layers: dict[str, nn.Module], batches: Sequence[Batch], device: torch.device | None
) -> dict[str, _Moments]:
    """Run ``batches`` with the BatchNorm layers in train mode and record the moments of their inputs."""
    moments = {name: _Moments() for name in layers}
    with (
        together(),
        hooks(m.register_forward_pre_hook(moments[name]) for name, m in layers.items()),
        on_device(model, device),
        _batchnorm_train_mode(model, layers),
    ):
        for batch in batches:
            run_model(model, batch, device)
    _sum_moments(layers, moments)
    return moments


def _sum_moments(layers: dict[str, nn.Module], moments: dict[str, _Moments]) -> None:
    """Every rank's moments summed (each saw its own calibration batches); a no-op in one process."""
    if not active():
        return
    parts = []
    for name, m in layers.items():
        mo = moments[name]
        if mo.sum is None:  # no input on this rank: zeros of the layer's width
            mo.sum = torch.zeros(m.num_features, dtype=torch.float64, device=m.running_mean.device)
            mo.sq_sum = torch.zeros_like(mo.sum)
        parts += [mo.sum, mo.sq_sum]
    counts = torch.tensor([moments[name].count for name in layers], dtype=torch.float64)
    sum_over_ranks(*parts, counts)
    for name, count in zip(layers, counts.tolist()):
        moments[name].count = int(count)


def _write_statistics(layers: dict[str, nn.Module], moments: dict[str, _Moments]) -> None:
    for name, m in layers.items():
        if moments[name].count == 0:
            log.warning("BatchNorm %r saw no calibration input (not on the forward path?); kept its statistics", name)
            continue
        mean, var = moments[name].mean_var()
        m.running_mean.copy_(mean.to(m.running_mean))
        m.running_var.copy_(var.to(m.running_var))


def execution_order(model: nn.Module, example: Batch, device: str | torch.device | None = None) -> list[str]:
    """Names of the modules in the order their forward runs on ``example`` (one eval-mode pass, so no
    BatchNorm statistic changes); a module called twice appears twice."""
    order: list[str] = []
    device = torch.device(device) if device is not None else None
    with (
        hooks(
            m.register_forward_pre_hook(lambda mod, args, name=name: order.append(name))
            for name, m in model.named_modules()
            if name
        ),
        torch.no_grad(),
        on_device(model, device),
        eval_mode(model),
    ):
        run_model(model, example, device)
    return order


def needs_bn_recalibration(
    model: nn.Module,
    pruned_layer_names: Iterable[str],
    example: Batch | None = None,
    device: str | torch.device | None = None,
) -> bool:
    """True when a BatchNorm with running statistics runs after a pruned layer, so its input
    distribution changed. "After" is the execution order of one forward pass on ``example`` when given
    (robust to models whose modules are registered out of order), else the registration order."""
    layers = batchnorm_layers(model)
    pruned = set(pruned_layer_names)
    if not layers or not pruned:
        return False
    order = execution_order(model, example, device) if example is not None else [n for n, _ in model.named_modules()]
    first = next((i for i, name in enumerate(order) if name in pruned), None)
    return first is not None and any(name in layers for name in order[first + 1 :])
