"""Several ranks, one result (issue 25): 2 CPU processes on gloo prune exactly as one process does, in memory and
with --lazy, and a rank that fails stops both, with one line and nothing left behind.

The ranks are forked from the test process (``torch.multiprocessing`` with ``fork``: no re-import of torch, well
under a second to start); each initialises a gloo group on a file store, as torchrun's ranks would over TCP. One
pair of processes runs every method in turn, so the group is set up once.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import prunekit
from prunekit import distributed
from prunekit.errors import PrunekitError
from prunekit.eval import perplexity
from prunekit.io.lazy import prune_lazy
from tests import zoo
from tests.conftest import tiny_llama

IN_MEMORY = {  # name -> prune settings (on top of 50% in batches of 2)
    "wanda per-output": dict(method="wanda", group="per-output"),
    "wanda 2:4": dict(method="wanda", pattern="2:4"),
    "sparsegpt": dict(method="sparsegpt"),
    "wanda + admm": dict(method="wanda", update=("admm",)),
    "owl": dict(method="wanda", allocation="owl", allocation_params={"m": 2.0, "lam": 0.1}),
    "wanda + dsnot": dict(method="wanda", update=("dsnot",)),
    "depth": dict(method="depth", sparsity=0.34),
    "width": dict(method="width", sparsity=0.3),
    "depth taylor": dict(method="depth", sparsity=0.34, method_params={"score": "taylor"}),  # gradients, all ranks'
    "width taylor": dict(method="width", sparsity=0.3, method_params={"score": "taylor"}),
    "wanda moe": dict(method="wanda"),  # a Mixtral: expert token counts summed over the ranks
}
LAZY = {  # --lazy takes unstructured methods with uniform allocation
    "wanda per-output": dict(method="wanda", group="per-output"),
    "sparsegpt": dict(method="sparsegpt"),
}
LAZY_MORE = {  # the same in the slow suite (each lazy run costs seconds on a busy machine)
    "wanda 2:4": dict(method="wanda", pattern="2:4"),
    "wanda + admm": dict(method="wanda", update=("admm",)),
    "wanda + dsnot": dict(method="wanda", update=("dsnot",)),
}
BLOCKS = 3
ROOT = Path(__file__).resolve().parents[1]


def tokens() -> torch.Tensor:
    return torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))


def in_memory(name: str) -> torch.nn.Module:
    """The pruned model; a MoE model carries its report's routed token counts (``routed``)."""
    if "moe" in name:
        torch.manual_seed(0)
        model = zoo.build("mixtral")
    else:
        model = tiny_llama(layers=BLOCKS, seed=0)
    report = prunekit.prune(model, calib=tokens(), **{"sparsity": 0.5, "batch_size": 2, **IN_MEMORY[name]})
    model.routed = report.experts["routed_tokens"] if report.experts else None
    return model


def lazy(source: Path, out: Path, name: str, **kwargs) -> prunekit.PruneReport:
    settings = {"sparsity": 0.5, "batch_size": 2, **{**LAZY, **LAZY_MORE}[name], **kwargs}
    return prune_lazy(source, out, calib=settings.pop("calib", tokens()), max_shard_size="20KB", **settings)


