"""Two ranks against one: ``--lazy`` SparseGPT and Wanda on a LLaMA-7B-shaped checkpoint, on torch.distributed.

    python benchmarks/distributed.py                 # the recorded run (an idle machine: it is a timing)
    python benchmarks/distributed.py --small         # a quick check on a quarter-width checkpoint (not recorded)

The checkpoint has the 7B shapes (hidden 4096, intermediate 11008, 32 heads, vocabulary 32000, fp32) and 2 blocks
(``benchmarks/memory.py``'s streamed generator, one block's tensors in memory at a time), kept in
``benchmarks/.cache`` for the next run (2.7 GiB; ``--fresh`` makes it again). Each method runs twice, each run a
fresh command: 1 rank x 1 thread (``python -m prunekit prune --lazy``) and 2 ranks x 1 thread
(``torchrun --standalone --nproc-per-node 2 -m prunekit prune --lazy``), with gloo on the CPU: each rank
calibrates on half of the windows (data parallel) and prunes its share of each block's layers (layer parallel),
rank 0 writes. The source is evicted from the page cache before each run and the output fsynced after it.

Recorded per run: the wall time of the whole command (interpreter start to exit, fsync included), prunekit's own
``total_s``, the peak RSS of every rank (from the report), the load average before and after; per method: the
2-rank / 1-rank wall time ratio (target <= 0.6) and how far the two outputs differ (fraction of mask entries:
summing the statistics over two ranks changes the order of floating-point additions only). Calibration:
``--nsamples`` windows of ``--seqlen`` tokens of the bundled KJV text, through the tokenizer saved with the
checkpoint (32 x 512: a sixteenth of the published protocol, 128 x 2048, which takes hours on 2 cores; more
tokens only make the part that splits over the ranks larger). Results: benchmarks/results/distributed.{json,md}.
``--device cuda`` runs one rank per GPU (``cuda:LOCAL_RANK``, NCCL for CUDA tensors) on a machine that has them;
this one has none.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import memory  # noqa: E402  (the streamed random checkpoint)
from hardware_limit import evict, fsync_tree  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / ".cache"
GIB = 2**30
METHODS = {"sparsegpt 50%": ["--method", "sparsegpt"], "wanda 50% per-output": ["--method", "wanda"]}
TARGET = 0.6  # 2 ranks x 1 thread over 1 rank x 1 thread


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default in (
        ("--hidden", 4096),
        ("--intermediate", 11008),
        ("--heads", 32),
        ("--kv-heads", 32),
        ("--vocab", 32000),
        ("--seed", 0),
        ("--layers", 2),
        ("--nsamples", 32),
        ("--seqlen", 512),
        ("--batch-size", 4),
    ):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--device", default="cpu", help="cpu (gloo), or cuda: one GPU per rank (NCCL)")
    parser.add_argument("--small", action="store_true", help="quarter width, 64-token windows; printed, not recorded")
    parser.add_argument("--fresh", action="store_true", help="make the checkpoint again")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.small:
        args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab = 1024, 2752, 8, 8, 8192
        args.nsamples, args.seqlen = 8, 64
    return args


def checkpoint(args) -> Path:
    """The 2-block 7B-shaped checkpoint (or the small one) with the bundled KJV tokenizer (4,096 tokens, inside the
    vocabulary), so the command calibrates from text as a user's run does."""
    from transformers import AutoTokenizer

    from prunekit.cli import demo_assets

    name = f"distributed-{args.hidden}x{args.intermediate}x{args.layers}-v{args.vocab}"
    source = CACHE / name
    if args.fresh:
        shutil.rmtree(source, ignore_errors=True)
    if not (source / "tokenizer.json").exists():
        shutil.rmtree(source, ignore_errors=True)
        start = time.perf_counter()
        memory.generate(args, args.layers, source)
        AutoTokenizer.from_pretrained(demo_assets() / "kjv-llama-5m").save_pretrained(source)
        print(f"generated {source} in {time.perf_counter() - start:.0f}s", flush=True)
    return source


# ---------------------------------------------------------------- one run: the command, on 1 or 2 ranks


