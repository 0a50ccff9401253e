"""Module-graph walker: find prunable layers and the model's repeated blocks.

Every prunable layer is a matmul ``W[out, cols] @ columns``: a Linear, a HF ``Conv1D`` (weight stored
transposed), a convolution (im2col columns, one matmul per group), or one expert's slice of a fused MoE
experts tensor (``prunekit.moe.ExpertWeight``). ``weight_matrix`` gives that view so collectors and methods
never special-case layer types.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable

import torch
from torch import nn

from .errors import PrunekitError
from .moe import ExpertWeight, expert_weights, gate_modules, is_fused_experts, parent_name, unknown_experts

log = logging.getLogger(__name__)

try:  # GPT-2 style layers; transformers is a dependency but keep the walker importable without it.
    from transformers.pytorch_utils import Conv1D as HFConv1D
except ImportError:  # pragma: no cover
    HFConv1D = ()

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_CONV_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
LAYER_TYPES = ("linear", "conv")  # "linear" also covers 1x1 convs and HF Conv1D: pointwise matmuls


def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, HFConv1D) + CONV_TYPES)


def is_pointwise_conv(module: nn.Module) -> bool:
    """A 1x1 (or 1x1x1) conv with stride 1 and one group is a Linear over channels."""
    return (
        isinstance(module, CONV_TYPES)
        and module.groups == 1
        and all(k == 1 for k in module.kernel_size)
        and all(s == 1 for s in module.stride)
    )


def layer_type(module: nn.Module) -> str:
    """'linear' for Linear / HF Conv1D / pointwise conv, 'conv' for every other convolution."""
    if isinstance(module, CONV_TYPES) and not is_pointwise_conv(module):
        return "conv"
    return "linear"


def num_groups(module: nn.Module) -> int:
    return module.groups if isinstance(module, CONV_TYPES) else 1


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out, cols]`` (a view where possible). Conv: cols = in/groups * prod(kernel)."""
    if isinstance(module, ExpertWeight):
        return module.matrix()
    w = module.weight
    if isinstance(module, HFConv1D):
        return w.t()
    return w.reshape(w.shape[0], -1)


def weight_grad(module: nn.Module) -> torch.Tensor | None:
    """The gradient of the layer's weight in the weight's stored layout: for a fused MoE expert, its slice of the
    fused parameter's gradient (a view: writes go through), so masking it masks the expert."""
    if isinstance(module, ExpertWeight):
        return module.grad()
    return module.weight.grad


@torch.no_grad()
def set_weight_matrix(module: nn.Module, matrix: torch.Tensor) -> None:
    """Write a ``[out, cols]`` matrix back into the layer's own layout and dtype."""
    if isinstance(module, ExpertWeight):
        module.set_matrix(matrix)
        return
    w = module.weight
    if isinstance(module, HFConv1D):
        matrix = matrix.t()
    w.copy_(matrix.reshape(w.shape).to(dtype=w.dtype, device=w.device))


def find_layers(model: nn.Module) -> dict[str, nn.Module | ExpertWeight]:
    """Every prunable layer, in registration order (which is forward order for HF/timm models).

    Fused MoE experts give one ``ExpertWeight`` per (parameter, expert), and MoE routers count as the
    Linear-layout matrices they are. Transposed convolutions are not matmuls over im2col columns of their
    input; they are rejected only when selected (see ``select_layers``), so a model that has them can still
    be walked.
    """
    modules = dict(model.named_modules())
    gates = gate_modules(model)
    layers: dict[str, nn.Module | ExpertWeight] = {}
    for name, m in modules.items():
        if is_fused_experts(m):
            block = parent_name(name)
            layers.update(expert_weights(name, m, modules.get(block), modules.get(parent_name(block))))
        elif is_prunable(m) or name in gates:
            layers[name] = m
    return layers


def _head_names(model: nn.Module, layers: dict[str, nn.Module]) -> set[str]:
    """Output heads: HF output embeddings, timm's classifier, else the last layer of the model."""
    by_id = {id(m): n for n, m in layers.items()}
    heads = set()
    for getter in ("get_output_embeddings", "get_classifier"):
        fn = getattr(model, getter, None)
        if callable(fn):
            try:
                head = fn()
            except (NotImplementedError, AttributeError, TypeError):
                head = None
            if isinstance(head, nn.Module) and id(head) in by_id:
                heads.add(by_id[id(head)])
    if not heads and layers:
        last = next(reversed(layers))
        if all(block_index(last, stack) is None for stack in find_stacks(model)):  # a bare encoder ends in a block
            heads.add(last)
    return heads


