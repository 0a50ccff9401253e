"""Structured pruning that makes models smaller and faster: remove blocks (``depth``), heads and channels
(``width``), whole MoE experts (``experts``), or slice the residual stream after a PCA rotation
(``slicegpt``). Each is a ``ModelMethod`` in the ``STRUCTURED`` registry; the result is a plain dense model
whose config matches its new shapes."""

from .base import STRUCTURED, ModelMethod, register_structured
from .depth import Depth, remove_blocks
from .experts import Experts
from .slicegpt import SliceGPT
from .width import Width

__all__ = ["STRUCTURED", "Depth", "Experts", "ModelMethod", "SliceGPT", "Width", "register_structured", "remove_blocks"]
