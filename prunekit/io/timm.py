"""Vision classifiers: timm models (registry names, hub, local directories) and torchvision models.

Sources (``load_vision_model``):

* ``timm:NAME`` — any ``timm.create_model`` name (``timm:convnext_tiny.fb_in1k``); hub weights when
  ``pretrained`` (needs the network or a warm cache; nothing else downloads).
* ``local-dir:PATH`` / ``hf-hub:ID`` — timm's own schemes, passed to ``timm.create_model`` unchanged.
* ``PATH`` — a directory saved by ``save_vision_model`` (or timm's ``save_for_hf``): ``config.json``
  with timm's ``architecture`` key + ``model.safetensors``.
* ``torchvision:NAME`` — ``torchvision.models.get_model(NAME)``, random weights unless a local
  ``weights`` file (``.pth``/``.safetensors`` state dict) is given.

Saved timm models use timm's format, so ``timm.create_model("local-dir:OUT", pretrained=True)`` loads
them without prunekit.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import PrunekitError
from .files import load_weights_file
from .paths import local_path, require_local

log = logging.getLogger(__name__)

TIMM_PREFIX = "timm:"
TORCHVISION_PREFIX = "torchvision:"
TIMM_SCHEMES = ("local-dir:", "hf-hub:")
WEIGHTS_FILE = "model.safetensors"
# torchvision models carry no name of their own; load_vision_model records it here for saving.
TORCHVISION_ARCH_ATTR = "prunekit_torchvision_arch"
# torchvision's ImageNet eval preprocessing (resize 256, centre crop 224, bilinear) in timm's terms.
TORCHVISION_DATA_CFG = {
    "input_size": (3, 224, 224),
    "interpolation": "bilinear",
    "crop_pct": 0.875,
    "crop_mode": "center",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
}


def _read_config(path: Path) -> dict[str, Any] | None:
    cfg = path / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return None


def _saved_library(path: Path) -> str | None:
    """'timm' / 'torchvision' for a directory saved in those formats, else None (e.g. a HF checkpoint,
    whose config has ``architectures``, plural)."""
    cfg = _read_config(path)
    if cfg is None:
        return None
    if cfg.get("library") == "torchvision":
        return "torchvision"
    return "timm" if "architecture" in cfg else None


def is_vision_source(source: str | os.PathLike) -> bool:
    """True for the model sources ``load_vision_model`` understands (see the module docstring)."""
    text = str(source)
    if text.startswith((TIMM_PREFIX, TORCHVISION_PREFIX) + TIMM_SCHEMES):
        return True
    path = Path(text).expanduser()
    return path.is_dir() and _saved_library(path) is not None


def load_vision_model(
    source: str | os.PathLike,
    pretrained: bool = True,
    num_classes: int | None = None,
    weights: str | os.PathLike | None = None,
) -> nn.Module:
    """An image classifier in eval mode from a ``timm:`` / ``local-dir:`` / ``hf-hub:`` / ``torchvision:``
    source or a saved directory. ``num_classes`` replaces the classifier (timm drops the old head)."""
    text = str(source)
    if text.startswith(TORCHVISION_PREFIX):
        return _load_torchvision(text[len(TORCHVISION_PREFIX) :], num_classes, weights)
    if weights is not None:
        raise PrunekitError(
            "weights= is for torchvision: sources; timm models load their own weights "
            "(timm:NAME downloads them, local-dir:PATH reads them)"
        )
    if text.startswith(TIMM_PREFIX):
        return _create_timm(text[len(TIMM_PREFIX) :], pretrained, num_classes)
    if text.startswith(TIMM_SCHEMES):
        return _create_timm(text, pretrained, num_classes)
    return _load_saved_dir(Path(text).expanduser(), num_classes)


def _create_timm(name: str, pretrained: bool, num_classes: int | None) -> nn.Module:
    import timm

    if name.startswith("local-dir:"):
        require_local(
            local_path(name),
            "timm model directory",
            "give a directory saved by save_vision_model or timm's save_for_hf",
        )
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    return timm.create_model(name, pretrained=pretrained, **kwargs).eval()


def _load_saved_dir(path: Path, num_classes: int | None) -> nn.Module:
    library = _saved_library(path) if path.is_dir() else None
    if library == "timm":
        return _create_timm(f"local-dir:{path}", True, num_classes)
    if library == "torchvision":
        cfg = _read_config(path)
        if num_classes is not None and num_classes != cfg.get("num_classes"):
            raise PrunekitError(
                f"{str(path)!r} holds a {cfg.get('num_classes')}-class torchvision model; "
                f"num_classes={num_classes} would not match its saved head"
            )
        return _load_torchvision(cfg["architecture"], cfg.get("num_classes"), path / WEIGHTS_FILE)
    require_local(path, "model path", "give timm:NAME, torchvision:NAME or a saved model directory")
    raise PrunekitError(
        f"{str(path)!r} is not a vision model: give timm:NAME, torchvision:NAME, local-dir:PATH or a directory "
        "with config.json (timm's 'architecture' key) and model.safetensors, as prunekit saves them"
    )


def _load_torchvision(name: str, num_classes: int | None, weights: str | os.PathLike | None) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models():
        raise PrunekitError(f"torchvision has no model {name!r}; see torchvision.models.list_models()")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    if weights is not None:
        _load_weights(model, name, Path(weights).expanduser())
    else:
        log.warning("torchvision:%s has random weights (no local weights file given)", name)
    setattr(model, TORCHVISION_ARCH_ATTR, name)
    model.pretrained_cfg = dict(TORCHVISION_DATA_CFG)  # read by timm.data.resolve_data_config
    return model.eval()


def _load_weights(model: nn.Module, name: str, path: Path) -> None:
    """Load a state dict file (weights-only) into ``model``; keys or shapes that do not fit are one line."""
    try:
        model.load_state_dict(load_weights_file(path))
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise PrunekitError(
            f"weights file {str(path)!r} does not fit torchvision:{name} ({detail}); give that "
            "architecture's state dict (and num_classes for another head)"
        ) from None


def is_timm_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.") and hasattr(model, "pretrained_cfg")


def save_vision_model(model: nn.Module, out_dir: str | os.PathLike) -> None:
    """Write ``config.json`` + ``model.safetensors`` into ``out_dir``: timm's own format for timm models
    (loadable by ``timm.create_model("local-dir:OUT", pretrained=True)``), a small prunekit config for
    torchvision models (loadable by ``load_vision_model(OUT)``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_timm_model(model):
        from timm.models import save_for_hf

        save_for_hf(model, str(out), safe_serialization=True)
        return
    arch = getattr(model, TORCHVISION_ARCH_ATTR, None)
    if arch is None:
        raise PrunekitError(
            f"cannot save a {type(model).__name__} as a vision model: only timm models and "
            "torchvision models loaded with load_vision_model('torchvision:NAME') are supported"
        )
    _save_torchvision(model, arch, out)


def _save_torchvision(model: nn.Module, arch: str, out: Path) -> None:
    from safetensors.torch import save_file

    head = _last_linear(model)
    config = {
        "library": "torchvision",
        "architecture": arch,
        "num_classes": head.out_features if head is not None else None,
    }
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _last_linear(model: nn.Module) -> nn.Linear | None:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def num_classes_of(model: nn.Module) -> int:
    """The classifier's output size: timm's ``num_classes``, else the last Linear's ``out_features``."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    head = _last_linear(model)
    if head is None:
        raise PrunekitError(f"cannot tell how many classes {type(model).__name__} predicts; pass num_classes=")
    return head.out_features
