"""Loading and saving models: Hugging Face, timm, compact sparse checkpoints; claimed, atomic outputs.

Names are imported on first use, so ``prunekit.io.paths`` (path checks the CLI and recipes use) loads without torch.
"""

from __future__ import annotations

from ..exports import lazy_exports

_EXPORTS = {
    "OutputClaim": "atomic",
    "atomic_dir": "atomic",
    "check_output_dir": "atomic",
    "claim_output": "atomic",
    "write_json": "atomic",
    "load_causal_lm": "hf",
    "load_tokenizer": "hf",
    "parse_dtype": "hf",
    "load": "models",
    "save": "models",
    "write_model": "models",
    "check_dir_writable": "paths",
    "check_file_writable": "paths",
    "check_free_space": "paths",
    "check_paths": "paths",
    "looks_local": "paths",
    "require_local": "paths",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
