"""prunekit: prune vision and language models (magnitude, Wanda, SparseGPT, ADMM, ...), block by block."""
from .api import PruneReport, plan_prune, prune
from .graph import find_blocks, find_layers, select_layers
from .methods import METHODS, UPDATES

__version__ = "0.1.0"
__all__ = ["METHODS", "UPDATES", "PruneReport", "find_blocks", "find_layers", "plan_prune", "prune",
           "select_layers"]
