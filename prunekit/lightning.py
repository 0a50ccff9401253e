"""``PruningCallback``: prune while fine-tuning with Lightning, once or gradually (Zhu & Gupta 2017).

Masks live in the callback, never in the model: pruned weights are zeroed in place, gradients of pruned
weights are zeroed before each optimizer step, and the weights are zeroed again after every step (AdamW's
moment estimates would otherwise revive them). The masks travel in the callback's checkpoint state as packed
bits, so the model's state dict keeps its original keys at every moment and the final model is plain weights.

Statistics for methods that need them (Wanda, SparseGPT, ...) come from ``prunekit.collect`` hooks attached
only while ``calib_batches`` batches run through the live model (no gradients, eval mode) at the event: the
training batches seen just before it (kept only during that window), or, for an event at fit start, the first
batches of the train dataloader. Under DDP the statistics are summed over ranks and each rank prunes its share of
the layers, whose pruned weights are then broadcast (``prunekit.distributed``, as for ``prunekit.prune`` under
torchrun), so every rank holds the same masks.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Any

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from . import engine
from .api import layer_sparsity, plan_prune
from .collect import LayerStats
from .config import PruneConfig, refuse_unused
from .distill.settings import Distillation
from .errors import PrunekitError
from .forward import eval_mode, target_module
from .graph import select_layers
from .masks import apply_masks, mask_gradients, masks_from_weights, pack_mask, unpack_mask
from .schedule import CALLBACK_CALIBRATION, CALLBACK_USES, FIXED_USES, Schedule

log = logging.getLogger(__name__)

_STATE_VERSION = 2  # 2: masks packed most significant bit first (prunekit.masks, as the compact format)


# ---------------------------------------------------------------- calibration batches


def forward_batch(module: nn.Module, batch: Any) -> Any:
    """Default calibration forward: ``module(**batch)`` for dicts, ``module(batch[0])`` for ``(inputs, target)``.

    A LightningModule needs only ``training_step``; one without its own ``forward`` is calibrated through
    ``training_step(batch, 0)`` (under ``no_grad``, in eval mode: only the layers' inputs matter)."""
    if isinstance(module, L.LightningModule) and not has_forward(module):
        return module.training_step(batch, 0)
    if isinstance(batch, Mapping):
        return module(**batch)
    if isinstance(batch, (tuple, list)):
        return module(batch[0])
    return module(batch)


def has_forward(module: nn.Module) -> bool:
    """Whether ``module`` defines ``forward`` (the base classes' versions only raise NotImplementedError)."""
    return type(module).forward not in (nn.Module.forward, L.LightningModule.forward)


def _own_iterator(loader: Iterable) -> Iterator:
    """Batches from a loader without touching the training loop's iterator (persistent workers reuse it).
    With several train loaders (a dict or list), the first one calibrates."""
    if isinstance(loader, Mapping):
        loader = next(iter(loader.values()))
    elif isinstance(loader, (list, tuple)) and loader and isinstance(loader[0], DataLoader):
        loader = loader[0]
    if isinstance(loader, DataLoader) and isinstance(loader.dataset, IterableDataset):
        loader = DataLoader(loader.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn)
    elif isinstance(loader, DataLoader) and loader.batch_sampler is not None:
        loader = DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, collate_fn=loader.collate_fn)
    return iter(loader)


# ---------------------------------------------------------------- the callback