def shards(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


# ---------------------------------------------------------------- running ranks


def _entry(rank: int, fn, world: int, store: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(60))
    fn(rank, *args)
    dist.destroy_process_group()


def ranks(fn, *args, tmp: Path, world: int = 2, timeout: float = 60) -> tuple[list[int | None], float]:
    """Run ``fn(rank, *args)`` in ``world`` forked processes of one gloo group; their exit codes and the seconds
    until the last one ended (a process still running at ``timeout`` is killed and has no exit code)."""
    start = time.monotonic()
    store = tmp / f"store-{time.monotonic_ns()}"
    context = mp.start_processes(
        _entry, args=(fn, world, str(store), args), nprocs=world, join=False, start_method="fork"
    )
    for process in context.processes:
        process.join(max(timeout - (time.monotonic() - start), 0.1))
    codes = [p.exitcode for p in context.processes]
    for process in context.processes:
        if process.is_alive():
            os.kill(process.pid, signal.SIGKILL)
    return codes, time.monotonic() - start


# ---------------------------------------------------------------- the same result with 1 and 2 ranks


def _equivalence(rank: int, source: str, out: str, memory: list[str], lazy_names: list[str]) -> None:
    models = {name: in_memory(name) for name in memory}
    results = {name: m.state_dict() for name, m in models.items()}
    results.update({f"{name} routed": m.routed for name, m in models.items() if m.routed})
    for name in lazy_names:
        report = lazy(Path(source), Path(out) / name, name)
        assert report.metrics["world_size"] == 2 and len(report.metrics["peak_rss_bytes_per_rank"]) == 2
    if rank == 0:
        torch.save(results, Path(out) / "memory.pt")


def assert_same_result(one: torch.nn.Module, two: dict[str, torch.Tensor], name: str) -> None:
    """Masks identical, or (floating-point sums in another order flipping near-ties) at most 1e-4 of the weights
    and the perplexity within 1e-3 relative."""
    ref = one.state_dict()
    assert set(ref) == set(two), name
    flips = sum(int(((ref[k] == 0) != (two[k] == 0)).sum()) for k in ref)
    assert flips <= 1e-4 * sum(t.numel() for t in ref.values()), f"{name}: {flips} mask entries differ"
    other = copy.deepcopy(one)
    other.load_state_dict(two)
    text = torch.randint(0, 128, (512,), generator=torch.Generator().manual_seed(2))
    ppl1, ppl2 = perplexity(one, text, 16), perplexity(other, text, 16)
    assert abs(ppl1 - ppl2) <= 1e-3 * ppl1, f"{name}: perplexity {ppl1} vs {ppl2}"


def check_two_ranks(tmp_path: Path, memory: dict, lazy_names: dict) -> None:
    """One process first (it also compiles the selection kernels the forked ranks then inherit), then two."""
    source = tmp_path / "src"
    tiny_llama(layers=BLOCKS, seed=0).save_pretrained(source, max_shard_size="20KB")
    one = {name: in_memory(name) for name in memory}
    for name in lazy_names:
        lazy(source, tmp_path / f"one {name}", name)
    codes, _ = ranks(_equivalence, str(source), str(tmp_path), list(memory), list(lazy_names), tmp=tmp_path)
    assert codes == [0, 0]
    two = torch.load(tmp_path / "memory.pt", weights_only=True)
    for name in memory:
        assert_same_result(one[name], two[name], name)
        assert one[name].routed == two.get(f"{name} routed"), name  # tokens routed to each expert, all ranks
    model = tiny_llama(layers=BLOCKS, seed=0)
    for name in lazy_names:
        model.load_state_dict(shards(tmp_path / f"one {name}"))
        assert_same_result(model, shards(tmp_path / name), f"lazy {name}")
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == sorted(
            p.name for p in (tmp_path / f"one {name}").iterdir()
        )
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary, lock or state


def test_two_ranks_prune_as_one_process(tmp_path):
    """Wanda (per-output, 2:4; and on a Mixtral, whose expert token counts must add up too), SparseGPT, ADMM, OWL,
    DSnoT, depth and width (their Taylor scores too) in memory, and Wanda and SparseGPT with --lazy: each rank
    calibrates on half of the batches, the statistics (gradients) are summed, the layers shared out."""
    check_two_ranks(tmp_path, IN_MEMORY, LAZY)


@pytest.mark.slow
def test_two_ranks_prune_as_one_process_lazy_more(tmp_path):
    """The other unstructured methods with --lazy: Wanda 2:4, ADMM and DSnoT."""
    check_two_ranks(tmp_path, {}, LAZY_MORE)


# ---------------------------------------------------------------- a rank that fails stops every rank


def _fail(rank: int, source: str, out: str, how: str, messages: str) -> None:
    calib = tokens()
    if how == "input" and rank == 1:
        calib = calib + 1000  # token ids outside the vocabulary: this rank's data is bad
    if how == "step" and rank == 1:
        from prunekit import engine

        original = engine._prune_layer

        def failing(name, *args):
            if ".1." in name:
                raise PrunekitError(f"simulated failure pruning {name}")
            return original(name, *args)

        engine._prune_layer = failing
    try:
        lazy(Path(source), Path(out), "sparsegpt", calib=calib)
    except PrunekitError as err:
        Path(messages, f"rank{rank}.txt").write_text(f"{type(err).__name__}: {err}")
        raise SystemExit(2) from None


@pytest.mark.parametrize("how", ["input", "step"])
def test_a_failing_rank_stops_both_with_one_line_and_no_output(tmp_path, how):
    """A bad input read only by rank 1 (its calibration batches), or an error raised while rank 1 prunes a layer of
    block 1: both processes end with exit code 2 within seconds, rank 0 names rank 1 and its problem, and
    ``--out`` is absent with no temporary, lock or resume state beside it."""
    source, work = tmp_path / "src", tmp_path / "work"
    work.mkdir()
    tiny_llama(layers=BLOCKS, seed=0).save_pretrained(source)
    codes, seconds = ranks(_fail, str(source), str(work / "out"), how, str(tmp_path), tmp=tmp_path)
    assert codes == [2, 2] and seconds < 60
    own, told = (tmp_path / "rank1.txt").read_text(), (tmp_path / "rank0.txt").read_text()
    assert own.startswith("PrunekitError: ") and ("vocabulary" in own if how == "input" else "simulated" in own)
    assert told == f"PeerError: rank 1: {own.removeprefix('PrunekitError: ')}"
    assert "\n" not in told
    assert list(work.iterdir()) == []


# ---------------------------------------------------------------- pieces


def test_layer_owners_share_the_work_costliest_first():
    """Longest processing time first: the Hessian solve of down_proj (cols^3) outweighs the rest; without a
    Hessian the work is rows x cols, and every rank gets a share; one rank owns everything."""
    layers = dict(tiny_llama(layers=1, hidden=32, intermediate=128).model.layers[0].named_modules())
    layers = {n: m for n, m in layers.items() if isinstance(m, torch.nn.Linear)}
    solve = distributed.layer_owners(layers, hessian=True, world=2)
    assert solve["mlp.down_proj"] == 0 and {r for n, r in solve.items() if n != "mlp.down_proj"} == {1}
    score = distributed.layer_owners(layers, hessian=False, world=3)
    assert set(score.values()) == {0, 1, 2} and list(score) == list(layers)
    assert set(distributed.layer_owners(layers, hessian=True).values()) == {0}  # one process


def test_one_process_is_untouched():
    """Without a process group every helper is a no-op: all batches, no reduction, failures raised as they are."""
    batches = [torch.zeros(1), torch.ones(1)]
    assert distributed.shard(batches) == batches and distributed.world_size() == 1 and distributed.is_writer()
    t = torch.arange(3.0)
    distributed.sum_over_ranks(t)
    assert t.tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="mine"), distributed.together():
        raise ValueError("mine")


