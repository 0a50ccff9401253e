"""Fine-tuning pruned models: a causal-LM Lightning module, LoRA recovery, and ``prunekit finetune`` recipes
(image classification reuses ``prunekit.eval.image``).

Names are imported on first use, so the recipe (``prunekit.finetune.recipe``, which the CLI reads to offer its flags)
loads without Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CausalLMModule": "causal_lm",
    "TextDataModule": "causal_lm",
    "TokenWindows": "causal_lm",
    "add_lora": "lora",
    "keep_masks": "lora",
    "lora_targets": "lora",
    "mask_lora_deltas": "lora",
    "merge_lora_keep_sparsity": "lora",
    "FinetuneRecipe": "recipe",
    "load_finetune_recipe": "recipe",
    "run_finetune": "run",
    "run_finetune_recipe": "run",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'prunekit.finetune' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