def run(args, source: Path, out: Path, method: list[str], ranks: int) -> dict:
    """``prunekit prune --lazy`` in fresh processes (1 rank: python -m prunekit; 2: torchrun), timed from launch to
    exit plus the output's fsync."""
    from prunekit.cli import demo_assets

    launch = [sys.executable, "-m"] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launch += [] if ranks == 1 else ["--nproc-per-node", str(ranks), "-m"]
    data = ["--calib-data", str(demo_assets() / "kjv" / "train.txt"), "--nsamples", str(args.nsamples)]
    data += ["--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size)]
    report = out.parent / "report.json"
    command = [
        *launch,
        "prunekit",
        "prune",
        "--model",
        str(source),
        "--model-class",
        "causal-lm",
        "--lazy",
        "--device",
        args.device,
        *method,
        *data,
    ]
    command += ["--sparsity", "0.5", "--out", str(out), "--json", str(report), "--no-resume"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    evict(source)
    load = os.getloadavg()[0]
    print(f"[{time.strftime('%H:%M:%S')} load {load:.2f}] {' '.join(method)}, {ranks} rank(s)", flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    sync_s = fsync_tree(out) if done.returncode == 0 else 0.0
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{method} on {ranks} rank(s) failed:\n{done.stderr[-4000:]}")
    data = json.loads(report.read_text())
    peaks = data["metrics"].get("peak_rss_bytes_per_rank", [data["metrics"]["peak_rss_bytes"]])
    return {
        "wall_s": wall,
        "sync_s": sync_s,
        "ranks": ranks,
        "timings": data["timings"],
        "peak_rss_bytes_per_rank": peaks,
        "sparsity": data["sparsity"],
        "load_before": load,
        "load_after": os.getloadavg()[0],
    }


def mask_difference(a: Path, b: Path) -> float:
    """Fraction of the pruned tensors' entries whose zero / non-zero state differs between two outputs."""
    from prunekit.io.compact import Checkpoint

    one, two = Checkpoint(a), Checkpoint(b)
    differ = total = 0
    for name in one.names():
        if ".layers." not in name or not name.endswith("proj.weight"):
            continue
        x, y = one.read([name])[name], two.read([name])[name]
        differ += int(((x == 0) != (y == 0)).sum())
        total += x.numel()
    return differ / max(total, 1)


def method_runs(args, source: Path, work: Path) -> dict:
    runs = {}
    for name in args.methods:
        one = run(args, source, work / "one", METHODS[name], 1)
        two = run(args, source, work / "two", METHODS[name], 2)
        runs[name] = {
            "one": one,
            "two": two,
            "ratio": two["wall_s"] / one["wall_s"],
            "ratio_prunekit_total": two["timings"]["total_s"] / one["timings"]["total_s"],
            "mask_difference": mask_difference(work / "one", work / "two"),
        }
        shutil.rmtree(work / "one")
        shutil.rmtree(work / "two")
        print(f"{name}: {one['wall_s']:.1f}s -> {two['wall_s']:.1f}s = {runs[name]['ratio']:.2f}", flush=True)
    return runs


# ---------------------------------------------------------------- results


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "ram_total_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_devices": torch.cuda.device_count(),
        "load_at_start": os.getloadavg(),
    }


def markdown(result: dict) -> str:
    m = result["machine"]
    gpu = (
        "**No NCCL / GPU figure exists: this machine has no CUDA device; both runs of each method are on the CPU "
        "(gloo).**"
        if not m["cuda_devices"]
        else f"{m['cuda_devices']} CUDA device(s)."
    )
    lines = [
        "# Two ranks against one: --lazy pruning on torch.distributed",
        "",
        f"{result['layers']} LLaMA-shaped blocks (hidden {result['hidden']}, intermediate {result['intermediate']}, "
        f"vocabulary {result['vocab']}), fp32 random weights: checkpoint {result['checkpoint_bytes'] / GIB:.2f} GiB. "
        f"Calibration {result['nsamples']} x {result['seqlen']} tokens in batches of {result['batch_size']}. "
        f"{m['cpus']} cores, {m['ram_total_bytes'] / GIB:.1f} GiB RAM; every rank has 1 torch thread. {gpu} "
        f"Started {result['started']}, load average {m['load_at_start'][0]:.2f}.",
        "",
        "Wall time = the whole command, interpreter start to exit, source evicted from the page cache before and the "
        "output fsynced after; `total_s` = prunekit's own timing inside it. Mask difference = fraction of the pruned "
        "weights whose kept/pruned state differs between the two outputs (the statistics are summed in another order).",
        "",
        "| method | 1 rank x 1 thread | 2 ranks x 1 thread | ratio (target <= 0.6) | total_s ratio | peak RSS per rank "
        "(1 / 2 ranks) | mask difference | load (start/end) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["runs"].items():
        one, two = r["one"], r["two"]
        peaks = ", ".join(f"{p / GIB:.2f}" for p in two["peak_rss_bytes_per_rank"])
        lines.append(
            f"| {name} | {one['wall_s']:.1f} s | {two['wall_s']:.1f} s | **{r['ratio']:.2f}** | "
            f"{r['ratio_prunekit_total']:.2f} | {one['peak_rss_bytes_per_rank'][0] / GIB:.2f} / {peaks} GiB | "
            f"{r['mask_difference']:.2e} | {one['load_before']:.1f}-{two['load_after']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    info = machine()
    source = checkpoint(args)
    work = CACHE / "distributed-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        runs = method_runs(args, source, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = memory.Checkpoint(source).nbytes(memory.Checkpoint(source).names())
    keys = ("hidden", "intermediate", "vocab", "layers", "nsamples", "seqlen", "batch_size")
    result = {"started": started, "machine": info, "checkpoint_bytes": size, "runs": runs}
    result.update({k: getattr(args, k) for k in keys})
    text = markdown(result)
    print(text)
    if args.small:
        print("(--small: not recorded)")
        return
    results = Path(args.results)
    (results / "distributed.json").write_text(json.dumps(result, indent=2) + "\n")
    (results / "distributed.md").write_text(text)


if __name__ == "__main__":
    main()