def test_a_torchrun_launch_without_a_process_group_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PrunekitError, match="no torch.distributed process group is initialised"):
        prunekit.prune(tiny_llama(layers=1), calib=tokens(), sparsity=0.5)


# ---------------------------------------------------------------- resuming a distributed run


def _kill_rank0_after(rank: int, checkpoint: str, out: str, block: int, lazy: bool) -> None:
    if rank == 0 and block >= 0:
        from prunekit.io import resume

        commit = resume.ResumeState.commit

        def commit_then_die(self, done, extra):
            commit(self, done, extra)
            if done == block:
                os.kill(os.getpid(), signal.SIGKILL)

        resume.ResumeState.commit = commit_then_die
    from prunekit.commands import run_prune
    from prunekit.recipe import PruneRecipe

    data = dict(calib_data=str(Path(checkpoint) / "train.txt"), nsamples=4, batch_size=2, seqlen=32)
    run_prune(PruneRecipe(model=str(Path(checkpoint) / "model"), out=out, method="sparsegpt", lazy=lazy, **data))


@pytest.mark.slow
@pytest.mark.parametrize("lazy", [False, True], ids=["in memory", "lazy"])
def test_a_killed_distributed_run_resumes_to_the_same_output(checkpoint, tmp_path, lazy):
    """Rank 0 killed (SIGKILL) right after block 1 of 3 is kept: rank 1 stops too (lost contact); the same two ranks
    rerun continue from block 2 (each from its own kept inputs) and write what an uninterrupted 2-rank run writes."""
    run = functools.partial(ranks, _kill_rank0_after, str(checkpoint), tmp=tmp_path)
    assert run(str(tmp_path / "ref"), -1, lazy)[0] == [0, 0]
    codes, seconds = run(str(tmp_path / "out"), 1, lazy)
    assert codes[0] == -signal.SIGKILL and codes[1] not in (0, None) and seconds < 60
    state = tmp_path / ".out.resume"
    kept = sorted(p.name for p in state.iterdir() if p.name.startswith("inputs"))
    assert kept == ["inputs-00002-r000", "inputs-00002-r001"]
    assert run(str(tmp_path / "out"), -1, lazy)[0] == [0, 0]
    ref, out = shards(tmp_path / "ref"), shards(tmp_path / "out")
    assert set(ref) == set(out) and all(torch.equal(ref[k], out[k]) for k in ref)
    assert not state.exists()


