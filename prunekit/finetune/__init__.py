"""Fine-tuning pruned models: a causal-LM Lightning module, LoRA recovery, and ``prunekit finetune`` recipes
(image classification reuses ``prunekit.eval.image``).

Names are imported on first use, so the recipe (``prunekit.finetune.recipe``, which the CLI reads to offer its flags)
loads without Lightning.
"""

from __future__ import annotations

from ..exports import lazy_exports

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
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
