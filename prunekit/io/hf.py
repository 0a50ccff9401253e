"""Hugging Face models of every class prunekit prunes (``prunekit.model_classes``): load from a local directory or
hub id (no remote code unless asked), with the tokenizer or processor; save as safetensors with them."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from ..errors import PrunekitError
from .compact import is_compact, load_compact
from .files import check_safetensors_dir, safetensors_shapes
from .paths import looks_local, require_hub, require_local

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return None if dtype == "auto" else dtype
    if dtype not in DTYPES:
        raise PrunekitError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def check_model_source(source: str | os.PathLike, what: str = "model") -> bool:
    """Fail at once, before any loading, when ``source`` can not be had: a local path that does not exist
    (or is not a checkpoint), or a hub id while offline or with the hub unreachable and no cached copy.
    Returns True when the hub must not be asked (load from the cache only)."""
    text = str(source)
    if looks_local(text):
        path = require_local(
            text, f"{what} path", "give a checkpoint directory (save_pretrained output) or a hub id like 'org/name'"
        )
        if path.is_dir() and not (path / "config.json").is_file():
            raise PrunekitError(
                f"{what} path {text!r} has no config.json; give a checkpoint directory as save_pretrained writes it"
            )
        return False
    return require_hub(text, what, _hub_cached(text))


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def load_causal_lm(
    source: str | os.PathLike, dtype: str | torch.dtype | None = None, trust_remote_code: bool = False
) -> nn.Module:
    """A HF causal LM in eval mode (``load_hf_model`` with ``causal-lm``)."""
    return load_hf_model(source, "causal-lm", dtype, trust_remote_code)


def auto_model(model_class: str):
    """The ``transformers`` auto class that loads ``model_class`` (``AutoModelForCausalLM`` for ``causal-lm``)."""
    import transformers

    from ..model_classes import MODEL_CLASSES

    return getattr(transformers, MODEL_CLASSES[model_class].auto_class)


def load_hf_model(
    source: str | os.PathLike,
    model_class: str = "causal-lm",
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """A HF model of ``model_class`` in eval mode, from a dense checkpoint or prunekit's compact format (restored
    in memory, so every command reads what ``prunekit prune`` writes). A truncated safetensors file or weights
    that do not fit ``config.json`` is one ``PrunekitError`` naming the file, not a loader traceback."""
    cache_only = check_model_source(source)
    local = Path(str(source)).expanduser()
    if local.is_dir() and is_compact(local):
        return load_compact_model(local, dtype, trust_remote_code, model_class)
    if local.is_dir():
        check_safetensors_dir(local)
        if has_layer_sizes(local):
            return load_resized_model(local, dtype, trust_remote_code, model_class)
    try:
        model = auto_model(model_class).from_pretrained(
            str(source),
            dtype=parse_dtype(dtype) or "auto",
            trust_remote_code=trust_remote_code,
            local_files_only=cache_only,
        )
    except RuntimeError as err:
        _raise_mismatch(local, trust_remote_code, err, model_class)
        raise
    except OSError as err:
        raise PrunekitError(
            f"model {str(source)!r} could not be loaded ({_first_line(err)}); check the path or hub id"
        ) from err
    except SafetensorError as err:
        raise PrunekitError(
            f"model {str(source)!r} has an unreadable safetensors file ({err}); re-download or re-save the checkpoint"
        ) from err
    return model.eval()


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def shape_mismatches(model: nn.Module, folder: Path) -> list[str]:
    """The tensors of ``folder``'s safetensors whose shapes differ from ``model``'s (built from its config)."""
    own = model.state_dict()
    return [
        f"{name} is {list(shape)} in {file} but {list(own[name].shape)} per config.json"
        for name, (file, shape) in safetensors_shapes(folder).items()
        if name in own and tuple(own[name].shape) != shape
    ]


def _raise_mismatch(folder: Path, trust_remote_code: bool, err: BaseException, model_class: str) -> None:
    """After a failed load: when the weights do not fit the config, say which tensor in which file."""
    if not folder.is_dir():
        return
    from transformers import AutoConfig

    from ..structured.layer_sizes import rebuild_blocks

    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = rebuild_blocks(auto_model(model_class).from_config(config, trust_remote_code=trust_remote_code))
    found = shape_mismatches(skeleton, folder)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise PrunekitError(
            f"checkpoint {str(folder)!r} does not match its config.json: {found[0]}{more}; fix "
            "config.json or re-save the checkpoint"
        ) from err


def load_config(source: str | os.PathLike, trust_remote_code: bool = False):
    """The checkpoint's ``config.json`` alone (no weights): enough to check settings against the model."""
    from transformers import AutoConfig

    cache_only = check_model_source(source)
    try:
        return AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code, local_files_only=cache_only)
    except (OSError, ValueError) as err:
        raise PrunekitError(
            f"model config {str(source)!r} could not be read ({_first_line(err)}); check the path or hub id"
        ) from err


