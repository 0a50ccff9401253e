"""Peak memory of lazy (block-by-block) pruning vs checkpoint size, on a LLaMA-shaped random checkpoint
larger than the machine's RAM; and the same ratio for the in-memory path on a model that fits.

    python benchmarks/memory.py [--layers 32] [--hidden 4096] [--intermediate 11008] [--budget-min 25]

1. A small checkpoint of the same shape (``--small-layers`` blocks) is generated and pruned in memory
   (``from_pretrained`` + ``prunekit.prune`` + ``save_pretrained``) and lazily (``prune_lazy``); the
   two outputs are compared tensor by tensor (bit-identical), and the lazy per-block time is measured.
2. The full run's time is extrapolated from it. If it fits ``--budget-min``, the full checkpoint is
   generated (streamed: one block's random tensors per shard, never the whole model) and pruned
   lazily; otherwise the largest layer count that fits the budget is run and the rest extrapolated.
3. Each measurement runs in its own subprocess, so its peak RSS (``ru_maxrss``) is that run's alone.
   Checkpoints are deleted at the end. Results: benchmarks/results/memory.{json,md}. CPU only here.
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

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # huge pages, as the prunekit command sets them

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prunekit.io.compact import Checkpoint, ShardWriter  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
GIB = 2**30


# ---------------------------------------------------------------- the random checkpoint, streamed


def llama_config(args, layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        dtype="float32",
    )


def _random(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:  # norm weights
        return torch.ones(shape)
    return torch.randn(shape, generator=generator).mul_(0.02)


def generate(args, layers: int, out: Path) -> int:
    """Write config + one shard per block of random weights (plus one for embeddings, norm, head);
    only one block's tensors exist in memory at a time. Returns the bytes written."""
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    config = llama_config(args, layers)
    with init_empty_weights():
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    out.mkdir(parents=True)
    config.save_pretrained(out)
    writer = ShardWriter(out, "1000GB")
    groups = [[k for k in shapes if k.startswith(f"model.layers.{i}.")] for i in range(layers)]
    groups.append([k for k in shapes if not k.startswith("model.layers.")])
    for i, names in enumerate(groups):
        generator = torch.Generator().manual_seed(args.seed + i)
        writer.add({name: _random(shapes[name], generator) for name in names})
        writer.flush()
    writer.close()
    return writer.total_bytes


# ---------------------------------------------------------------- workers (one measurement per process)


def _calibration(args) -> torch.Tensor:
    return torch.randint(0, args.vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))


def worker(args) -> None:
    """Prune ``args.source`` into ``args.out`` (lazy or in memory); print one JSON line of measurements."""
    torch.set_num_threads(2)
    import prunekit
    from prunekit.activations import peak_memory
    from prunekit.io.lazy import prune_lazy

    start = time.perf_counter()
    if args.worker == "imports":  # what the interpreter, torch and transformers cost before any model
        from transformers import LlamaForCausalLM  # noqa: F401

        print("RESULT " + json.dumps(peak_memory(torch.device("cpu"))), flush=True)
        return
    if args.worker == "lazy":
        report = prune_lazy(
            args.source,
            args.out,
            "wanda",
            0.5,
            args.pattern,
            calib=_calibration(args),
            device="cpu",
            batch_size=args.nsamples,
            save_format=args.save_format,
        )
        timings, where = report.timings, report.metrics["offload_activations"]
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.source)
        report = prunekit.prune(model, "wanda", 0.5, args.pattern, calib=_calibration(args), batch_size=args.nsamples)
        model.save_pretrained(args.out)
        timings, where = report.timings, "in memory"
    result = {
        "wall_s": time.perf_counter() - start,
        "sparsity": report.sparsity,
        "activations": where,
        "block_s": [v for k, v in timings.items() if k.startswith("block_")],
        **peak_memory(torch.device("cpu")),
    }
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(args, kind: str, source: Path, out: Path, pattern: str | None, save_format: str = "dense") -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--source",
        str(source),
        "--out",
        str(out),
        "--save-format",
        save_format,
        "--vocab",
        str(args.vocab),
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
    ] + (["--pattern", pattern] if pattern else [])
    print("running:", " ".join(command[2:]), flush=True)
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} worker failed:\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


# ---------------------------------------------------------------- comparisons and the report


def identical(a: Path, b: Path) -> bool:
    """Every tensor of checkpoint ``a`` equals ``b``'s bit for bit (read one tensor at a time)."""
    ca, cb = Checkpoint(a), Checkpoint(b)
    if set(ca.names()) != set(cb.names()):
        return False
    for name in ca.names():
        x, y = ca.read([name])[name], cb.read([name])[name]
        if x.dtype != y.dtype or not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
            return False
    return True


