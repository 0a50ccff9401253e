"""prunekit: prune vision and language models (magnitude, Wanda, SparseGPT, ADMM, ...), block by block.

Names are imported on first use, so ``import prunekit`` (and ``prunekit --help``) does not load torch.
"""

from __future__ import annotations

from .exports import lazy_exports

__version__ = "0.1.0"

# name -> module that defines it: the public API, including the extension points.
_EXPORTS = {
    "prune": "api",
    "plan_prune": "api",
    "PruneReport": "api",
    "PruneConfig": "config",
    "PrunekitError": "errors",
    "find_blocks": "graph",
    "find_layers": "graph",
    "select_layers": "graph",
    "METHODS": "methods",
    "UPDATES": "methods",
    "Criterion": "methods",
    "Solver": "methods",
    "Update": "methods",
    "Target": "methods",
    "register_method": "methods",
    "register_update": "methods",
    "GROUPS": "groups",
    "register_group": "groups",
    "ALLOCATORS": "allocate",
    "register_allocation": "allocate",
    "STRUCTURED": "structured",
    "register_structured": "structured",
    "LayerStats": "collect",
    "save": "io.models",
    "load": "io.models",
}
__all__ = sorted(_EXPORTS) + ["__version__"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
