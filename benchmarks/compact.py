"""Compact sparse checkpoints: size on disk vs dense safetensors, and an exact round trip, on kjv-llama-5m
pruned with Wanda (50% unstructured and 2:4; fp32 and fp16). Then the 2:4 semi-structured speed test,
which runs only on a CUDA GPU with compute capability >= 8.0 (recorded as skipped otherwise).

    python benchmarks/compact.py [--fixtures ../shared/fixtures]

Writes benchmarks/results/compact.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # huge pages, as the prunekit command sets them

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import prunekit  # noqa: E402
from prunekit.io.compact import CompactReader, load_compact, save_compact  # noqa: E402
from prunekit.io.semistructured import benchmark, unsupported_reason  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def dense_size(state: dict[str, torch.Tensor], path: Path) -> int:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    return path.stat().st_size


def restored_exactly(state: dict[str, torch.Tensor], restored: dict[str, torch.Tensor]) -> dict[str, int | bool]:
    """Bit-identical apart from the sign of zeros (the format stores +0.0 for a dropped -0.0)."""
    same_bits, negative_zeros = True, 0
    for name, t in state.items():
        r = restored[name]
        canon, canon_r = t.masked_fill(t == 0, 0), r.masked_fill(r == 0, 0)
        same_bits &= t.dtype == r.dtype and torch.equal(canon.view(torch.uint8), canon_r.view(torch.uint8))
        negative_zeros += int(((t == 0) & t.signbit()).sum()) if t.is_floating_point() else 0
    equal = set(state) == set(restored) and all(torch.equal(state[k], restored[k]) for k in state)
    return {"torch_equal": equal, "bits_equal_up_to_zero_sign": same_bits, "negative_zeros_in_input": negative_zeros}


def layer_ratio(model, path: Path) -> float:
    """Stored bytes of the pruned layers' weights (values + mask or index) over their dense bytes."""
    from safetensors import safe_open

    infos = CompactReader(path).infos
    names = [f"{n}.weight" for n in prunekit.select_layers(model)]
    with safe_open(str(path), framework="pt") as f:
        stored = sum(_nbytes(f.get_tensor(k)) for n in names for k in infos[n]["keys"])
    return stored / sum(_nbytes(model.get_parameter(n)) for n in names)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def measure(model, label: str, work: Path) -> dict:
    state = model.state_dict()
    dense = dense_size(state, work / f"{label}-dense.safetensors")
    start = time.perf_counter()
    formats = save_compact(model, work / f"{label}.safetensors")
    save_s = time.perf_counter() - start
    start = time.perf_counter()
    restored = load_compact(work / f"{label}.safetensors")
    load_s = time.perf_counter() - start
    compact = (work / f"{label}.safetensors").stat().st_size
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(restored)
    tokens = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        same_logits = torch.equal(model(tokens).logits, fresh(tokens).logits)
    return {
        "dense_bytes": dense,
        "compact_bytes": compact,
        "ratio": compact / dense,
        "pruned_layers_ratio": layer_ratio(model, work / f"{label}.safetensors"),
        "formats": formats,
        "save_s": save_s,
        "load_s": load_s,
        "same_logits": same_logits,
        **restored_exactly(state, restored),
    }


def semi_structured(model) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reason = unsupported_reason(device)
    if reason is not None:
        print(f"2:4 speed benchmark skipped: {reason}")
        return {"skipped": reason}
    return benchmark(copy.deepcopy(model).half().to(device))


def markdown(result: dict) -> str:
    rows = [
        "| pruning | dtype | dense | compact | compact / dense | pruned layers only | formats | round trip |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, r in result["runs"].items():
        pruning, dtype = key.split(" / ")
        exact = "exact" if r["torch_equal"] and r["bits_equal_up_to_zero_sign"] and r["same_logits"] else "NOT exact"
        rows.append(
            f"| {pruning} | {dtype} | {r['dense_bytes'] / 1e6:.2f} MB | {r['compact_bytes'] / 1e6:.2f} MB | "
            f"{r['ratio']:.3f} | {r['pruned_layers_ratio']:.3f} | {r['formats']} | {exact} |"
        )
    speed = result["semi_structured"]
    speed_text = (
        f"Skipped: {speed['skipped']}"
        if "skipped" in speed
        else f"{speed['device']}: dense {speed['dense_tokens_per_s']:.0f} tokens/s, 2:4 "
        f"{speed['semi_structured_tokens_per_s']:.0f} tokens/s (x{speed['speedup']:.2f}), max |logit diff| "
        f"{speed['max_abs_logit_diff']:.3g}"
    )
    return "\n".join(
        [
            "# Compact sparse checkpoints",
            "",
            f"kjv-llama-5m pruned with Wanda ({result['calibration']}); every Linear in the decoder blocks pruned, "
            "embeddings, norms and head dense (stored as they are). Dense = the same state dict as one safetensors "
            "file. Round trip: `load_compact` gives tensors equal to the saved ones (`torch.equal`), bit for bit "
            "apart from zero signs (a pruned negative weight is -0.0 in the model and comes back +0.0), and the "
            "reloaded model gives identical logits. Measured on CPU.",
            "",
            *rows,
            "",
            f"{result['runs']['Wanda 50% / float32']['negative_zeros_in_input']} of the fp32 50% model's zeros are "
            "-0.0 (the engine prunes by `W * mask`).",
            "",
            "## 2:4 semi-structured speed (dense vs `to_semi_structured`, same run)",
            "",
            speed_text,
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixtures", default=str(ROOT.parent / "shared" / "fixtures"))
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(2)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(args.fixtures) / "kjv-llama-5m"
    tokenizer = AutoTokenizer.from_pretrained(path)
    runs, models = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for pattern in (None, "2:4"):
            model = AutoModelForCausalLM.from_pretrained(path).eval()
            prunekit.prune(
                model,
                "wanda",
                0.5,
                pattern=pattern,
                calib=Path(args.fixtures) / "kjv" / "train.txt",
                tokenizer=tokenizer,
                nsamples=args.nsamples,
                seqlen=args.seqlen,
            )
            name = "Wanda 2:4" if pattern else "Wanda 50%"
            models[name] = model
            for dtype in (torch.float32, torch.float16):
                variant = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
                label = f"{name} / {str(dtype).removeprefix('torch.')}"
                runs[label] = measure(variant, label.replace(" ", "_").replace("/", "").replace(":", ""), Path(tmp))
                print(label, json.dumps(runs[label]), flush=True)
    result = {
        "model": "kjv-llama-5m",
        "calibration": f"{args.nsamples} x {args.seqlen} tokens of kjv/train.txt, seed 0",
        "runs": runs,
        "semi_structured": semi_structured(models["Wanda 2:4"]),
        "torch": torch.__version__,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compact.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (RESULTS / "compact.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