def measure(args, kind: str, layers: int, work: Path, pattern: str | None = None, save_format: str = "dense") -> dict:
    source, out = work / f"src-{layers}", work / f"out-{kind}-{layers}-{pattern or 'unstructured'}"
    if not source.exists():
        start = time.perf_counter()
        size = generate(args, layers, source)
        print(
            f"generated {layers}-layer checkpoint: {size / GIB:.2f} GiB in {time.perf_counter() - start:.0f}s",
            flush=True,
        )
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    result = run_worker(args, kind, source, out, pattern, save_format)
    result["started"] = started
    size = Checkpoint(source).nbytes(Checkpoint(source).names())
    result.update(
        layers=layers,
        checkpoint_bytes=size,
        rss_over_checkpoint=result["peak_rss_bytes"] / size,
        pattern=pattern or "50% unstructured",
        save_format=save_format,
        out_bytes=sum(p.stat().st_size for p in out.iterdir()),
    )
    print(json.dumps(result), flush=True)
    return result


def extrapolate(small: dict, layers: int) -> float:
    """Wall time of a lazy run over ``layers`` blocks from a small run's fixed cost and time per block
    (+15%: the page cache no longer holds the input)."""
    per_block = sum(small["block_s"]) / len(small["block_s"])
    return small["wall_s"] - sum(small["block_s"]) + per_block * layers * 1.15


def plan_layers(args, small: dict) -> int:
    """The most blocks (up to the full model) whose lazy run fits the time budget."""
    fits = [n for n in range(args.small_layers, args.layers + 1) if extrapolate(small, n) <= args.budget_min * 60]
    return max(fits, default=args.small_layers)


def _big_lines(result: dict) -> list[str]:
    name, big = next((k, v) for k, v in result["runs"].items() if k.startswith("lazy big"))
    ram = result["machine"]
    return [
        f"{name}: checkpoint {big['checkpoint_bytes'] / GIB:.2f} GiB vs {ram['ram_available_bytes'] / GIB:.2f} "
        f"GiB RAM available at start (larger: **{big['exceeds_available_ram']}**) and "
        f"{ram['ram_total_bytes'] / GIB:.2f} GiB total (larger: {big['exceeds_total_ram']}).",
        "",
    ]


