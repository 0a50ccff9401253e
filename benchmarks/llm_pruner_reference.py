"""Run the published LLM-Pruner code (horseee/LLM-Pruner, its GQA script ``llama3.py``) on kjv-llama-5m and
record what it keeps: per block, the KV groups and MLP channels that survive, the importance of every unit,
the parameter count and the perplexity. ``benchmarks/taylor_width.py`` compares prunekit's Taylor width with it.

The published code is not part of prunekit: fetch it and pass its folder (this script adds it to ``sys.path``)::

    git --git-dir=<mirror of horseee/LLM-Pruner> archive 128a07d LLMPruner llama3.py | tar x -C /work/ref/LLM-Pruner
    python benchmarks/llm_pruner_reference.py --repo /work/ref/LLM-Pruner

Its pruner, dependency graph and ``TaylorImportance`` run unchanged. What this driver changes, as METRICS.md
describes for the published numbers: ``LLMPruner/__init__.py`` must not import the unused model zoo (it needs
sentencepiece; empty the file); the model loads in float32 on the CPU from the local checkpoint with eager
attention and ``use_cache=False``; the dependency graph is traced from ``logits`` (transformers 5 returns a
``ModelOutput`` whose cache object the tracer cannot flatten) on a calibration window (the script's own
LLaMA-vocabulary ids are out of range here); the calibration windows are prunekit's draw (``--nsamples 10
--seqlen 64 --seed 0`` of ``kjv/train.txt``) instead of bookcorpus; and attention is not pruned where less
than one whole KV group is due (at ratio 0.2 the script asks for 0.8 of a group and crashes). Everything else
follows ``llama3.py --block_wise``: the same ``MetaPruner`` arguments (local pruning, one step, ``k_proj`` and
``gate_proj`` of the chosen layers as roots, consecutive groups of ``head_dim``), one backward pass of the mean
next-token loss over all windows, and for ``param_second`` / ``param_mix`` its per-window loop that accumulates
the squared gradients first.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunekit.data import load_text, random_windows, tokenize
from prunekit.eval import perplexity

ROOT = Path(__file__).resolve().parents[1]
# (ratio, first pruned block, end block (exclusive), taylor): METRICS.md's cells and the vectorize column.
CELLS = [
    (0.2, 0, 4, "param_first"),
    (0.5, 0, 4, "param_first"),
    (0.2, 1, 3, "param_first"),
    (0.5, 1, 3, "param_first"),
    (0.2, 0, 4, "vectorize"),
    (0.5, 0, 4, "vectorize"),
    (0.5, 0, 4, "param_second"),
    (0.5, 0, 4, "param_mix"),
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", required=True, help="folder holding the published LLMPruner package")
    p.add_argument("--fixtures", default=str(ROOT / ".." / "shared" / "fixtures"))
    p.add_argument("--nsamples", type=int, default=10)
    p.add_argument("--seqlen", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reduction", default="sum", help="LLM-Pruner's --grouping_strategy")
    p.add_argument("--cells", type=int, nargs="*", help="indices into CELLS (default: all)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "llm_pruner_reference.json"))
    return p.parse_args()


def backward(model, examples: torch.Tensor, taylor: str) -> None:
    """llama3.py's gradient step: for the second-order variants, each window's squared gradient / N into
    ``acc_grad`` first; then one backward of the mean loss over all windows into ``.grad``."""
    if taylor in ("param_mix", "param_second"):
        for j in range(examples.shape[0]):
            batch = examples[j].unsqueeze(0)
            model(batch, labels=batch).loss.backward()
            for p in model.parameters():
                p.grad = p.grad * p.grad / examples.shape[0]
                if hasattr(p, "acc_grad"):
                    p.acc_grad += p.grad
                else:
                    p.acc_grad = copy.deepcopy(p.grad)
            model.zero_grad()
    model(examples, labels=examples).loss.backward()


def unit_importance(pruner, tp, group) -> list[float]:
    """The importance MetaPruner.prune_local ranks: the group's, folded over consecutive channels."""
    imp = pruner.estimate_importance(group, consecutive_groups=pruner.get_consecutive_groups(group))
    consecutive = pruner.get_consecutive_groups(group)
    return (imp.view(-1, consecutive).sum(1) if consecutive > 1 else imp).tolist()


