"""Hugging Face models of every class prunekit prunes (``prunekit.model_classes``): load from a local directory or
hub id (no remote code unless asked), with the tokenizer or processor; save as safetensors with them."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from ..dtypes import parse_dtype
from ..errors import PrunekitError
from ..shapes import checkpoint_sized_by_weights, sized_by_weights
from ..structured.layer_sizes import take_stored_sizes
from .compact import Checkpoint, is_compact, load_compact
from .files import check_safetensors_dir, safetensors_shapes
from .paths import looks_local, require_hub, require_local

CAUSAL_LM = "AutoModelForCausalLM"


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
    """A HF causal LM in eval mode (``load_hf_model`` with ``AutoModelForCausalLM``)."""
    return load_hf_model(source, CAUSAL_LM, dtype, trust_remote_code)


def auto_model(auto_class: str):
    """The ``transformers`` auto class named ``auto_class`` (a model class's, ``prunekit.model_classes``)."""
    import transformers

    return getattr(transformers, auto_class)


def load_hf_model(
    source: str | os.PathLike,
    auto_class: str = CAUSAL_LM,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """A HF model in eval mode, loaded by the transformers ``auto_class`` (a model class's), from a dense checkpoint
    or prunekit's compact format (restored in memory, so every command reads what ``prunekit prune`` writes). A
    truncated safetensors file or weights that do not fit ``config.json`` is one ``PrunekitError`` naming the file,
    not a loader traceback."""
    cache_only = check_model_source(source)
    local = Path(str(source)).expanduser()
    if local.is_dir() and (is_compact(local) or checkpoint_sized_by_weights(local)):
        return load_rebuilt_model(local, dtype, trust_remote_code, auto_class)
    if local.is_dir():
        check_safetensors_dir(local)
    try:
        model = auto_model(auto_class).from_pretrained(
            str(source),
            dtype=parse_dtype(dtype) or "auto",
            trust_remote_code=trust_remote_code,
            local_files_only=cache_only,
        )
    except RuntimeError as err:
        _raise_mismatch(local, trust_remote_code, err, auto_class)
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


def _raise_mismatch(folder: Path, trust_remote_code: bool, err: BaseException, auto_class: str) -> None:
    """After a failed load: when the weights do not fit the config, say which tensor in which file."""
    if not folder.is_dir():
        return
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = auto_model(auto_class).from_config(config, trust_remote_code=trust_remote_code)
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


# Files one of which every saved tokenizer has (fast, sentencepiece and word-piece tokenizers).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)
SAVE_TOKENIZER = "save the tokenizer with the model (prunekit.save(model, out, tokenizer=tokenizer))"


def load_tokenizer(source: str | os.PathLike, trust_remote_code: bool = False, fix: str = SAVE_TOKENIZER):
    """The checkpoint's tokenizer; a directory without one is one line saying so and ``fix``."""
    from transformers import AutoTokenizer

    cache_only = check_model_source(source, "tokenizer")
    local = Path(str(source)).expanduser()
    if local.is_dir() and not any((local / name).is_file() for name in TOKENIZER_FILES):
        raise PrunekitError(f"{str(source)!r} has no tokenizer ({' / '.join(TOKENIZER_FILES[:2])}); {fix}")
    try:
        return AutoTokenizer.from_pretrained(
            str(source), trust_remote_code=trust_remote_code, local_files_only=cache_only
        )
    except (OSError, ValueError) as err:
        raise PrunekitError(f"tokenizer {str(source)!r} could not be loaded ({_first_line(err)}); {fix}") from err


# What a processor must hold for each kind of data it prepares: the part's attribute and the file that saves it.
PROCESSOR_PARTS = {
    "image_processor": "an image processor (preprocessor_config.json / processor_config.json)",
    "tokenizer": "a tokenizer (tokenizer.json / tokenizer_config.json)",
    "feature_extractor": "a feature extractor (preprocessor_config.json / processor_config.json)",
}


# A model that needs one part only loads it with its own auto class (AutoProcessor would build a whole processor,
# and fail, for a wav2vec 2.0 checkpoint that has a vocabulary in its config but no tokenizer files).
ONE_PART = {("image_processor",): "AutoImageProcessor", ("feature_extractor",): "AutoFeatureExtractor"}


def load_processor(
    source: str | os.PathLike,
    trust_remote_code: bool = False,
    needs: tuple[str, ...] = ("image_processor", "tokenizer"),
    what: str = "image-text models",
):
    """The checkpoint's own processor (``AutoProcessor``: image or audio preprocessing, often with a tokenizer),
    holding the parts ``needs`` (attribute names; a bare image processor or feature extractor counts as itself);
    one line naming the missing part when the checkpoint has none."""
    import transformers

    cache_only = check_model_source(source, "processor")
    fix = "save the model's processor next to the weights (processor.save_pretrained)"
    auto = getattr(transformers, ONE_PART.get(needs, "AutoProcessor"))
    try:
        processor = auto.from_pretrained(str(source), trust_remote_code=trust_remote_code, local_files_only=cache_only)
    except (OSError, ValueError, TypeError) as err:
        raise PrunekitError(f"processor of {str(source)!r} could not be loaded ({_first_line(err)}); {fix}") from err
    missing = [part for part in needs if processor_part(processor, part) is None]
    if missing:
        raise PrunekitError(
            f"model {str(source)!r} has no {PROCESSOR_PARTS[missing[0]]}, which {what} prepare their data with; {fix}"
        )
    return processor


def processor_part(processor, part: str):
    """``processor.<part>``, or the processor itself when it is that part (a bare image processor)."""
    found = getattr(processor, part, None)
    if found is not None:
        return found
    kinds = {"image_processor": "ImageProcessor", "feature_extractor": "FeatureExtractor", "tokenizer": "Tokenizer"}
    is_part = any(kinds[part] in cls.__name__ for cls in type(processor).__mro__)
    return processor if is_part else None


def shared_parameter_names(model: nn.Module) -> set[str]:
    """Names of parameters that are one tensor under several names (tied embeddings and heads): a checkpoint
    stores such a tensor once, so the other names are missing from it by design."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return {name for group in names.values() if len(group) > 1 for name in group}


def stored_names(model: nn.Module) -> dict[str, str]:
    """State-dict name -> the name ``save_pretrained`` stores the tensor under: transformers 5 writes some under
    their legacy names (GPT-NeoX's ``lm_head`` as ``embed_out``), by the same conversion it undoes when loading."""
    state = model.state_dict()
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4 stores every tensor under its own name
        return {name: name for name in state}
    own = {id(t): name for name, t in state.items()}
    return {own[id(t)]: name for name, t in revert_weight_conversion(model, dict(state)).items() if id(t) in own}


def load_rebuilt_model(
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    auto_class: str = CAUSAL_LM,
) -> nn.Module:
    """A Hugging Face model built from its config, then given its stored weights: a checkpoint saved with
    ``--save-format compact`` (restored dense in memory), or one whose layer sizes the config cannot state
    (``prunekit.shapes``: the layers take the stored tensors' shapes first). So every prunekit command reads
    what prunekit writes."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    model = auto_model(auto_class).from_config(config, trust_remote_code=trust_remote_code)
    if is_compact(path):
        state = load_compact(path)
    else:
        checkpoint, own_names = Checkpoint(path), {stored: own for own, stored in stored_names(model).items()}
        state = {own_names.get(name, name): t for name, t in checkpoint.read(checkpoint.names()).items()}
    if sized_by_weights(config):
        take_stored_sizes(model, {name: tuple(t.shape) for name, t in state.items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(missing) & shared_parameter_names(model)
    if set(missing) - tied or unexpected:
        raise PrunekitError(
            f"checkpoint {str(path)!r} does not match its config: missing "
            f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    if tied:
        model.tie_weights()
    stored = next((t.dtype for t in state.values() if t.is_floating_point()), None)
    target = parse_dtype(dtype) or stored  # "auto": as stored
    return (model.to(target) if target is not None else model).eval()
