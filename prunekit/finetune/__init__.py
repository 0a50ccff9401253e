"""Fine-tuning pruned models: a causal-LM Lightning module, LoRA recovery, and ``prunekit finetune`` recipes
(image classification reuses ``prunekit.eval.image``)."""

from .causal_lm import CausalLMModule, TextDataModule, TokenWindows
from .lora import add_lora, keep_masks, lora_targets, mask_lora_deltas, merge_lora_keep_sparsity
from .recipe import FinetuneRecipe, load_finetune_recipe
from .run import run_finetune, run_finetune_recipe

__all__ = [
    "CausalLMModule",
    "FinetuneRecipe",
    "TextDataModule",
    "TokenWindows",
    "add_lora",
    "keep_masks",
    "load_finetune_recipe",
    "lora_targets",
    "mask_lora_deltas",
    "merge_lora_keep_sparsity",
    "run_finetune",
    "run_finetune_recipe",
]