def markdown(result: dict) -> str:
    rows = [
        "| run | sparsity | layers | checkpoint | peak RSS | RSS / checkpoint | wall | s / block | activations "
        "| output |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["runs"].items():
        per_block = sum(r["block_s"]) / max(len(r["block_s"]), 1)
        rows.append(
            f"| {name} | {r['pattern']} | {r['layers']} | {r['checkpoint_bytes'] / GIB:.2f} GiB | "
            f"{r['peak_rss_bytes'] / GIB:.2f} GiB | {r['rss_over_checkpoint']:.3f} | {r['wall_s']:.0f} s | "
            f"{per_block:.1f} | {r['activations']} | {r['save_format']} |"
        )
    m = result["machine"]
    return "\n".join(
        [
            "# Memory: lazy (block-by-block) pruning vs in-memory",
            "",
            f"Wanda, calibration {result['nsamples']} x {result['seqlen']} random tokens, LLaMA shape hidden "
            f"{result['shape']['hidden']}, intermediate {result['shape']['intermediate']}, vocab "
            f"{result['shape']['vocab']}, fp32, random weights. CPU only ({m['cpus']} cores, torch threads 2), "
            f"{m['ram_total_bytes'] / GIB:.1f} GiB RAM ({m['ram_available_bytes'] / GIB:.1f} GiB available at "
            "start); no GPU. Peak RSS = the worker process's ru_maxrss, which includes "
            f"{m['import_baseline_rss_bytes'] / GIB:.2f} GiB for Python + torch + transformers before any model "
            "(a worker that only imports them).",
            "",
            *rows,
            "",
            *_big_lines(result),
            f"Lazy and in-memory outputs of the {result['small_layers']}-layer model bit-identical: "
            f"**{result['small_outputs_identical']}**.",
            "",
            f"Lazy wall time extrapolated to {result['shape']['layers']} layers from the "
            f"{result['small_layers']}-layer runs: "
            + ", ".join(f"{k} {v / 60:.1f} min" for k, v in result["extrapolated_full_s"].items())
            + ".",
            "",
            result["note"],
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default in (
        ("--layers", 32),
        ("--hidden", 4096),
        ("--intermediate", 11008),
        ("--heads", 32),
        ("--kv-heads", 32),
        ("--vocab", 32000),
        ("--small-layers", 2),
        ("--nsamples", 4),
        ("--seqlen", 64),
        ("--seed", 0),
    ):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--budget-min", type=float, default=25.0)
    parser.add_argument("--big-layers", type=int, default=0, help="layers of the big run (default: fit the budget)")
    parser.add_argument("--reuse-small", help="memory.json of an earlier run whose small runs to reuse")
    parser.add_argument("--workdir", default="/tmp/prunekit-memory-bench")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--worker", choices=["lazy", "memory", "imports"])
    parser.add_argument("--source")
    parser.add_argument("--out")
    parser.add_argument("--save-format", default="dense")
    parser.add_argument("--pattern", default=None)
    parser.add_argument("--big-pattern", default="2:4", help="sparsity pattern of the big run ('none' = 50%%)")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    run(args)


def run(args) -> None:
    torch.set_num_threads(2)
    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    work.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        "cpus": os.cpu_count(),
        "ram_total_bytes": psutil.virtual_memory().total,
        "ram_available_bytes": psutil.virtual_memory().available,
        "disk_free_bytes": shutil.disk_usage(work.parent).free,
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    try:
        runs, note = _runs(args, work, machine)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "shape": {
            "layers": args.layers,
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "vocab": args.vocab,
        },
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "small_layers": args.small_layers,
        "machine": machine,
        **runs,
        "note": note,
    }
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "memory.json").write_text(json.dumps(result, indent=2) + "\n")
    (results / "memory.md").write_text(markdown(result))
    print(markdown(result))


def _small_runs(args, work: Path, big_pattern: str | None) -> tuple[dict, bool]:
    """In-memory vs lazy on a model that fits (compared bit for bit), and lazy with the big run's pattern."""
    small = args.small_layers
    runs = {
        f"in-memory {small} layers": measure(args, "memory", small, work),
        f"lazy {small} layers": measure(args, "lazy", small, work),
    }
    same = identical(work / f"out-memory-{small}-unstructured", work / f"out-lazy-{small}-unstructured")
    if big_pattern:
        runs[f"lazy {small} layers {big_pattern}"] = measure(args, "lazy", small, work, big_pattern)
    shutil.rmtree(work)
    return runs, same


def _reused_small_runs(path: str) -> tuple[dict, bool]:
    """The small runs of an earlier invocation (same machine), so a bigger run need not repeat them."""
    old = json.loads(Path(path).read_text())
    return {k: v for k, v in old["runs"].items() if not k.startswith("lazy big")}, old["small_outputs_identical"]


def _runs(args, work: Path, machine: dict) -> tuple[dict, str]:
    small, big_pattern = args.small_layers, None if args.big_pattern == "none" else args.big_pattern
    machine["import_baseline_rss_bytes"] = run_worker(args, "imports", work, work, None)["peak_rss_bytes"]
    runs, same = _reused_small_runs(args.reuse_small) if args.reuse_small else _small_runs(args, work, big_pattern)
    small_big = list(runs.values())[-1]
    layers = args.big_layers or plan_layers(args, small_big)
    need = 2.2 * small_big["checkpoint_bytes"] / small * layers
    save_format = "dense" if shutil.disk_usage(work.parent).free > need else "compact"
    big = runs[f"lazy big ({layers} layers)"] = measure(args, "lazy", layers, work, big_pattern, save_format)
    big["exceeds_available_ram"] = big["checkpoint_bytes"] > machine["ram_available_bytes"]
    big["exceeds_total_ram"] = big["checkpoint_bytes"] > machine["ram_total_bytes"]
    note = (
        f"The big run used {layers} of {args.layers} layers"
        + (
            ""
            if layers == args.layers
            else f" (about {args.budget_min:.0f} minutes of wall time on this shared, busy machine); the full model "
            "is extrapolated above"
        )
        + f"; its output was written {save_format}"
        + ("" if save_format == "dense" else " because free disk was below 2.2x the checkpoint")
        + "."
        + (
            " The small (2-layer) rows come from an earlier invocation on the same machine (--reuse-small)."
            if args.reuse_small
            else ""
        )
    )
    extrapolated = {
        r["pattern"]: extrapolate(r, args.layers) for name, r in runs.items() if name.startswith(f"lazy {small} layers")
    }
    return {"runs": runs, "small_outputs_identical": same, "extrapolated_full_s": extrapolated}, note


if __name__ == "__main__":
    main()
