"""PruningCallback: schedules, masks through AdamW + bf16 autocast, checkpoint resume, final state dict, DDP."""

from __future__ import annotations

import math
import pickle

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prunekit.collect import collect
from prunekit.distributed import reduce_stats
from prunekit.errors import PrunekitError
from prunekit.lightning import PruningCallback, _own_iterator
from prunekit.masks import pack_mask, unpack_mask
from prunekit.methods import METHODS
from prunekit.schedule import Schedule, cubic_sparsity


class TinyMLP(L.LightningModule):
    """16 -> 64 -> 32 -> 4; the layers pruned by default are model.0 (1024 weights) and model.2 (2048)."""

    def __init__(self, lr: float = 1e-2, weight_decay: float = 0.1, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
        self.lr, self.weight_decay = lr, weight_decay

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def loader(n: int = 256, batch_size: int = 16, seed: int = 0, shuffle: bool = True) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 16, generator=gen), torch.randint(0, 4, (n,), generator=gen))
    if not shuffle:
        return DataLoader(data, batch_size=batch_size)
    return DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


def trainer(max_steps: int, callbacks: list, **kwargs) -> L.Trainer:
    opts = dict(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    opts.update(kwargs)
    return L.Trainer(callbacks=callbacks, **opts)


def zeros_fraction(module: TinyMLP, names=("0", "2")) -> float:
    weights = [module.model.get_submodule(n).weight for n in names]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


class Spy(L.Callback):
    """Records, after the pruning callback, the sparsity each step starts with and checks masks after steps."""

    def __init__(self, pruning: PruningCallback):
        self.pruning, self.start_sparsity, self.violations, self.restored = pruning, {}, 0, None

    def on_train_start(self, trainer, pl_module):
        self.restored = {n: m.clone() for n, m in self.pruning.masks.items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start_sparsity[trainer.global_step] = zeros_fraction(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for name, mask in self.pruning.masks.items():
            self.violations += int((pl_module.model.get_submodule(name).weight[~mask] != 0).sum())


# ---------------------------------------------------------------- pure parts


def test_cubic_schedule_formula_and_exact_end():
    assert cubic_sparsity(0, 0.8, 0.0, 0, 100) == 0.0
    assert cubic_sparsity(50, 0.8, 0.0, 0, 100) == pytest.approx(0.8 * (1 - 0.5**3))
    assert cubic_sparsity(100, 0.8, 0.0, 0, 100) == 0.8
    assert cubic_sparsity(250, 0.8, 0.1, 0, 100) == 0.8
    events = Schedule("cubic", start_step=10, end_step=95, every_n_steps=20).events(0.7)
    assert [t for t, _ in events] == [30, 50, 70, 90, 95]  # step 10 has sparsity 0: no event
    assert events[-1][1] == 0.7 and all(a[1] < b[1] for a, b in zip(events, events[1:]))
    assert Schedule("oneshot", start_step=3).events(0.5) == [(3, 0.5)]


@pytest.mark.parametrize("shape", [(5, 3), (64, 16), (1, 1), (7, 9, 3)])
def test_pack_unpack_roundtrip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_mask(mask)
    assert packed["bits"].dtype == torch.uint8 and packed["bits"].numel() == math.ceil(mask.numel() / 8)
    assert torch.equal(unpack_mask(packed), mask)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(schedule="linear"),
        dict(schedule="cubic", end_step=None),
        dict(schedule="cubic", end_step=10, pattern="2:4"),
        dict(sparsity=1.0),
        dict(schedule="cubic", end_step=10, initial_sparsity=0.6),
        dict(schedule="cubic", end_step=10, every_n_steps=0),
        dict(schedule="oneshot", calib_batches="4"),
    ],
)
def test_bad_settings_fail_early(kwargs):
    with pytest.raises(PrunekitError):
        PruningCallback(**{"sparsity": 0.5, **kwargs})


@pytest.mark.parametrize(
    "setting",
    [
        dict(allocation="owl"),
        dict(nsamples=7),
        dict(offload_activations="disk"),
        dict(recalibrate_bn=True),
        dict(device="cpu"),
        dict(seqlen=64),
    ],
)
def test_settings_the_callback_cannot_honour_are_refused(setting):
    """Issue 28 item 1: these were accepted and silently ignored (every layer got the same target, no sample
    count, no offload, no BatchNorm recalibration)."""
    name = next(iter(setting))
    with pytest.raises(PrunekitError, match="--" + name.replace("_", "-")) as err:
        PruningCallback("wanda", 0.5, **setting)
    assert "\n" not in str(err.value)


def test_a_fixed_schedule_refuses_pruning_settings_it_would_ignore():
    with pytest.raises(PrunekitError, match="--sparsity"):
        PruningCallback("wanda", 0.7, schedule="fixed")
    PruningCallback(schedule="fixed", exclude=["0"])  # which layers hold zeros: used


def test_calibration_never_touches_the_training_iterator():
    """With persistent workers ``iter(loader)`` would reset the iterator the training loop is reading."""
    data = TensorDataset(torch.arange(32.0).view(16, 2))
    persistent = DataLoader(data, batch_size=4, num_workers=1, persistent_workers=True)
    first = next(_own_iterator(persistent))[0]
    assert persistent._iterator is None and torch.equal(first, data.tensors[0][:4])
    assert torch.equal(next(_own_iterator({"a": persistent, "b": None}))[0], first)


# ---------------------------------------------------------------- training


def test_masks_hold_through_adamw_weight_decay_and_bf16_autocast():
    module = TinyMLP(lr=1e-2, weight_decay=0.1)
    pruning = PruningCallback(method="wanda", sparsity=0.5, schedule="oneshot", calib_batches=2)
    spy = Spy(pruning)
    before = module.model[0].weight.detach().clone()
    trainer(8, [pruning, spy], precision="bf16-mixed").fit(module, loader())
    assert spy.start_sparsity[0] == 0.5 and all(s == 0.5 for s in spy.start_sparsity.values())
    assert spy.violations == 0 and zeros_fraction(module) == 0.5
    kept = pruning.masks["0"]
    assert not torch.equal(module.model[0].weight[kept], before[kept])  # it did train


def test_without_enforcement_adamw_revives_pruned_weights():
    """The control for the test above: zeroing once before training is not enough with AdamW."""
    module = TinyMLP(lr=1e-2, weight_decay=0.1)
    with torch.no_grad():
        module.model[0].weight[:, :8] = 0
    trainer(8, [], precision="bf16-mixed").fit(module, loader())
    assert zeros_fraction(module, ("0",)) < 0.5


def test_cubic_reaches_exactly_the_target_at_end_step():
    module = TinyMLP()
    pruning = PruningCallback(
        method="magnitude", sparsity=0.75, schedule="cubic", start_step=0, end_step=8, every_n_steps=3, calib_batches=2
    )
    spy = Spy(pruning)
    trainer(11, [pruning, spy]).fit(module, loader())
    expected = {t: s for t, s in pruning.events}
    assert [t for t, _ in pruning.events] == [3, 6, 8]
    for t in range(11):
        last = max([e for e in expected if e <= t], default=None)
        target = expected[last] if last is not None else 0.0
        assert spy.start_sparsity[t] == pytest.approx(target, abs=1 / 1024)  # floor per layer
    assert spy.start_sparsity[8] == 0.75 and zeros_fraction(module) == 0.75
    assert spy.violations == 0


def test_last_event_on_the_final_step_is_applied():
    module = TinyMLP()
    pruning = PruningCallback(
        method="wanda", sparsity=0.5, schedule="cubic", end_step=6, every_n_steps=2, calib_batches=2
    )
    trainer(6, [pruning]).fit(module, loader())
    assert pruning.history[-1]["event_step"] == 6 and zeros_fraction(module) == 0.5


def test_fixed_schedule_keeps_existing_zeros():
    module = TinyMLP()
    with torch.no_grad():
        module.model[2].weight[::2] = 0
    pruning = PruningCallback(method="magnitude", sparsity=0.5, schedule="fixed")
    spy = Spy(pruning)
    trainer(5, [pruning, spy]).fit(module, loader())
    assert spy.violations == 0 and bool((module.model[2].weight[::2] == 0).all())
    assert bool(pruning.masks["0"].all())


def test_final_state_dict_has_exactly_the_original_keys():
    module = TinyMLP()
    keys = list(module.state_dict())
    trainer(4, [PruningCallback(method="wanda", sparsity=0.6, calib_batches=2)]).fit(module, loader())
    assert list(module.state_dict()) == keys
    assert all(type(p) is nn.Parameter for p in module.parameters()) and not list(module.buffers())


def test_checkpoint_resume_restores_identical_masks(tmp_path):
    kwargs = dict(method="wanda", sparsity=0.7, schedule="cubic", end_step=8, every_n_steps=2, calib_batches=2)
    first = PruningCallback(**kwargs)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1)
    trainer(5, [first, ckpt], enable_checkpointing=True).fit(TinyMLP(), loader())
    path = tmp_path / "epoch=0-step=5.ckpt"
    saved_masks = {n: m.clone() for n, m in first.masks.items()}
    state = torch.load(path, weights_only=True)
    assert not any(k.endswith(("_orig", "_mask")) for k in state["state_dict"])
    assert 0 < first.sparsity() < 0.7  # mid-schedule

    second = PruningCallback(**kwargs)
    spy = Spy(second)
    resumed = TinyMLP(seed=1)  # different initial weights: everything must come from the checkpoint
    trainer(10, [second, spy]).fit(resumed, loader(), ckpt_path=path)
    assert set(spy.restored) == set(saved_masks)
    assert all(torch.equal(spy.restored[n], saved_masks[n]) for n in saved_masks)
    assert spy.start_sparsity[5] == pytest.approx(first.sparsity(), abs=0)
    assert second.history[: len(first.history)] == first.history
    assert spy.violations == 0 and zeros_fraction(resumed) == 0.6875  # per row: floor(0.7 * cols) / cols