# ---------------------------------------------------------------- the command under torchrun

# Rank 1 raises while it prunes a layer of block 1; the rest is the prunekit command.
FAILING_RANK = """
import os, sys
from prunekit import engine
from prunekit.errors import PrunekitError
if os.environ["RANK"] == "1":
    original = engine._prune_layer
    def failing(name, *args):
        if ".1." in name:
            raise PrunekitError("simulated failure pruning " + name)
        return original(name, *args)
    engine._prune_layer = failing
from prunekit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def torchrun(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from prunekit.cli import demo_assets
    from tests import zoo

    root = tmp_path_factory.mktemp("torchrun")
    zoo.build("llama").save_pretrained(root / "model")
    zoo.processor("llama").save_pretrained(root / "model")
    (root / "train.txt").write_text((demo_assets() / "kjv" / "test.txt").read_text()[:20000])
    return root


def prune_args(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    data = ["--calib-data", str(checkpoint / "train.txt"), "--nsamples", "4", "--batch-size", "2", "--seqlen", "32"]
    return ["prune", "--model", str(checkpoint / "model"), *data, "--out", str(out), *extra]


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["--lazy"]], ids=["in memory", "lazy"])
def test_torchrun_runs_the_command_on_two_ranks(checkpoint, tmp_path, mode):
    """``torchrun --nproc-per-node 2 -m prunekit prune ...``: rank 0 prints the report and writes --out."""
    args = prune_args(checkpoint, tmp_path / "out", "--method", "sparsegpt", *mode)
    done = torchrun(tmp_path, "-m", "prunekit", *args)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("saved to") == 1 and "world_size=2" in done.stdout
    report = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    assert report["metrics"]["world_size"] == 2 and report["sparsity"] == pytest.approx(0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.slow
def test_torchrun_a_failing_rank_ends_both_with_one_line(checkpoint, tmp_path):
    """Rank 1 fails in a step: both ranks end within seconds, the run exits non-zero, rank 0 prints one line naming
    rank 1 and the problem (torchrun adds its own summary after it), and nothing is left beside --out."""
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    start = time.monotonic()
    done = torchrun(tmp_path, str(script), *prune_args(checkpoint, tmp_path / "out", "--method", "sparsegpt", "--lazy"))
    assert done.returncode != 0 and time.monotonic() - start < 120
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error:")]
    assert errors == [f"error: rank 1: simulated failure pruning {errors[0].rsplit(' ', 1)[-1]}"], done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["failing_rank.py"]
