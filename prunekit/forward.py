"""Running data through a model: the idioms every part of prunekit shares, written once.

* ``model_inputs`` / ``run_model``: a calibration batch (tensor, tuple or dict) as a model call, no KV cache;
* ``hidden_state`` / ``with_hidden`` / ``block_output``: which argument of a block call is the hidden state;
* ``hooks``, ``eval_mode``, ``on_device``: temporary model changes as context managers, always undone.

This module sits below the engine, the structured methods, BatchNorm recalibration and evaluation, and
imports none of them.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

Batch = torch.Tensor | Mapping[str, torch.Tensor]
# Keyword arguments of a block call that hold a KV cache (transformers 5 names it ``cache``): calibration never
# uses one, and a cache kept with a captured call would make every later call attend to stale keys.
CACHE_KWARGS = ("past_key_value", "past_key_values", "cache")


def without_cache(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A block call's keyword arguments without its KV cache (by name, or any transformers ``Cache`` object)."""
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover
        Cache = ()
    return {k: v for k, v in kwargs.items() if k not in CACHE_KWARGS and not isinstance(v, Cache)}


class StopForward(Exception):
    """Raised by a hook to end a forward pass early, once it has seen what it needed."""


def to_device(value: Any, device: torch.device | str | None) -> Any:
    """``value`` with every tensor inside (tuples, lists, dicts) moved to ``device``; ``None`` moves nothing."""
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def model_inputs(batch: Batch, device: torch.device | None) -> tuple[tuple, dict]:
    """A calibration batch as ``(args, kwargs)`` for ``model(...)``, on ``device``."""
    if isinstance(batch, Mapping):
        return (), {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return tuple(to_device(v, device) for v in batch), {}
    return (to_device(batch, device),), {}


def first_sample(batch: Batch) -> Batch:
    """The first item of a calibration batch (every tensor whose leading dimension is the batch size, cut to
    one), for probes that need the model's behaviour, not the data's. A batch holding a tensor of another leading
    size (Qwen2-VL packs every image's patches into one ``[patches, ...]`` tensor) cannot be cut by rows: the
    whole batch is the probe."""
    if isinstance(batch, Mapping):
        values = list(batch.values())
    else:
        values = list(batch) if isinstance(batch, (tuple, list)) else [batch]
    tensors = [t for t in values if isinstance(t, torch.Tensor) and t.dim() > 0]
    size = tensors[0].shape[0] if tensors else None
    if any(t.shape[0] != size for t in tensors):
        return batch

    def cut(value):
        return value[:1] if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size else value

    if isinstance(batch, Mapping):
        return {k: cut(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(cut(v) for v in batch)
    return cut(batch)


def run_model(model: nn.Module, batch: Batch, device: torch.device | None = None) -> Any:
    """``model(batch)`` on ``device`` without a KV cache (calibration never generates)."""
    args, kwargs = model_inputs(batch, device)
    if _takes_use_cache(model):
        kwargs.setdefault("use_cache", False)
    return model(*args, **kwargs)


def _takes_use_cache(model: nn.Module) -> bool:
    """Whether ``model(...)`` accepts ``use_cache`` (its config says so, or its forward names it: a LLaVA's
    top-level config has no ``use_cache``, its language model does and would build a cache)."""
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        return True
    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def target_module(pl_module: nn.Module, submodule: str | None = None) -> nn.Module:
    """The model a training callback works on: ``submodule`` of the LightningModule, else its ``model``, else
    the module itself."""
    if submodule:
        return pl_module.get_submodule(submodule)
    model = getattr(pl_module, "model", None)
    return model if isinstance(model, nn.Module) else pl_module


def model_device(model: nn.Module) -> torch.device:
    """Where the model's first parameter lives (CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


# ---------------------------------------------------------------- block calls


def hidden_state(args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor:
    """The hidden state a block receives: its first positional argument, else ``hidden_states=``, else its
    first keyword (blocks called with keywords only)."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next(iter(kwargs.values()))


def with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor | None) -> tuple[tuple, dict]:
    """The same block call with ``hidden`` as its hidden state."""
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
    return args, {**kwargs, key: hidden}


def block_output(output: Any) -> torch.Tensor:
    """The hidden state a block returns (HF blocks return a tuple whose first item it is)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def same_value(a: Any, b: Any) -> bool:
    """Whether two block arguments are equal: tensors by shape, dtype and values, containers item by item.
    Two blocks given equal arguments can share one captured copy; blocks given different ones (Gemma's sliding
    and full attention layers: different masks and rotary tables) each need their own."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and bool(torch.equal(a, b))
        )
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        return (
            isinstance(a, Mapping)
            and isinstance(b, Mapping)
            and a.keys() == b.keys()
            and all(same_value(a[k], b[k]) for k in a)
        )
    try:
        return bool(a == b)
    except Exception:  # objects without a meaningful ==: equal only when identical (checked above)
        return False


# ---------------------------------------------------------------- temporary changes


@contextmanager
def hooks(handles: Iterable[RemovableHandle]) -> Iterator[None]:
    """Keep the hooks ``handles`` registered for the body; remove them on exit, also when it raises."""
    handles = list(handles)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the body (no dropout, BatchNorm running statistics untouched); every submodule's own
    flag is restored on exit."""
    flags = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags.items():
            m.training = flag


@contextmanager
def on_device(module: nn.Module, device: torch.device | str | None) -> Iterator[nn.Module]:
    """Onload ``module`` to the compute device for the body, then put it back where it was."""
    if device is None:
        yield module
        return
    home = model_device(module)
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


@contextmanager
def outside_on_device(model: nn.Module, lists: Sequence[nn.Module], device: torch.device | None):
    """Every module outside the block ``lists`` on the compute device for the body."""
    if device is None:
        yield
        return
    home = model_device(model)
    inside = {id(m) for blocks in lists for m in blocks.modules()}
    outside = [m for m in model.modules() if id(m) not in inside]
    for m in outside:
        move_own(m, device)
    try:
        yield
    finally:
        for m in outside:
            move_own(m, home)


def move_own(module: nn.Module, device: torch.device) -> None:
    """Move a module's own parameters and buffers, not its children's (``Module.to`` is recursive)."""
    for p in module.parameters(recurse=False):
        p.data = p.data.to(device)
    for key, b in module.named_buffers(recurse=False):
        module._buffers[key] = b.to(device)


@contextmanager
def streamed_forward(model: nn.Module, lists: Sequence[nn.Module], device: torch.device | None):
    """The whole model runnable on ``device`` while holding one block of ``lists`` there at a time: everything
    outside the lists is moved there, each block is moved in for its own call and back after it."""
    if device is None:
        yield
        return
    home = model_device(model)
    blocks = [b for blocks in lists for b in blocks]

    def onload(module, args):
        module.to(device)

    def offload(module, args, output):
        module.to(home)

    handles = [b.register_forward_pre_hook(onload) for b in blocks] + [b.register_forward_hook(offload) for b in blocks]
    try:
        with outside_on_device(model, lists, device), hooks(handles):
            yield
    finally:
        for b in blocks:  # a forward ended by StopForward skips the block's offload hook
            b.to(home)
