"""Fine-tuning pruned models: causal-LM and image-classification Lightning modules, LoRA recovery, recipes."""
from .causal_lm import CausalLMModule, TextDataModule, TokenWindows
from .lora import add_lora, keep_masks, lora_targets, merge_lora_keep_sparsity

__all__ = ["CausalLMModule", "TextDataModule", "TokenWindows", "add_lora", "keep_masks", "lora_targets",
           "merge_lora_keep_sparsity"]
