"""Method registry. A new method is one file here plus one import line below."""
from .base import (HESSIAN, METHODS, NORMS, STRUCTURED, UPDATES, Method, ModelMethod, Target, Update, create_method,
                   create_update, mask_from_scores, register_method, register_structured, register_update)
from . import magnitude, wanda  # noqa: F401  (registration)
from . import admm, sparsegpt  # noqa: F401  (registration)
from . import dsnot, ria  # noqa: F401  (registration)

__all__ = ["HESSIAN", "METHODS", "NORMS", "STRUCTURED", "UPDATES", "Method", "ModelMethod", "Target", "Update",
           "create_method", "create_update", "mask_from_scores", "register_method", "register_structured",
           "register_update"]
from .. import structured  # noqa: E402,F401  (registration; last, as structured imports methods.base and engine)