def test_gradient_accumulation_collects_whole_steps():
    module = TinyMLP()
    pruning = PruningCallback(method="wanda", sparsity=0.5, schedule="oneshot", start_step=3, calib_batches=3)
    seen = []
    pruning.forward_fn = lambda m, b: (seen.append(b[0].shape[0]), m(b[0]))
    trainer(5, [pruning], accumulate_grad_batches=2).fit(module, loader())
    assert len(seen) == 3 and zeros_fraction(module) == 0.5  # last 3 of the 4 batches of steps 1-2


@pytest.mark.parametrize("method", METHODS.names())
def test_every_registered_method_runs_in_the_callback(method):
    from prunekit.finetune import CausalLMModule
    from tests.conftest import tiny_llama

    module = CausalLMModule(tiny_llama(layers=1), lr=1e-3)
    ids = torch.randint(0, 128, (16, 16), generator=torch.Generator().manual_seed(0))
    data = DataLoader([{"input_ids": row} for row in ids], batch_size=4)
    pruning = PruningCallback(method=method, sparsity=0.5, calib_batches=2)
    trainer(2, [pruning]).fit(module, data)
    assert pruning.sparsity() == pytest.approx(0.5, abs=0.02) and pruning.history[0]["step"] == 0


# ---------------------------------------------------------------- multi-process

