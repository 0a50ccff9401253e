"""Method registry. A new method is one file here plus one import line below."""
from .base import (HESSIAN, METHODS, NORMS, STRUCTURED, UPDATES, Method, ModelMethod, Target, Update, create_method,
                   create_update, mask_from_scores, register_method, register_structured, register_update)
from . import magnitude, wanda  # noqa: F401  (registration)

__all__ = ["HESSIAN", "METHODS", "NORMS", "STRUCTURED", "UPDATES", "Method", "ModelMethod", "Target", "Update",
           "create_method", "create_update", "mask_from_scores", "register_method", "register_structured",
           "register_update"]