class PruningCallback(L.Callback):
    """Prune the selected layers of ``pl_module.model`` (or ``submodule``) during ``trainer.fit``.

    ``schedule`` (a ``Schedule``, or its name with its fields as keywords: ``start_step``, ``end_step``,
    ``every_n_steps``, ``initial_sparsity``, ``calib_batches``): ``"oneshot"`` prunes to ``sparsity`` at
    ``start_step`` (default: fit start); ``"cubic"`` raises sparsity from ``initial_sparsity`` at ``start_step`` to
    ``sparsity`` at ``end_step``, re-scoring every ``every_n_steps``; ``"fixed"`` keeps the zeros the model already
    has (pruned before ``fit``). ``config`` (a ``PruneConfig`` or a method name) and any of its settings as keywords
    mean what they mean in ``prunekit.prune``; settings the callback cannot honour (``CALLBACK_USES``) are refused.
    ``forward_fn(pl_module, batch)`` runs a calibration batch (default ``forward_batch``: the module's ``forward``,
    else its ``training_step``).
    """

    def __init__(
        self,
        config: PruneConfig | str | None = None,
        sparsity: float | None = None,
        pattern: str | None = None,
        group: str | None = None,
        schedule: Schedule | str = "oneshot",
        *,
        submodule: str | None = None,
        mask_gradients: bool = True,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        **settings: Any,
    ):
        _refuse_distillation(settings)
        self.schedule = _schedule(schedule, settings)
        self.config = PruneConfig.of(config, sparsity=sparsity, pattern=pattern, group=group, **settings)
        if self.config.structured and self.schedule.schedule != "fixed":
            raise PrunekitError(
                f"structured method {self.config.method!r} changes the model's shapes, which cannot "
                "happen inside training; prune first (prunekit.prune), then fine-tune with "
                "schedule='fixed'"
            )
        _check_used(self.config, self.schedule)
        self.schedule.check_target(self.config.sparsity, self.config.pattern)
        self.settings = dict(
            method=self.config.method,
            sparsity=self.config.sparsity,
            pattern=self.config.pattern,
            group=self.config.group,
            **{k: v for k, v in dataclasses.asdict(self.schedule).items() if k != "calib_batches"},
        )
        self.events = self.schedule.events(self.config.sparsity)
        calib_batches = self.schedule.calib_batches
        self.calib_batches, self.submodule = calib_batches, submodule
        self.mask_grads, self.forward_fn = mask_gradients, forward_fn or forward_batch
        self.masks: dict[str, torch.Tensor] = {}
        self.history: list[dict[str, Any]] = []
        self._done, self._plan, self._layers, self._pending = 0, None, None, None
        self._recent: deque = deque(maxlen=calib_batches)  # training batches of the window before an event
        self._handles: list = []
        self._to_log: float | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            **{k: self.settings[k] for k in ("method", "sparsity", "schedule")}, submodule=self.submodule
        )

    @property
    def layers(self) -> dict[str, nn.Module]:
        if self._layers is None:
            raise PrunekitError("PruningCallback has not been set up yet: pass it to a Trainer and call fit()")
        return self._layers

    def sparsity(self) -> float:
        """Current fraction of zeros over the selected layers."""
        return layer_sparsity(self.layers)[1]

    # -------------------------------------------------------- Lightning hooks

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self._layers is not None:
            return
        target = target_module(pl_module, self.submodule)  # everything is checked before any training step
        if self.events:  # one pass over the live model per event, not block by block
            self._plan = plan_prune(target, replace(self.config, sequential=False))
            self._layers = dict(self._plan.layers)
        else:  # "fixed": hold the zeros the model has; no method runs (a structured method already did)
            self._layers = select_layers(target, self.config.include, self.config.exclude, self.config.layer_types)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_or_fix_masks()
        self._handles = [opt.register_step_post_hook(self._after_step) for opt in trainer.optimizers]
        if self.events and trainer.max_steps >= 0 and self.events[-1][0] > trainer.max_steps:
            log.warning(
                "the pruning schedule ends at step %d, after max_steps=%d: the target sparsity %.3f will "
                "not be reached; lower end_step",
                self.events[-1][0],
                trainer.max_steps,
                self.events[-1][1],
            )
        if self._due(trainer.global_step):
            self._prune(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._due(trainer.global_step):
            self._prune(trainer, pl_module)
        if self._in_window(trainer):
            self._recent.append(batch)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._to_log is not None:
            pl_module.log("pruning/sparsity", self._to_log, on_step=True, on_epoch=False)
            self._to_log = None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if self.mask_grads:
            mask_gradients(self.layers, self.masks)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._due(trainer.global_step):  # the last event may fall on the final step (end_step == max_steps)
            self._prune(trainer, pl_module)
        self._recent.clear()
        if self._done < len(self.events):
            log.warning(
                "training ended at step %d before the pruning schedule finished: sparsity %.4f, target %.4f",
                trainer.global_step,
                self.sparsity(),
                self.settings["sparsity"],
            )
        apply_masks(self.layers, self.masks)
        self._remove_hooks()
        log.info("fine-tuning ended with %.2f%% sparsity over %d layers", 100 * self.sparsity(), len(self.masks))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._recent.clear()
        self._remove_hooks()

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "settings": dict(self.settings),
            "events_done": self._done,
            "history": list(self.history),
            "masks": {n: pack_mask(m) for n, m in self.masks.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != _STATE_VERSION:
            raise PrunekitError(
                f"PruningCallback state version {state_dict.get('version')!r} is not supported "
                f"(expected {_STATE_VERSION}); resume with the prunekit version that wrote it"
            )
        if state_dict["settings"] != self.settings:
            log.warning(
                "resuming with different pruning settings: checkpoint %s, now %s", state_dict["settings"], self.settings
            )
        self._pending = state_dict

    # -------------------------------------------------------- internals

    def _after_step(self, optimizer, args, kwargs) -> None:
        apply_masks(self.layers, self.masks)

    def _restore_or_fix_masks(self) -> None:
        if self._pending is not None:
            state, self._pending = self._pending, None
            unknown = set(state["masks"]) - set(self.layers)
            if unknown:
                raise PrunekitError(
                    f"checkpoint has masks for layers this model does not select: {sorted(unknown)[:5]}"
                )
            self.masks = {n: unpack_mask(p).to(self.layers[n].weight.device) for n, p in state["masks"].items()}
            self._done, self.history = state["events_done"], list(state["history"])
        elif self.schedule.schedule == "fixed" and not self.masks:
            self.masks = masks_from_weights(self.layers)
        apply_masks(self.layers, self.masks)

    def _due(self, step: int) -> bool:
        return self._done < len(self.events) and self.events[self._done][0] <= step

    def _needs_stats(self) -> bool:
        return self._plan is not None and bool(self._plan.needs)

    def _in_window(self, trainer: L.Trainer) -> bool:
        """Whether this batch is among the last ``calib_batches`` before the next event (rounded up to steps)."""
        if self._done >= len(self.events) or not self._needs_stats():
            return False
        steps = math.ceil(self.calib_batches / max(trainer.accumulate_grad_batches, 1))
        return trainer.global_step >= self.events[self._done][0] - steps

    def _calibration_batches(self, trainer: L.Trainer) -> Iterable:
        if self._recent:
            return list(self._recent)
        loader = trainer.train_dataloader  # an event at fit start (or right at a resume): no recent batches
        if loader is None:
            raise PrunekitError("PruningCallback needs calibration batches but the trainer has no train dataloader")
        return (trainer.strategy.batch_to_device(b) for _, b in zip(range(self.calib_batches), _own_iterator(loader)))

    @torch.no_grad()
    def _statistics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, LayerStats] | None:
        """Input statistics of the selected layers over the calibration batches, summed over ranks."""
        if not self._needs_stats():
            return None
        batches = self._calibration_batches(trainer)
        with (
            engine.plan_collect(self.layers, self._plan) as stats,
            eval_mode(pl_module),
            trainer.precision_plugin.forward_context(),
        ):
            for batch in batches:
                self._forward(pl_module, batch)
        self._recent.clear()
        return engine.reduce_statistics(self.layers, {n: stats[n] for n in stats}, self._plan)

    def _prune(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        while self._due(trainer.global_step):  # several events can be due after a resume: the last one counts
            step, target = self.events[self._done]
            self._done += 1
        stats = self._statistics(trainer, pl_module)
        plan = replace(self._plan, targets={n: replace(t, sparsity=target) for n, t in self._plan.targets.items()})
        engine.prune_layers(plan.layers, stats, plan)  # each rank its share of the layers, then broadcast
        self.masks = masks_from_weights(plan.layers)
        samples = next(iter(stats.values())).nsamples if stats else 0
        self._record(trainer.global_step, step, target, samples)

    def _forward(self, pl_module: L.LightningModule, batch: Any) -> None:
        try:
            self.forward_fn(pl_module, batch)
        except NotImplementedError as err:
            raise PrunekitError(
                f"PruningCallback could not run a calibration batch through "
                f"{type(pl_module).__name__} ({err}); define forward() or training_step(), or pass "
                "forward_fn=lambda module, batch: ..."
            ) from None

    def _record(self, global_step: int, step: int, target: float, samples: int) -> None:
        achieved = self.sparsity()
        self.history.append(
            {"step": global_step, "event_step": step, "target": target, "sparsity": achieved, "calib_samples": samples}
        )
        self._to_log = achieved
        log.info("step %d: pruned to %.4f sparsity (target %.4f)", global_step, achieved, target)

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _schedule(schedule: Schedule | str, settings: dict[str, Any]) -> Schedule:
    """The ``Schedule`` from a ``Schedule`` or a name plus its fields, taken out of ``settings``."""
    names = {f.name for f in dataclasses.fields(Schedule)}
    timing = {k: settings.pop(k) for k in list(settings) if k in names}
    if isinstance(schedule, Schedule):
        if timing:
            raise PrunekitError(f"pass the schedule's settings {sorted(timing)} inside the Schedule, not beside it")
        return schedule
    return Schedule(schedule=schedule, **timing)


def _refuse_distillation(settings: dict[str, Any]) -> None:
    given = sorted(set(settings) & {f.name for f in dataclasses.fields(Distillation)})
    if given:
        raise PrunekitError(
            f"PruningCallback does not distil ({', '.join(given)}): pass those settings to "
            "prunekit.distill.DistillationCallback beside it"
        )


def _check_used(config: PruneConfig, schedule: Schedule) -> None:
    if schedule.schedule == "fixed":
        refuse_unused(
            config, FIXED_USES, "PruningCallback(schedule='fixed')", "it holds the zeros the model already has"
        )
        return
    refuse_unused(config, CALLBACK_USES, "PruningCallback", CALLBACK_CALIBRATION)
