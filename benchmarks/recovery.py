"""Recovery after structured pruning on kjv-llama-5m: Shortened LLaMA's three schedules (Kim et al. 2024), each
trained on the next-token loss and by distillation from the dense model.

Pruning: ``depth`` at 25% (one of the four blocks, the default cosine score) and ``width`` at 20% (the default
Wanda-sp score), by the published protocol (128 windows of 256 tokens of kjv/train.txt, seed 0). Recovery: every
run is ``prunekit finetune`` itself (``run_finetune`` on a ``FinetuneRecipe``: it loads, prunes, recovers and
saves), with the same budget: ``--steps`` optimizer steps of ``--batch`` x ``--seqlen`` tokens of kjv/train.txt,
drawn in the same seeded order (full+lora: the LoRA stage continues the stream where the full stage stopped, so
every schedule sees the same tokens). ``lora``: adapters r 16, alpha 32 on every pruned Linear, lr 1e-3;
``full``: every weight (continued pre-training), lr 3e-4; ``full+lora``: half the steps each, with those rates;
10 warm-up steps and cosine decay per stage, AdamW, no weight decay. Loss: ``next-token`` (the model's own), or
``distil`` = T^2 KL(teacher || student) on the logits, T = 1, task loss weight 0, the teacher a frozen copy of the
dense model. A control trains the dense model on next-token loss for the same budget (is it recovery or just more
training?). Perplexity: kjv/test.txt in non-overlapping 256-token windows (METRICS.md), of the saved model,
reloaded with ``prunekit.load``.

    python benchmarks/recovery.py [--steps 300] [--methods depth width] [--threads 1]
Writes benchmarks/results/recovery.{json,md}; finished runs are kept, so an interrupted benchmark resumes (several
processes, e.g. one per method, may share the file). Quality numbers do not depend on the machine's load; the
training times in the JSON do (see ``--part cost`` for the timing of the distillation's cost on an idle machine).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import prunekit
from prunekit.api import versions
from prunekit.data import load_text, tokenize
from prunekit.eval import perplexity
from prunekit.finetune import run_finetune
from prunekit.finetune.recipe import FinetuneRecipe
from prunekit.io import load_causal_lm, load_tokenizer, write_json

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
RESULTS = ROOT / "benchmarks" / "results"
MODEL, TRAIN, TEST = FIXTURES / "kjv-llama-5m", FIXTURES / "kjv" / "train.txt", FIXTURES / "kjv" / "test.txt"
PRUNE = {"depth": dict(method="depth", sparsity=0.25), "width": dict(method="width", sparsity=0.2)}
CALIBRATION = dict(nsamples=128, seqlen=256, seed=0)
SCHEDULES = ("lora", "full", "full+lora")
LOSSES = {"next-token": {}, "distil": dict(kd_weight=1.0, kd_temperature=1.0, task_loss_weight=0.0)}
CLOSE = 0.005  # runs within this fraction of the best perplexity are not ranked (one seed each)
TRAINING = dict(lr=3e-4, lora_lr=1e-3, lora={"r": 16, "alpha": 32}, warmup_steps=10, weight_decay=0.0)


def recipe(method: str, schedule: str, loss: str, steps: int, batch: int, seqlen: int, out: Path) -> FinetuneRecipe:
    """The ``prunekit finetune`` recipe of one run (``method`` None: the dense control, nothing pruned)."""
    prune = PRUNE[method] if method else dict(method="magnitude", sparsity=0.0)
    training = {k: v for k, v in TRAINING.items() if schedule != "full" or not k.startswith("lora")}
    return FinetuneRecipe(
        model=str(MODEL),
        calib_data=str(TRAIN),
        train_data=str(TRAIN),
        **prune,
        **CALIBRATION,
        recovery=schedule,
        max_steps=steps,
        train_batch_size=batch,
        train_seqlen=seqlen,
        **training,
        **LOSSES[loss],
        out=str(out),
    )


def run_one(method: str | None, schedule: str, loss: str, args, test: torch.Tensor) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model"
        report = run_finetune(recipe(method, schedule, loss, args.steps, args.batch, args.seqlen, out))
        model = prunekit.load(out)
        params = sum(p.numel() for p in model.parameters())
        ppl = perplexity(model, test, 256, batch_size=8)
    kd = [row for row in (report.get("distillation") or {}).get("steps", [])]
    return {
        "method": method or "dense (control)",
        "schedule": schedule,
        "loss": loss,
        "ppl": ppl,
        "params": params,
        "structure": _structure(report),
        "finetune_s": report["timings"]["finetune_s"],
        "kd_first10": _mean([r["kd"] for r in kd[:10]]),
        "kd_last10": _mean([r["kd"] for r in kd[-10:]]),
    }


def _structure(report: dict) -> dict | None:
    """What pruning removed (the same in every run of a method: it is seeded)."""
    structure = report.get("structure")
    return {k: v for k, v in structure.items() if k != "block_scores"} if structure else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def baselines(methods: list[str], test: torch.Tensor) -> dict[str, Any]:
    """Dense and pruned perplexity (each method pruned once, as every run prunes it)."""
    tok = load_tokenizer(MODEL)
    dense = load_causal_lm(MODEL)
    out = {"dense": {"ppl": perplexity(dense, test, 256, batch_size=8), "params": _params(dense)}}
    for method in methods:
        model = copy.deepcopy(dense)
        report = prunekit.prune(model, **PRUNE[method], calib=str(TRAIN), tokenizer=tok, **CALIBRATION)
        out[method] = {"ppl": perplexity(model, test, 256, batch_size=8), "params": _params(model)}
        out[method]["structure"] = {k: v for k, v in report.structure.items() if k != "block_scores"}
    return out


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- results file shared by several processes


@contextlib.contextmanager
def results_file(path: Path):
    """The results as a dict, read and written back under an exclusive lock on their folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        results = json.loads(path.read_text()) if path.exists() else {}
        yield results
        write_json(path, results)
    finally:
        os.close(folder)  # releases the lock