def run_cell(dense, examples, test, ratio: float, start: int, end: int, taylor: str, reduction: str) -> dict:
    import LLMPruner.torch_pruning as tp
    from LLMPruner.pruner import hf_llama_pruner as llama_pruner
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    model = copy.deepcopy(dense)
    for p in model.parameters():
        p.requires_grad_(True)
    before = sum(p.numel() for p in model.parameters())
    layers = model.model.layers
    kv_heads = layers[0].self_attn.k_proj.out_features // layers[0].self_attn.head_dim
    attention = range(start, end) if int(ratio * kv_heads) >= 1 else range(0)  # whole KV groups only
    roots = [layers[i].self_attn.k_proj for i in attention] + [layers[i].mlp.gate_proj for i in range(start, end)]
    pruner = tp.pruner.MetaPruner(
        model,
        examples[:2],
        importance=llama_pruner.TaylorImportance(group_reduction=reduction, taylor=taylor),
        global_pruning=False,
        iterative_steps=1,
        ch_sparsity=ratio,
        ignored_layers=[],
        channel_groups={},
        consecutive_groups={layer.self_attn.k_proj: layer.self_attn.head_dim for layer in layers},
        customized_pruners={LlamaRMSNorm: llama_pruner.hf_rmsnorm_pruner},
        root_module_types=None,
        root_instances=roots,
        output_transform=lambda out: out.logits,
    )
    model.zero_grad()
    backward(model, examples, taylor)
    where = {
        m: (i, kind)
        for i, layer in enumerate(layers)
        for kind, m in (("heads", layer.self_attn.k_proj), ("channels", layer.mlp.gate_proj))
    }
    units = {}
    for group in pruner.DG.get_all_groups(ignored_layers=[], root_module_types=None, root_instances=roots):
        i, kind = where[group[0][0].target.module]
        importance = unit_importance(pruner, tp, group)
        units[f"{i}.{kind}"] = {"units": len(importance)}
        if kind == "heads":  # few enough to keep: they show how close the choice was
            units[f"{i}.{kind}"]["importance"] = importance
    for group in pruner.step(interactive=True):
        i, kind = where[group[0][0].target.module]
        per = layers[i].self_attn.head_dim if kind == "heads" else 1
        total = units[f"{i}.{kind}"]["units"]
        removed = sorted({idx // per for idx in group[0][1]})
        units[f"{i}.{kind}"]["kept"] = [u for u in range(total) if u not in removed]
        group.prune()
    for layer in layers:  # llama3.py: inference attributes follow the new shapes
        layer.self_attn.num_heads = layer.self_attn.q_proj.weight.shape[0] // layer.self_attn.head_dim
        layer.self_attn.num_key_value_heads = layer.self_attn.k_proj.weight.shape[0] // layer.self_attn.head_dim
    model.zero_grad()
    for p in model.parameters():
        p.requires_grad_(False)
    after = sum(p.numel() for p in model.parameters())
    ppl = perplexity(model.eval(), test, 256)
    print(f"LLM-Pruner {taylor} ratio {ratio} layers {start}-{end - 1}: {after:,} params, ppl {ppl:.3f}", flush=True)
    return {
        "ratio": ratio,
        "layers": [start, end - 1],
        "taylor": taylor,
        "reduction": reduction,
        "params_before": before,
        "params_after": after,
        "ppl": ppl,
        "units": units,
    }


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(Path(args.repo).resolve()))
    torch.set_num_threads(2)
    fixtures = Path(args.fixtures)
    tok = AutoTokenizer.from_pretrained(fixtures / "kjv-llama-5m")
    dense = AutoModelForCausalLM.from_pretrained(fixtures / "kjv-llama-5m", attn_implementation="eager").eval()
    dense.config.use_cache = False
    train = tokenize(tok, load_text(fixtures / "kjv" / "train.txt"))
    examples = random_windows(train, args.nsamples, args.seqlen, args.seed)
    test = tokenize(tok, load_text(fixtures / "kjv" / "test.txt"))
    cells = [CELLS[i] for i in args.cells] if args.cells else CELLS
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {"runs": []}
    result.update(
        {
            "code": "horseee/LLM-Pruner 128a07d, llama3.py --block_wise (driver: benchmarks/llm_pruner_reference.py)",
            "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed},
            "dense_ppl": perplexity(dense, test, 256),
        }
    )
    for ratio, start, end, taylor in cells:
        run = run_cell(dense, examples, test, ratio, start, end, taylor, args.reduction)
        key = (run["ratio"], tuple(run["layers"]), run["taylor"], run["reduction"])
        result["runs"] = [
            r for r in result["runs"] if (r["ratio"], tuple(r["layers"]), r["taylor"], r["reduction"]) != key
        ]
        result["runs"].append(run)
        out.write_text(json.dumps(result) + "\n")  # one line: the kept-unit lists are long


if __name__ == "__main__":
    main()
