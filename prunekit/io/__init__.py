"""Loading and saving models: Hugging Face, timm, compact sparse checkpoints; claimed, atomic outputs."""

from .atomic import OutputClaim, atomic_dir, check_output_dir, claim_output, write_json
from .hf import load_causal_lm, load_tokenizer, parse_dtype
from .models import load, save, write_model
from .paths import check_dir_writable, check_file_writable, check_free_space, check_paths, looks_local, require_local

__all__ = [
    "OutputClaim",
    "atomic_dir",
    "check_dir_writable",
    "check_file_writable",
    "check_free_space",
    "check_output_dir",
    "check_paths",
    "claim_output",
    "load",
    "load_causal_lm",
    "load_tokenizer",
    "looks_local",
    "parse_dtype",
    "require_local",
    "save",
    "write_json",
    "write_model",
]