def _stem_names(layers: dict[str, nn.Module]) -> set[str]:
    """The stem: the first layer when it is a convolution (it sees raw pixels: ViT patch embed, conv1)."""
    if not layers:
        return set()
    first = next(iter(layers))
    return {first} if isinstance(layers[first], CONV_TYPES) else set()


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_layers(
    model: nn.Module,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    layer_types: Iterable[str] = ("linear",),
    keep_head: bool = True,
    keep_stem: bool = True,
) -> dict[str, nn.Module]:
    """Prunable layers after the defaults (head, stem and MoE routers dense, Linear-like only) and name patterns.

    ``include``/``exclude`` are fnmatch patterns on module names (``"model.layers.*.mlp.*"``; experts are
    ``<experts>.<param>.<expert>``: ``"*.experts.down_proj.*"``); a layer named by an include pattern is
    selected whatever its type, head, stem or router. Fused expert weights whose layout prunekit does not know are
    refused when the selection would include them (``refuse_unknown_experts``).
    """
    include, exclude, layer_types = list(include or []), list(exclude or []), set(layer_types)
    unknown = layer_types - set(LAYER_TYPES) - {"all"}
    if unknown:
        raise PrunekitError(f"unknown layer type(s) {sorted(unknown)}; choose from {LAYER_TYPES} or 'all'")
    if "all" in layer_types:
        layer_types = set(LAYER_TYPES)
    layers = find_layers(model)
    dense = (_head_names(model, layers) if keep_head else set()) | (_stem_names(layers) if keep_stem else set())
    dense |= set(gate_modules(model))  # routing decides which weights run at all: kept exact by default
    chosen = {}
    for name, m in layers.items():
        if include:
            keep = _matches(name, include)
        else:
            keep = name not in dense and layer_type(m) in layer_types
        if keep and not _matches(name, exclude):
            chosen[name] = m
    refuse_unknown_experts(model, include, exclude, "linear" in layer_types)
    for name, m in model.named_modules():
        if isinstance(m, TRANSPOSED_CONV_TYPES) and include and _matches(name, include) and not _matches(name, exclude):
            raise PrunekitError(
                f"layer {name!r} is a transposed convolution, which prunekit does not prune; "
                "exclude it (--exclude) or narrow --include"
            )
    return chosen


def unknown_expert_weights(model: nn.Module) -> dict[str, tuple[nn.Module, nn.Parameter]]:
    """``{<module>.<param>: (module, parameter)}`` for the weights of every module that holds fused expert weights in
    a layout prunekit does not know (``moe.unknown_experts``)."""
    return {
        f"{name}.{p}" if name else p: (m, param)
        for name, m in unknown_experts(model).items()
        if not is_prunable(m)
        for p, param in m.named_parameters(recurse=False)
        if param.dim() >= 2
    }


def refuse_unknown_experts(model: nn.Module, include: list[str], exclude: list[str], linear: bool) -> None:
    """Fused expert weights of an unknown layout that the selection would include are an error, not a silent
    dense remainder: the user excludes them (and the report lists them dense), or prunekit learns the layout."""
    for name, (module, param) in unknown_expert_weights(model).items():
        chosen = _matches(name, include) if include else linear
        if chosen and not _matches(name, exclude):
            owner = parent_name(name)
            pattern = ".".join("*" if part.isdigit() else part for part in owner.split(".")) + ".*"
            raise PrunekitError(
                f"{owner} ({type(module).__name__}) holds fused expert weights ({name.rpartition('.')[2]} "
                f"{list(param.shape)}) in a layout prunekit does not know, so it cannot prune them per expert; "
                f"exclude them to prune the rest (--exclude '{pattern}') and report the class so its layout can be "
                "added to prunekit.architectures.EXPERTS_LAYOUTS"
            )


Stack = tuple[str, "nn.ModuleList | nn.Sequential"]  # a block list and its module path


def _block_lists(model: nn.Module) -> list[tuple[Stack, int]]:
    """The outermost ``ModuleList``/``Sequential`` containers of at least two blocks of one class (not
    themselves layers) holding prunable layers, with their prunable layer counts; a list inside another is
    part of the outer list's blocks."""
    found = []
    for name, container in model.named_modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) < 2:
            continue
        if not _repeated_blocks(container) or is_prunable(container[0]):
            continue
        count = sum(len(find_layers(c)) for c in container)
        if count:
            found.append(((name, container), count))
    return [item for item in found if not any(_inside(item[0][0], other[0][0]) for other in found)]


def _repeated_blocks(container: nn.Module) -> bool:
    """Blocks of one class, or Hugging Face layers of several (hybrid models mix Mamba and attention layers,
    Mllama self- and cross-attention layers, in one list that its forward runs in order)."""
    if len({type(c) for c in container}) == 1:
        return True
    try:  # the base class of every transformers 5 encoder / decoder layer (imported here: it loads modeling_utils)
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover
        return False
    return all(isinstance(c, GradientCheckpointingLayer) for c in container)


def _inside(name: str, outer: str) -> bool:
    return name != outer and (outer == "" or name.startswith(f"{outer}."))