def key(method: str | None, schedule: str, loss: str) -> str:
    return f"{method or 'dense'}/{schedule}/{loss}"


def plan(methods: list[str], control: bool) -> list[tuple[str | None, str, str]]:
    runs = [(m, s, loss) for m in methods for s in SCHEDULES for loss in LOSSES]
    return runs + ([(None, "full", "next-token")] if control else [])


# ---------------------------------------------------------------- cost of distillation


def cost(args) -> dict[str, Any]:
    """Training time of each schedule with and without distillation (depth 25%, ``--cost-steps`` steps; wall-clock,
    so run it on an idle machine)."""
    timings = {}
    for schedule in SCHEDULES:
        for loss in LOSSES:
            with tempfile.TemporaryDirectory() as tmp:
                r = recipe("depth", schedule, loss, args.cost_steps, args.batch, args.seqlen, Path(tmp) / "m")
                timings[f"{schedule}/{loss}"] = run_finetune(r)["timings"]["finetune_s"]
    return {"steps": args.cost_steps, "threads": args.threads, "finetune_s": timings}


def memory(args) -> dict[str, Any]:
    """What distillation keeps in memory beyond plain training (exact, from the model's sizes)."""
    dense = load_causal_lm(MODEL)
    return {
        "batch": args.batch,
        "seqlen": args.seqlen,
        "teacher_weight_bytes": sum(p.numel() * p.element_size() for p in dense.parameters()),
        "teacher_logits_bytes_per_step": args.batch * args.seqlen * dense.config.vocab_size * 4,
    }


def cost_lines(c: dict[str, Any]) -> list[str]:
    lines = [
        "## What distillation costs",
        "",
        f"Memory: the teacher's weights, {c['teacher_weight_bytes'] / 2**20:.1f} MiB here (one more copy of the dense "
        "model, without gradients or optimizer state), and per step its logits (float32), "
        f"{c['teacher_logits_bytes_per_step'] / 2**20:.1f} MiB at {c['batch']} x {c['seqlen']} tokens "
        "of a 4,096-token vocabulary.",
    ]
    t = c.get("finetune_s")
    if t:
        lines += [
            "",
            f"Time: {c['steps']} training steps (depth 25%), {c['threads']} thread(s), measured on an idle machine:",
            "",
            "| recovery | next-token s | distil s | distil / next-token |",
            "|---|---|---|---|",
        ]
        for schedule in SCHEDULES:
            ce, kd = t[f"{schedule}/next-token"], t[f"{schedule}/distil"]
            lines.append(f"| {schedule} | {ce:.1f} | {kd:.1f} | {kd / ce:.2f}x |")
    return lines


# ---------------------------------------------------------------- markdown


