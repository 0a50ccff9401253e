"""How close lazy (block-by-block) pruning runs to this machine's floor, on a LLaMA-7B-shaped random checkpoint.

    python benchmarks/hardware_limit.py [--small] [--layers N] [--sections limit activations]

The floor is (a) + (b):

(a) every shard read once and the same bytes written once: a plain safetensors copy (``load_file`` +
    ``save_file``, one shard at a time) to the same disk;
(b) one forward pass of the calibration batch (4 x 64 tokens) through every block, block by block, each block
    loaded from the checkpoint first (only the forward is timed: the reading is (a)'s).

Then lazy magnitude (per-layer), Wanda 50% (per-output), Wanda 2:4 and SparseGPT 50%, each as a ratio to the
floor. Every run is a subprocess of its own (its peak RSS is its own; reported over the checkpoint size), starts
with the source evicted from the page cache and ends with its output fsynced: times are to durable output,
for the copy and the runs alike. Each run's time per block is split into its phases (read, statistics, score,
select or solve, apply, outputs for the next block, write) by timing prunekit's own functions in the worker.

A second section checks that ``--offload-activations disk`` keeps the resident size bounded with 128 x 2048
calibration tokens on a 2-block checkpoint, and what it costs against activations in RAM; ``auto``'s choice on
this machine is recorded. Only block 0's layers are pruned there (one forward pass over 262k tokens instead of
three: an hour each on 2 CPU cores): the activations are written at capture and read back for the statistics,
the disk paths an update takes too. ``--sections`` runs one section; the other keeps its earlier result.

The checkpoint comes from ``benchmarks/memory.py``'s streamed generator (``--layers`` defaults to the fewest
7B-shaped fp32 blocks that make it at least 16 GiB). Checkpoints are deleted at the end. Results:
benchmarks/results/hardware_limit.{json,md}. On CUDA the runs use the GPU and record its peak memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import memory  # noqa: E402  (the streamed random checkpoint: one generator for both benchmarks)

RESULTS = ROOT / "benchmarks" / "results"
GIB = 2**30
MIN_BYTES = 16 * GIB
METHODS = {  # run name -> (method, pattern, group)
    "magnitude 50%": ("magnitude", None, None),
    "wanda 50% per-output": ("wanda", None, "per-output"),
    "wanda 2:4": ("wanda", "2:4", None),
    "sparsegpt 50%": ("sparsegpt", None, None),
}
THP = os.environ.get("THP_MEM_ALLOC_ENABLE", "1")  # torch's huge-page allocations, as the prunekit command sets
TARGETS = {"magnitude 50%": 1.5, "wanda 2:4": 1.5, "wanda 50% per-output": 2.0}


# ---------------------------------------------------------------- page cache and durability


def files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file())


def evict(directory: Path) -> None:
    """Drop the directory's files from the page cache (clean pages only), so every run reads from disk."""
    for path in files(directory):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fsync_tree(directory: Path) -> float:
    """fsync every file and the directory; the seconds it took (the writes still in the page cache)."""
    start = time.perf_counter()
    for path in [*files(directory), directory]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.perf_counter() - start


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def memory_peaks() -> dict:
    from prunekit.activations import peak_memory

    return peak_memory(device())


# ---------------------------------------------------------------- workers: the floor


def copy_worker(args) -> dict:
    """(a): each shard read once (from disk: evicted first) and written once, then fsynced."""
    from safetensors.torch import load_file, save_file

    source, out = Path(args.source), Path(args.out)
    out.mkdir(parents=True)
    evict(source)
    start = time.perf_counter()
    for path in files(source):
        if path.suffix == ".safetensors":
            save_file(load_file(path), out / path.name, metadata={"format": "pt"})
        else:
            shutil.copy2(path, out / path.name)
    copy_s = time.perf_counter() - start
    sync_s = fsync_tree(out)
    return {"copy_s": copy_s, "sync_s": sync_s, "bytes": sum(p.stat().st_size for p in files(out)), **memory_peaks()}


