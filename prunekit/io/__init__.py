"""Loading and saving models: Hugging Face, timm, compact sparse checkpoints; atomic outputs."""
from .atomic import atomic_dir, check_output_dir, write_json
from .hf import load_causal_lm, load_tokenizer, parse_dtype, save_causal_lm
from .models import load, save

__all__ = ["atomic_dir", "check_output_dir", "load_causal_lm", "load_tokenizer", "parse_dtype", "save_causal_lm",
           "write_json", "load", "save"]