def markdown(results: dict[str, Any]) -> str:
    s, base = results["settings"], results["baselines"]
    rows = results["runs"]
    lines = [
        "# Recovery after structured pruning (kjv-llama-5m, CPU)",
        "",
        f"Every run: `prunekit finetune` with {s['steps']} steps of {s['batch']} x {s['seqlen']} tokens of "
        f"kjv/train.txt ({s['steps'] * s['batch'] * s['seqlen']:,} tokens, the same seeded stream for every "
        "schedule); LoRA r 16, alpha 32, lr 1e-3; full fine-tuning lr 3e-4; full+lora half the steps each; "
        "10 warm-up steps, cosine. *distil*: T^2 KL(dense teacher || student) on the logits, T = 1, no next-token "
        "term. Perplexity on kjv/test.txt, 256-token windows, of the saved model reloaded.",
        "",
        f"Dense: {base['dense']['ppl']:.2f} ({base['dense']['params']:,} parameters).",
        "",
        "| pruning | params | pruned ppl | recovery | next-token ppl | distil ppl | gain by distilling |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in [m for m in PRUNE if m in base]:
        for schedule in SCHEDULES:
            ce, kd = rows.get(key(method, schedule, "next-token")), rows.get(key(method, schedule, "distil"))
            gain = f"{ce['ppl'] - kd['ppl']:+.2f}" if ce and kd else "–"
            lines.append(
                f"| {_name(method)} | {base[method]['params']:,} | {base[method]['ppl']:.2f} | {schedule} | "
                f"{_ppl(ce)} | {_ppl(kd)} | {gain} |"
            )
    control = rows.get(key(None, "full", "next-token"))
    if control:
        lines += ["", f"Control: the dense model, full fine-tuning on next-token loss, same budget: {_ppl(control)}."]
    lines += ["", *verdict(results)]
    if results.get("cost"):
        lines += ["", *cost_lines(results["cost"])]
    return "\n".join(lines) + "\n"


def verdict(results: dict[str, Any]) -> list[str]:
    """Which recovery wins, per pruning, and by how much (perplexity points and percent)."""
    base, rows, out = results["baselines"], results["runs"], []
    for method in [m for m in PRUNE if m in base]:
        done = {(r["schedule"], r["loss"]): r["ppl"] for k, r in rows.items() if k.startswith(f"{method}/")}
        if len(done) < len(SCHEDULES) * len(LOSSES):
            continue
        ranked = sorted(done.items(), key=lambda item: item[1])
        (best, best_ppl), (second, second_ppl) = ranked[0], ranked[1]
        pruned = base[method]["ppl"]
        close = [name for name, ppl in ranked[1:] if ppl - best_ppl < CLOSE * best_ppl]
        gains = [done[(schedule, "next-token")] - done[(schedule, "distil")] for schedule in SCHEDULES]
        out.append(
            f"- **{_name(method)}**: {best[0]} + {best[1]} is best at {best_ppl:.2f} (pruned {pruned:.2f}, dense "
            f"{base['dense']['ppl']:.2f}: it recovers {_recovered(pruned, best_ppl, base['dense']['ppl'])} of the "
            f"gap), {second_ppl - best_ppl:.2f} below the runner-up ({second[0]} + {second[1]}) and "
            f"{ranked[-1][1] - best_ppl:.2f} below the last ({ranked[-1][0][0]} + {ranked[-1][0][1]}). "
            f"Perplexity gained by distilling instead of the next-token loss: "
            f"{', '.join(f'{g:+.2f}' for g in gains)} for {', '.join(SCHEDULES)}."
            + (
                f" {len(close)} other run(s) lie within {CLOSE:.1%} of the best; with one seed per run this budget "
                "does not rank them."
                if close
                else ""
            )
        )
    return out


def _recovered(pruned: float, recovered: float, dense: float) -> str:
    return f"{100 * (pruned - recovered) / (pruned - dense):.0f}%" if pruned > dense else "–"


def _name(method: str) -> str:
    return {"depth": "depth 25% (cosine)", "width": "width 20% (Wanda-sp)"}.get(method, method)


def _ppl(row: dict | None) -> str:
    return f"{row['ppl']:.2f}" if row else "–"


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--methods", nargs="+", choices=list(PRUNE), default=list(PRUNE))
    parser.add_argument("--control", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cost", action="store_true", help="only time each schedule with and without distillation")
    parser.add_argument("--cost-steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--test-tokens", type=int, default=None, help="only this many test tokens (to try the script)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    path = args.out / "recovery.json"
    settings = {"steps": args.steps, "batch": args.batch, "seqlen": args.seqlen, **TRAINING, "losses": LOSSES}
    settings["test_tokens"] = args.test_tokens
    test = tokenize(load_tokenizer(MODEL), load_text(TEST))[: args.test_tokens]
    with results_file(path) as results:
        if results.get("settings") not in (None, settings):
            raise SystemExit(f"{path} holds runs with other settings {results['settings']}; move it away first")
        results["settings"], results["versions"] = settings, versions()
        missing = [m for m in args.methods if m not in results.get("baselines", {})]
    if args.cost:
        found = cost(args)
        with results_file(path) as results:
            results["cost"] = {**results.get("cost", {}), **found}
            (args.out / "recovery.md").write_text(markdown(results))
        return
    if missing or "dense" not in results.get("baselines", {}):
        found = baselines(missing, test)
        with results_file(path) as results:
            results["baselines"] = {**results.get("baselines", {}), **found}
    for run in plan(args.methods, args.control):
        with results_file(path) as results:
            if key(*run) in results.get("runs", {}):
                continue
        start = time.perf_counter()
        row = run_one(*run, args, test)
        print(f"{key(*run)}: ppl {row['ppl']:.2f} ({time.perf_counter() - start:.0f}s)", flush=True)
        with results_file(path) as results:
            if run[0]:  # every run prunes as the baseline did (seeded calibration)
                same = json.loads(json.dumps(row["structure"])) == results["baselines"][run[0]]["structure"]
                row["same_pruning_as_baseline"] = same
            results.setdefault("runs", {})[key(*run)] = row
    with results_file(path) as results:
        results["cost"] = {**results.get("cost", {}), **memory(args)}
        (args.out / "recovery.md").write_text(markdown(results))
    print((args.out / "recovery.md").read_text())


if __name__ == "__main__":
    main()