def _uniform(blocks: nn.Module) -> bool:
    """Whether every block holds the same prunable layers (names and shapes): repeated blocks of one stack,
    not stages that change width (ResNet's ``layerN``, whose first block downsamples)."""
    shapes = [{n: tuple(m.weight.shape) for n, m in find_layers(b).items()} for b in blocks]
    return all(s == shapes[0] for s in shapes[1:])


def find_stacks(model: nn.Module, path: str | None = None) -> tuple[Stack, ...]:
    """The block lists to calibrate one block at a time: one for a decoder-only LM or a ViT, two for an
    encoder-decoder (encoder, decoder) or a vision-language model (vision tower, language model).

    ``path`` names them (comma-separated) for models the rule gets wrong. Generic rule: the list holding the
    most prunable layers, plus every other outermost list of repeated identical blocks; together they must
    hold at least half of the model's prunable layers, else there are none (ResNet's ``layerN`` stages change
    width and hold a quarter each: one calibration pass). Returned in registration order; the engine runs them
    in the order the model's forward pass reaches them.
    """
    if path is not None:
        return tuple((p.strip(), named_block_list(model, p.strip())) for p in path.split(",") if p.strip())
    lists = _block_lists(model)
    if not lists:
        return ()
    best = max(lists, key=lambda item: item[1])
    chosen = [item for item in lists if item is best or _uniform(item[0][1])]
    if 2 * sum(count for _, count in chosen) < len(find_layers(model)):
        return ()
    return tuple(stack for stack, _ in chosen)


def find_blocks(model: nn.Module, path: str | None = None) -> Stack | None:
    """The main block list (the one holding the most prunable layers): decoder layers, ViT blocks, ConvNeXt
    stages. Structured methods that remove or reshape blocks work on it."""
    if path is not None:
        return path, named_block_list(model, path)
    stacks = find_stacks(model)
    if not stacks:
        return None
    return max(stacks, key=lambda stack: sum(len(find_layers(b)) for b in stack[1]))


def named_block_list(model: nn.Module, path: str) -> nn.ModuleList | nn.Sequential:
    """The ``ModuleList``/``Sequential`` at ``path``, or an error that lists the candidates."""
    try:
        container = model.get_submodule(path)
    except AttributeError:
        container = None
    if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) < 1:
        candidates = [n for n, m in model.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential)) and n]
        raise PrunekitError(
            f"blocks={path!r} is not a ModuleList/Sequential of {type(model).__name__}; "
            f"candidates: {', '.join(candidates[:8]) or 'none'}"
        )
    return container


def block_index(name: str, blocks: Stack | None) -> int | None:
    """Index of the block holding layer ``name`` in the block list ``blocks``, None when outside it. Blocks are
    found by their child names (``0``, ``1``, ... in a ModuleList; any names in a Sequential built from a dict,
    like torchvision's RegNet ``block1``)."""
    if blocks is None:
        return None
    prefix = f"{blocks[0]}." if blocks[0] else ""
    rest = name[len(prefix) :] if name.startswith(prefix) else None
    if not rest:
        return None
    head = rest.split(".", 1)[0]
    children = [child for child, _ in blocks[1].named_children()]
    return children.index(head) if head in children else None


def stack_block_index(name: str, stacks: tuple[Stack, ...]) -> int | None:
    """A number for the block holding ``name`` that is unique across ``stacks`` (blocks of the first stack,
    then of the second, ...), None when the layer is outside every stack."""
    offset = 0
    for stack in stacks:
        index = block_index(name, stack)
        if index is not None:
            return offset + index
        offset += len(stack[1])
    return None


def block_layers(stack: Stack, index: int, layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The selected layers that live inside block ``index`` of the block list ``stack``."""
    return {n: m for n, m in layers.items() if block_index(n, stack) == index}


# ---------------------------------------------------------------- model families


def is_vision_model(model: nn.Module) -> bool:
    """Whether the Wanda paper's image-classifier defaults apply (per-layer comparison group).

    A Hugging Face model is a vision model when its ``main_input_name`` is ``pixel_values``; any other
    model when it is a timm / torchvision model or contains a 2-D convolution (CNNs, ViT patch embeds).
    Language models (HF ``input_ids`` models, plain MLPs) are not.
    """
    main_input = getattr(model, "main_input_name", None)
    if main_input is not None and is_hf_model(model):
        return main_input == "pixel_values"
    if type(model).__module__.startswith(("timm.", "torchvision.")):
        return True
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def is_hf_model(model: nn.Module) -> bool:
    """A Hugging Face ``PreTrainedModel`` (saved with ``save_pretrained``)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PreTrainedModel)


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """The model's token embedding; None for models without one (image and audio models; dual encoders, whose
    text tower holds it), for which transformers raises ``NotImplementedError``."""
    getter = getattr(model, "get_input_embeddings", None)
    if not callable(getter):
        return None
    try:
        return getter()
    except NotImplementedError:
        return None