def load_tokenizer(source: str | os.PathLike, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    cache_only = check_model_source(source, "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(
            str(source), trust_remote_code=trust_remote_code, local_files_only=cache_only
        )
    except OSError as err:
        raise PrunekitError(
            f"tokenizer {str(source)!r} could not be loaded ({_first_line(err)}); check the path or hub id"
        ) from err


def load_processor(source: str | os.PathLike, trust_remote_code: bool = False):
    """The checkpoint's own processor (``AutoProcessor``: image preprocessing plus tokenizer), which image-text
    models need to turn an image and its text into inputs; one line when the checkpoint has none."""
    from transformers import AutoProcessor

    cache_only = check_model_source(source, "processor")
    fix = "save the model's processor next to the weights (processor.save_pretrained)"
    try:
        processor = AutoProcessor.from_pretrained(
            str(source), trust_remote_code=trust_remote_code, local_files_only=cache_only
        )
    except (OSError, ValueError, TypeError) as err:
        raise PrunekitError(f"processor of {str(source)!r} could not be loaded ({_first_line(err)}); {fix}") from err
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise PrunekitError(
            f"model {str(source)!r} has no image processor (preprocessor_config.json / processor_config.json), "
            f"which image-text models calibrate with; {fix}"
        )
    return processor


def save_causal_lm(model: nn.Module, tokenizer, out_dir: str | os.PathLike) -> None:
    """``save_pretrained`` with safetensors (and the tokenizer or processor, when there is one) into ``out_dir``;
    any Hugging Face model class."""
    model.save_pretrained(str(out_dir), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))


def shared_parameter_names(model: nn.Module) -> set[str]:
    """Names of parameters that are one tensor under several names (tied embeddings and heads): a checkpoint
    stores such a tensor once, so the other names are missing from it by design."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return {name for group in names.values() if len(group) > 1 for name in group}


def has_layer_sizes(folder: Path) -> bool:
    """Whether ``folder``'s config.json records blocks of different sizes (width pruning of a layer range)."""
    import json

    from ..structured.layer_sizes import KEY

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return any(isinstance(c, dict) and any(c.get(KEY) or []) for c in [config, *config.values()])


def _model_class(auto, config) -> type:
    """The concrete class the auto class ``auto`` builds for ``config`` (the one its ``architectures`` names)."""
    found = auto._model_mapping.get(type(config), None) if hasattr(auto, "_model_mapping") else None
    names = set(getattr(config, "architectures", None) or [])
    candidates = found if isinstance(found, (list, tuple)) else [found] if found is not None else []
    chosen = next((c for c in candidates if c.__name__ in names), candidates[0] if candidates else None)
    if chosen is None:
        raise PrunekitError(
            f"{type(config).__name__}: prunekit cannot rebuild the blocks of different sizes this config records "
            "for a model class transformers does not list (remote code)"
        )
    return chosen


def load_resized_model(
    path: Path, dtype: str | torch.dtype | None = None, trust_remote_code: bool = False, model_class: str = "causal-lm"
) -> nn.Module:
    """A checkpoint whose blocks differ in size (``prunekit_layer_sizes`` in config.json, written by width pruning
    of a layer range): ``from_pretrained`` of the model's class, each block resized as recorded before the weights
    load into it."""
    from transformers import AutoConfig

    from ..structured.layer_sizes import resizing

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    cls = _model_class(auto_model(model_class), config)
    try:
        model = resizing(cls).from_pretrained(str(path), dtype=parse_dtype(dtype) or "auto")
    except RuntimeError as err:
        _raise_mismatch(path, trust_remote_code, err, model_class)
        raise
    model.__class__ = cls  # the subclass only resized the blocks while building them
    return model.eval()


def load_compact_model(
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    model_class: str = "causal-lm",
) -> nn.Module:
    """A Hugging Face model saved with ``--save-format compact``, restored dense in memory, so every prunekit
    command reads what prunekit writes."""
    from transformers import AutoConfig

    from ..structured.layer_sizes import rebuild_blocks

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    model = rebuild_blocks(auto_model(model_class).from_config(config, trust_remote_code=trust_remote_code))
    state = load_compact(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(missing) & shared_parameter_names(model)
    if set(missing) - tied or unexpected:
        raise PrunekitError(
            f"compact checkpoint {str(path)!r} does not match its config: missing "
            f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    if tied:
        model.tie_weights()
    stored = next((t.dtype for t in state.values() if t.is_floating_point()), None)
    target = parse_dtype(dtype) or stored  # "auto": as stored
    return (model.to(target) if target is not None else model).eval()