@torch.no_grad()
def forward_worker(args) -> dict:
    """(b): the calibration batch through every block, loaded one at a time; only the forward is timed."""
    from prunekit.activations import Activations
    from prunekit.engine import capture_block_inputs, run_call
    from prunekit.graph import find_blocks
    from prunekit.io.lazy import LazyModel

    lazy = LazyModel.open(args.source, device())
    prefix, blocks = find_blocks(lazy.model)
    acts = Activations("device", lazy.device)
    with_inputs = lazy.input_names(prefix)
    lazy.onload(with_inputs)
    capture_block_inputs(lazy.model, blocks[0], [_tokens(args)], lazy.device, acts.append)
    lazy.offload(with_inputs)
    forward_s = 0.0
    for i in range(len(blocks)):
        names = lazy.block_names(prefix, i)
        lazy.install(lazy.load(names))
        start = _synced()
        acts.update(0, run_call(blocks[i], acts.call(0)))
        forward_s += _synced() - start
        lazy.offload(names)
    return {"forward_s": forward_s, "blocks": len(blocks), **memory_peaks()}


def _synced() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def _tokens(args) -> torch.Tensor:
    return torch.randint(0, args.vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- workers: prunekit's lazy runs, phase by phase


class Phases:
    """Main-thread seconds per phase, each exclusive of the phases nested in it; a function wrapped with
    ``inherit`` counts to the phase it is called from, if any (a forward pass inside the statistics)."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []

    def wrap(self, owner, attr: str, phase: str, inherit: bool = False) -> None:
        fn = getattr(owner, attr)

        def timed(*a, **k):
            if inherit and self.stack:
                return fn(*a, **k)
            self.stack.append([phase, 0.0])
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                elapsed = time.perf_counter() - start
                _, nested = self.stack.pop()
                self.totals[phase] += elapsed - nested
                if self.stack:
                    self.stack[-1][1] += elapsed

        setattr(owner, attr, timed)


def instrument() -> Phases:
    """Wrap the functions whose time the per-block split reports (as the engine and lazy path look them up)."""
    from prunekit import activations, engine
    from prunekit.io import lazy
    from prunekit.methods.sparsegpt import SparseGPT

    phases = Phases()
    phases.wrap(engine, "_block_statistics", "stats")
    phases.wrap(engine, "run_call", "outputs", inherit=True)
    phases.wrap(lazy, "prune_layers", "apply")  # what is left of pruning once score/select/solve are out
    phases.wrap(engine, "score_matrix", "score")
    phases.wrap(engine, "mask_from_scores", "select")
    phases.wrap(SparseGPT, "prune", "solve")
    phases.wrap(lazy, "layer_sparsity", "count")
    for attr in ("append", "update"):
        phases.wrap(activations.Activations, attr, "activation writes")
    return phases


def prune_worker(args) -> dict:
    """One lazy run: source evicted first, output fsynced after; timings, phases and peak memory."""
    from prunekit.io.lazy import prune_lazy

    phases = instrument()
    method, pattern, group = METHODS[args.run]
    settings = {"include": (args.include,)} if args.include else {}
    evict(Path(args.source))
    start = time.perf_counter()
    report = prune_lazy(
        args.source,
        args.out,
        method,
        0.5,
        pattern,
        group,
        calib=_tokens(args),
        device=str(device()),
        batch_size=args.batch_size,
        offload_activations=args.offload,
        overlap=False if args.serial else None,  # None: prunekit's default (overlapped but for Hessian methods)
        **settings,
    )
    wall_s = time.perf_counter() - start
    return {
        "wall_s": wall_s,
        "sync_s": fsync_tree(Path(args.out)),
        "timings": report.timings,
        "phases": dict(phases.totals),
        "activations": report.metrics["offload_activations"],
        "io_overlap": report.metrics["io_overlap"],
        "sparsity": report.sparsity,
        **memory_peaks(),
    }


def imports_worker(args) -> dict:
    """What the interpreter, torch, transformers and prunekit cost before any model."""
    from transformers import LlamaForCausalLM  # noqa: F401

    import prunekit.io.lazy  # noqa: F401

    return memory_peaks()


WORKERS = {"copy": copy_worker, "forward": forward_worker, "prune": prune_worker, "imports": imports_worker}


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    print("RESULT " + json.dumps(WORKERS[args.worker](args)), flush=True)


# ---------------------------------------------------------------- the harness


def spawn(args, kind: str, source: Path, out: Path, **options) -> dict:
    """Run one worker in a fresh interpreter; its ``RESULT`` line, with the machine's load when it started."""
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in options.items() if v]
    command = [sys.executable, __file__, "--worker", kind, "--source", str(source), "--out", str(out)]
    command += [f"--vocab={args.vocab}", f"--threads={args.threads}", *flags]
    load = os.getloadavg()[0]
    print(f"[{time.strftime('%H:%M:%S')} load {load:.2f}] {kind} {' '.join(flags)}", flush=True)
    env = {**os.environ, "TQDM_DISABLE": "1", "THP_MEM_ALLOC_ENABLE": THP}  # floor and runs alike
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} worker failed:\n{done.stderr[-4000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    result["load_before"] = load
    result["load_after"] = os.getloadavg()[0]
    return result


def checkpoint(args, layers: int, work: Path) -> tuple[Path, int]:
    """The random checkpoint with ``layers`` blocks (generated once per invocation) and its size."""
    source = work / f"src-{layers}"
    if not source.exists():
        start = time.perf_counter()
        memory.generate(args, layers, source)
        print(f"generated {layers} blocks in {time.perf_counter() - start:.0f}s", flush=True)
    size = memory.Checkpoint(source).nbytes(memory.Checkpoint(source).names())
    return source, size


def floor(args, source: Path, work: Path) -> dict:
    copy = spawn(args, "copy", source, work / "copy")
    shutil.rmtree(work / "copy")
    forward = spawn(args, "forward", source, work / "unused", nsamples=args.nsamples, seqlen=args.seqlen)
    total = copy["copy_s"] + copy["sync_s"] + forward["forward_s"]
    return {"copy": copy, "forward": forward, "total_s": total}


def prune_run(args, name: str, source: Path, work: Path, **options) -> dict:
    out = work / "out"
    result = spawn(args, "prune", source, out, run=name, **options)
    result["out_bytes"] = sum(p.stat().st_size for p in files(out))
    shutil.rmtree(out)
    result["total_s"] = result["wall_s"] + result["sync_s"]
    return result


def split(run: dict, blocks: int) -> dict:
    """Seconds per block by phase: the main thread's (they add up to its time per block) and the IO threads'
    busy time beside it (the copy of embeddings and head, before block 0, is not in it). Serial runs read and
    write on the main thread: that is their ``io on main thread``."""
    t, phases = run["timings"], run["phases"]
    main = sum(v for k, v in t.items() if k.startswith("block_") and k.endswith("_s"))
    if run.get("serial"):
        io = t.get("read_s", 0) + t.get("write_s", 0)
    else:
        io = t.get("read_wait_s", 0) + t.get("write_wait_s", 0)
    in_blocks = {k: v for k, v in phases.items() if k != "activation writes"}  # the capture is before block 0
    row = {k: v / blocks for k, v in in_blocks.items() if v}
    row.update(
        io_on_main_thread=io / blocks,
        other=max(main - sum(in_blocks.values()) - io, 0.0) / blocks,
        main_thread=main / blocks,
        read_thread=0.0 if run.get("serial") else t.get("read_s", 0) / blocks,
        write_thread=0.0 if run.get("serial") else t.get("write_s", 0) / blocks,
    )
    return row


def method_runs(args, source: Path, size: int, work: Path, fl: dict) -> dict:
    """Each method once with prunekit's default (IO overlapped, but for SparseGPT); and ``--serial-run`` again
    without overlap (what the threads buy)."""
    jobs = [(name, name, False) for name in args.methods]
    jobs += [(f"{args.serial_run}, overlap off", args.serial_run, True)] if args.serial_run else []
    runs = {}
    for label, name, serial in jobs:
        options = dict(nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.nsamples, serial=serial)
        run = runs[label] = prune_run(args, name, source, work, **options)
        run["serial"] = not run["io_overlap"]
        run["over_floor"] = run["total_s"] / fl["total_s"]
        run["rss_over_checkpoint"] = run["peak_rss_bytes"] / size
        run["per_block"] = split(run, fl["forward"]["blocks"])
        print(f"{label}: {run['total_s']:.1f}s = {run['over_floor']:.2f}x floor", flush=True)
    return runs


def activation_runs(args, work: Path) -> dict:
    """128 x 2048 tokens on 2 blocks: disk vs RAM activations, and what auto picks here."""
    source, size = checkpoint(args, 2, work)
    options = dict(nsamples=args.act_nsamples, seqlen=args.act_seqlen, batch_size=args.act_batch_size)
    options["include"] = "model.layers.0.*"
    runs = {}
    for mode in ("disk", "cpu"):
        run = runs[mode] = prune_run(args, "wanda 50% per-output", source, work, offload=mode, **options)
        run["rss_over_checkpoint"] = run["peak_rss_bytes"] / size
    hidden = args.act_nsamples * args.act_seqlen * args.hidden * 4
    return {"runs": runs, "checkpoint_bytes": size, "activation_bytes": hidden, "auto": auto_choice(args, hidden)}


def auto_choice(args, activation_bytes: int) -> str:
    """What ``offload_activations=auto`` picks on this machine now (the engine reserves two blocks)."""
    from prunekit.activations import choose_offload

    return choose_offload("auto", activation_bytes, device(), 2 * block_bytes(args))


def block_bytes(args) -> int:
    """One fp32 LLaMA block: q, k, v, o, gate, up, down and two norms (``--kv-heads`` = ``--heads``)."""
    return 4 * (4 * args.hidden * args.hidden + 3 * args.hidden * args.intermediate + 2 * args.hidden)


def default_layers(args) -> int:
    """The fewest blocks of this shape (fp32) that make the checkpoint at least 16 GiB."""
    outside = 4 * (2 * args.vocab * args.hidden + args.hidden)  # embeddings, head, final norm
    return math.ceil((MIN_BYTES - outside) / block_bytes(args))


# ---------------------------------------------------------------- results


def machine() -> dict:
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpus": os.cpu_count(),
        "ram_total_bytes": psutil.virtual_memory().total,
        "ram_available_bytes": psutil.virtual_memory().available,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_device": cuda,
        "load_at_start": os.getloadavg(),
        "thp_mem_alloc": THP,
    }


def _ratio_rows(result: dict) -> list[str]:
    fl = result["floor"]
    rows = [
        "| run | time | / floor | target | peak RSS / checkpoint | GPU peak | load (start/end) |",
        "|---|---|---|---|---|---|---|",
        f"| floor (a) copy + fsync | {fl['copy']['copy_s'] + fl['copy']['sync_s']:.1f} s | | | "
        f"{fl['copy']['peak_rss_bytes'] / result['checkpoint_bytes']:.3f} | | "
        f"{fl['copy']['load_before']:.1f} / {fl['copy']['load_after']:.1f} |",
        f"| floor (b) forward, {result['nsamples']} x {result['seqlen']} | {fl['forward']['forward_s']:.1f} s | | | "
        f"| | {fl['forward']['load_before']:.1f} / {fl['forward']['load_after']:.1f} |",
    ]
    for name, r in result["runs"].items():
        target = f"<= {TARGETS[name]}x" if name in TARGETS else "reported"
        gpu = f"{r['cuda_peak_bytes'] / GIB:.2f} GiB" if "cuda_peak_bytes" in r else "no GPU"
        rows.append(
            f"| {name} | {r['total_s']:.1f} s | **{r['over_floor']:.2f}** | {target} | "
            f"{r['rss_over_checkpoint']:.3f} | {gpu} | {r['load_before']:.1f} / {r['load_after']:.1f} |"
        )
    return rows


PHASE_ORDER = (
    "main_thread",
    "io_on_main_thread",
    "stats",
    "score",
    "select",
    "solve",
    "apply",
    "count",
    "outputs",
    "other",
    "read_thread",
    "write_thread",
)


def _phase_rows(result: dict) -> list[str]:
    names = list(result["runs"])
    rows = ["| seconds per block | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for phase in PHASE_ORDER:
        cells = [f"{result['runs'][n]['per_block'].get(phase, 0.0):.2f}" for n in names]
        rows.append(f"| {phase.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return rows


def _where(section: dict) -> str:
    m = section["machine"]
    gpu = (
        f"GPU: {m['cuda_device']} (runs on it; peak GPU memory recorded)."
        if m["cuda_device"]
        else "**No GPU figure exists: this machine has no CUDA device; every run is on the CPU.**"
    )
    return (
        f"{m['cpus']} cores (torch threads {section['threads']}), {m['ram_total_bytes'] / GIB:.1f} GiB RAM. {gpu} "
        "Started "
        f"{section['started']}, load average {m['load_at_start'][0]:.2f} (a shared machine: timings move with the "
        "load, given per run)."
    )


def _activation_lines(acts: dict) -> list[str]:
    rows = [
        "| activations | wall + fsync | peak RSS | RSS / checkpoint | activation writes | load (start/end) |",
        "|---|---|---|---|---|---|",
    ]
    for mode, r in acts["runs"].items():
        rows.append(
            f"| {mode} ({r['activations']}) | {r['total_s']:.0f} s | {r['peak_rss_bytes'] / GIB:.2f} GiB | "
            f"{r['rss_over_checkpoint']:.2f} | {r['phases'].get('activation writes', 0):.1f} s | "
            f"{r['load_before']:.1f} / {r['load_after']:.1f} |"
        )
    disk, ram = acts["runs"]["disk"], acts["runs"]["cpu"]
    return [
        f"## Calibration activations: {acts['tokens']} tokens on a 2-block checkpoint",
        "",
        f"Hidden states: {acts['activation_bytes'] / GIB:.2f} GiB per block boundary; checkpoint "
        f"{acts['checkpoint_bytes'] / GIB:.2f} GiB; Wanda 50% of block 0's layers (block 1 is streamed through "
        f"unchanged), batch size {acts.get('batch_size', 8)}. {_where(acts)} `auto` picks **{acts['auto']}** on "
        "this machine (CPU compute: `device` means RAM). Activation writes = capture and updates (disk: through "
        "the file mappings); reads from disk happen inside the forward passes, through the mapping.",
        "",
        *rows,
        "",
        f"Disk took {disk['total_s'] / ram['total_s']:.2f}x the in-RAM run's time and peaked "
        f"{(ram['peak_rss_bytes'] - disk['peak_rss_bytes']) / GIB:.2f} GiB lower.",
        "",
    ]


def _limit_lines(result: dict) -> list[str]:
    shape = result["shape"]
    slowest = max(result["runs"], key=lambda n: result["runs"][n]["total_s"])
    return [
        f"{result['layers']} LLaMA-shaped blocks (hidden {shape['hidden']}, intermediate {shape['intermediate']}, "
        f"vocab {shape['vocab']}), fp32 random weights: checkpoint {result['checkpoint_bytes'] / GIB:.2f} GiB. "
        + _where(result),
        "",
        result["note"],
        "",
        f"Floor = (a) + (b) = {result['floor']['total_s']:.1f} s. Every run starts with the source evicted from the "
        "page cache and ends with its output fsynced. Import baseline (Python + torch + transformers + prunekit) "
        f"{result['import_rss_bytes'] / GIB:.2f} GiB RSS.",
        "",
        *_ratio_rows(result),
        "",
        f"## Where a block's time goes (slowest: {slowest})",
        "",
        "Main-thread phases add up to the main thread's time per block; the read and write threads run beside it "
        "(their busy time, overlapped). stats = forward pass with the statistics hooks; outputs = forward pass of "
        "the pruned block for the next block's inputs (every block but the last: averaged over all); apply = the "
        "rest of pruning a layer (finite check, mask multiply, write into the weight); count = the per-layer "
        "sparsity report; io on main thread = waiting for the read/write threads (in runs without them, the reads "
        "and writes themselves: overlap off, and by default the methods that keep a Hessian per layer, "
        "SparseGPT here, whose solve dwarfs the IO while three resident blocks beside the Hessians break the "
        "memory budget).",
        "",
        *_phase_rows(result),
        "",
    ]


def markdown(result: dict) -> str:
    limit, acts = result.get("limit"), result.get("activations")
    return "\n".join(
        [
            "# Hardware limit: lazy pruning vs a plain copy + one forward pass",
            "",
            *(_limit_lines(limit) if limit else ["(floor and method runs not run yet)", ""]),
            *(_activation_lines(acts) if acts else ["(activation offload section not run yet)", ""]),
        ]
    )


# ---------------------------------------------------------------- main


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default in (
        ("--hidden", 4096),
        ("--intermediate", 11008),
        ("--heads", 32),
        ("--kv-heads", 32),
        ("--vocab", 32000),
        ("--seed", 0),
        ("--nsamples", 4),
        ("--seqlen", 64),
        ("--threads", 2),
        ("--act-nsamples", 128),
        ("--act-seqlen", 2048),
        ("--act-batch-size", 8),
        ("--batch-size", 4),
    ):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--layers", type=int, default=0, help="blocks (default: the fewest that make >= 16 GiB)")
    parser.add_argument("--small", action="store_true", help="a quick 2-block run")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--serial-run", default="wanda 2:4", help="run this method again without overlap ('' = no)")
    parser.add_argument(
        "--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS), help="sections to run (others kept)"
    )
    parser.add_argument("--workdir", default="/tmp/prunekit-hardware-limit")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--worker", choices=list(WORKERS))
    parser.add_argument("--source")
    parser.add_argument("--out")
    parser.add_argument("--run", choices=list(METHODS))
    parser.add_argument("--offload", default="auto")
    parser.add_argument("--include")
    parser.add_argument("--serial", action="store_true", help="worker: overlap=False")
    return parser.parse_args(argv)


def main() -> None:
    args = parse()
    if args.worker:
        return worker(args)
    args.layers = 2 if args.small else args.layers or default_layers(args)
    work, results = Path(args.workdir), Path(args.results)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    previous = results / "hardware_limit.json"
    result = json.loads(previous.read_text()) if previous.exists() else {}
    try:
        for section in args.sections:  # a section not run keeps its earlier result (its own date and load)
            result[section] = SECTIONS[section](args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results.mkdir(parents=True, exist_ok=True)
    previous.write_text(json.dumps(result, indent=2) + "\n")
    (results / "hardware_limit.md").write_text(markdown(result))
    print(markdown(result))


def limit_section(args, work: Path) -> dict:
    """The floor and every method's lazy run on the big (or --small) checkpoint."""
    started, info = time.strftime("%Y-%m-%d %H:%M:%S"), machine()
    import_rss = spawn(args, "imports", work, work)["peak_rss_bytes"]
    source, size = checkpoint(args, args.layers, work)
    fl = floor(args, source, work)
    runs = method_runs(args, source, size, work, fl)
    shutil.rmtree(source)
    return {
        "started": started,
        "machine": info,
        "layers": args.layers,
        "small": args.small,
        "shape": {k: getattr(args, k) for k in ("hidden", "intermediate", "heads", "kv_heads", "vocab")},
        "threads": args.threads,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "checkpoint_bytes": size,
        "import_rss_bytes": import_rss,
        "floor": fl,
        "runs": runs,
        "note": note(args, info),
    }


def activations_section(args, work: Path) -> dict:
    started, info = time.strftime("%Y-%m-%d %H:%M:%S"), machine()
    result = activation_runs(args, work)
    tokens = f"{args.act_nsamples} x {args.act_seqlen}"
    return {
        "started": started,
        "machine": info,
        "threads": args.threads,
        "tokens": tokens,
        "batch_size": args.act_batch_size,
        **result,
    }


SECTIONS = {"limit": limit_section, "activations": activations_section}


def note(args, info: dict) -> str:
    if not args.small:
        return f"Full run: {args.layers} blocks."
    return (
        f"**Small run (--small, 2 blocks)**, not the >= 16 GiB checkpoint: the machine's load was "
        f"{info['load_at_start'][0]:.2f} at the start (the full run is for a quiet machine, load < 1.5). Peak RSS "
        "over the checkpoint is not meaningful at this size (the import baseline alone is ~0.3x of 2.5 GiB); the "
        "full run checks <= 0.25x."
    )


if __name__ == "__main__":
    main()