CALIB_INPUTS: list[torch.Tensor] = []  # filled in each spawned process by record_forward


def record_forward(module, batch):
    CALIB_INPUTS.append(batch[0].clone())
    return module(batch[0])


class RankDump(L.Callback):
    def __init__(self, pruning: PruningCallback, out):
        self.pruning, self.out = pruning, out

    def on_train_end(self, trainer, pl_module):
        weights = {n: m.weight.detach().clone() for n, m in self.pruning.layers.items()}
        torch.save(
            {
                "masks": self.pruning.masks,
                "weights": weights,
                "history": self.pruning.history,
                "calib": torch.cat(CALIB_INPUTS),
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


@pytest.mark.slow
def test_ddp_two_cpu_processes_hold_identical_masks(tmp_path):
    """DDP on 2 CPU processes (gloo): each rank sees its own shard; statistics are summed, so masks agree.
    Uses the fork launcher of the same DDP strategy: ``ddp`` re-executes the command line (i.e. pytest), and
    ``ddp_spawn`` re-imports torch and Lightning in each process (10-30 s on a busy 2-core machine, against under
    a second for ``ddp_fork``). The callback is still checked to pickle, as ``ddp_spawn`` needs. The loader has
    no torch.Generator (one does not pickle to a spawned process in this sandbox: shared-fd storage); Lightning
    swaps in a DistributedSampler, which shuffles each rank's shard anyway."""
    pruning = PruningCallback(
        method="wanda",
        sparsity=0.625,
        schedule="cubic",
        end_step=4,
        every_n_steps=2,
        calib_batches=2,
        forward_fn=record_forward,
    )
    assert isinstance(pickle.loads(pickle.dumps(pruning)), PruningCallback)
    trainer(6, [pruning, RankDump(pruning, tmp_path)], strategy="ddp_fork", devices=2).fit(
        TinyMLP(), loader(shuffle=False)
    )
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert set(r0["masks"]) == {"0", "2"}
    assert all(torch.equal(r0["masks"][n], r1["masks"][n]) for n in r0["masks"])
    assert all(torch.equal(r0["weights"][n], r1["weights"][n]) for n in r0["weights"])
    assert r0["history"][-1]["sparsity"] == 0.625
    assert not torch.equal(r0["calib"], r1["calib"])  # each rank calibrated on its own shard ...
    events = len(r0["history"])
    assert r0["calib"].shape[0] == events * 2 * 16  # 2 batches of 16 rows per event on each rank
    assert [e["calib_samples"] for e in r0["history"]] == [2 * 2] * events  # ... summed: 2 ranks x 2 batches


def _stats_worker(rank: int, world: int, init: str, out: str) -> None:
    """One rank: statistics of a Linear on its own shard, summed over ranks, saved by rank 0."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        layer = nn.Linear(6, 3)
        shard = torch.randn(4 * world, 5, 6, generator=torch.Generator().manual_seed(0)).chunk(world)[rank]
        with collect({"fc": layer}) as stats:
            layer(shard)
        reduced = {"fc": stats["fc"]}
        reduce_stats(reduced)
        if rank == 0:
            s = reduced["fc"]
            torch.save({"sq_sum": s.sq_sum, "col_sum": s.col_sum, "n": [s.nsamples, s.ntokens]}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_statistics_equal_one_process_over_both_shards(tmp_path):
    """Defect 1: DSnoT's column sums were not summed over ranks (only sq_sum and the counts were). Rank 0's
    statistics after the all-reduce must equal one process collecting over both shards."""
    import torch.multiprocessing as mp

    out = tmp_path / "rank0.pt"
    mp.start_processes(
        _stats_worker, args=(2, f"file://{tmp_path / 'store'}", str(out)), nprocs=2, join=True, start_method="fork"
    )  # spawn re-imports torch in each process: seconds, not milliseconds
    got = torch.load(out, weights_only=True)
    layer = nn.Linear(6, 3)
    with collect({"fc": layer}) as stats:
        layer(torch.randn(8, 5, 6, generator=torch.Generator().manual_seed(0)))
    want = stats["fc"]
    assert torch.allclose(got["sq_sum"], want.sq_sum) and torch.allclose(got["col_sum"], want.col_sum)
    assert got["n"] == [want.nsamples, want.ntokens]


class StepOnly(L.LightningModule):
    """All Lightning requires: training_step and an optimizer, no forward()."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def test_a_module_with_only_training_step_is_calibrated_through_it():
    """Defect 12: calibration called pl_module(batch), which fails when the module defines no forward."""
    pruning = PruningCallback("wanda", 0.5, calib_batches=2)
    trainer(2, [pruning]).fit(StepOnly(), loader())
    assert pruning.sparsity() == pytest.approx(0.5) and pruning.history[0]["calib_samples"] == 2  # 2 batches


def test_a_forward_that_cannot_run_is_one_clear_error():
    class NoWay(StepOnly):
        def training_step(self, batch, batch_idx):
            if torch.is_grad_enabled():
                return super().training_step(batch, batch_idx)
            raise NotImplementedError("no calibration path")

    with pytest.raises(PrunekitError, match="forward_fn"):
        trainer(2, [PruningCallback("wanda", 0.5, calib_batches=2)]).fit(NoWay(), loader())


def test_structured_method_only_holds_masks():
    """Defect 7's callback half: a structured method cannot run inside training, but 'fixed' needs no method."""
    with pytest.raises(PrunekitError, match="cannot happen inside training"):
        PruningCallback("depth", 0.25, schedule="oneshot")
    pruning = PruningCallback("depth", schedule="fixed")
    trainer(2, [pruning]).fit(TinyMLP(), loader())
    assert set(pruning.masks) == {"0", "2"}
