"""The teacher: a frozen model run without gradients, in eval mode, on its own device (the student's, or the CPU
to keep it off the GPU), that returns its logits and the outputs of the blocks the student's blocks are matched to.

Memory: one more copy of the model's weights on the teacher's device (no gradients, no optimizer state), and per
step its logits (batch x positions x vocabulary floats) and the matched blocks' outputs; nothing else is kept.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..forward import block_output, eval_mode, hooks, model_device, to_device
from ..graph import find_blocks

log = logging.getLogger(__name__)

NOT_FOR_TEACHER = ("labels",)  # the teacher's own loss is not needed


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` as it is now, in eval mode, every parameter without gradients."""
    return freeze(copy.deepcopy(model))


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def load_teacher(source: str | os.PathLike, dtype: str = "auto", trust_remote_code: bool = False) -> nn.Module:
    """A teacher checkpoint, loaded as the student would be: timm / torchvision sources as image models, Hugging
    Face checkpoints as the class their config names."""
    from ..io.hf import load_config, load_hf_model
    from ..io.timm import is_vision_source, load_vision_model
    from ..model_classes import MODEL_CLASSES, resolve_model_class

    if is_vision_source(source):
        return freeze(load_vision_model(source))
    row = MODEL_CLASSES[resolve_model_class(load_config(source, trust_remote_code), source=str(source))]
    return freeze(load_hf_model(source, row.auto_class, dtype, trust_remote_code))


def logits_of(output: Any) -> torch.Tensor:
    """The logits a model returned: ``.logits`` of a Hugging Face output, a tensor itself, or a tuple's first."""
    logits = getattr(output, "logits", None)
    if logits is not None:
        return logits
    return output[0] if isinstance(output, (tuple, list)) else output


def blocks_of(model: nn.Module) -> nn.Module | None:
    found = find_blocks(model)
    return None if found is None else found[1]


class Teacher:
    """``teacher(args, kwargs, blocks)`` -> its logits and ``{block: output}``, computed on ``device`` and returned
    on the device of the inputs."""

    def __init__(self, model: nn.Module, device: str | torch.device | None = None):
        self.model = freeze(model)
        self.device = torch.device(device) if device is not None else None
        self.blocks = blocks_of(model)

    def place(self, student_device: torch.device) -> None:
        """Move the teacher to its device (the student's unless one was given), once training is placed."""
        self.device = self.device or student_device
        if model_device(self.model) != self.device:
            self.model.to(self.device)
            log.info("distillation teacher on %s", self.device)

    @torch.no_grad()
    def __call__(
        self, args: tuple, kwargs: Mapping[str, Any], blocks: Iterable[int] = ()
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        inputs = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
        home = inputs[0].device if inputs else self.device
        outputs: dict[int, torch.Tensor] = {}
        handles = [self.blocks[j].register_forward_hook(_keeper(outputs, j)) for j in blocks]
        kwargs = {k: v for k, v in kwargs.items() if k not in NOT_FOR_TEACHER}
        with hooks(handles), eval_mode(self.model):
            output = self.model(*to_device(args, self.device), **to_device(kwargs, self.device))
        return logits_of(output).to(home), {j: out.to(home) for j, out in outputs.items()}


def _keeper(outputs: dict[int, torch.Tensor], index: int):
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        outputs[index] = block_output(output)

    return hook
