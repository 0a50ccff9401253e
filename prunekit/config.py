"""``PruneConfig``: every prune setting, once.

The Python API (``prunekit.prune``), the lazy path, ``PruningCallback``, YAML recipes, fine-tuning and the
CLI all take this one frozen dataclass. It validates every combination in ``__post_init__``, before any
model is loaded, and the CLI flags and recipe keys are derived from its fields (``cli_flags``): a new
setting is one field here plus the code that uses it.

This module imports no torch at import time (``prunekit --help`` stays fast); validation imports the
registries when a config is built.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .checks import check_dataclass
from .dtypes import DTYPES
from .errors import PrunekitError

OFFLOAD_MODES = ("auto", "device", "cpu", "disk")
SAVE_FORMATS = ("dense", "compact")  # how a pruned Hugging Face model is written (prunekit.io.models.write_model)
EXPERT_TOKENS = ("routed", "all")  # which tokens calibrate a MoE expert (prunekit.moe)


def setting(
    default: Any = None,
    help: str = "",
    *,
    flag: str | None = None,
    type: Any = None,  # noqa: A002
    repeat: bool = False,
    keyvalue: bool = False,
    recipe: bool = True,
    example: Any = None,
    example_with: dict | None = None,
) -> Any:
    """A dataclass field with what the CLI needs to offer it as a flag.

    ``repeat``: the flag may be given several times (a tuple; commas also split); ``keyvalue``: ``KEY=VALUE``
    pairs into a mapping; ``recipe=False``: not accepted from a YAML recipe (command line / Python only).
    ``example``: a valid non-default value (tests/test_settings.py sets every setting to it in every front end
    and checks that the front end honours or refuses it), with the other settings it needs (``example_with``).
    """
    meta = dict(help=help, flag=flag, type=type, repeat=repeat, keyvalue=keyvalue, recipe=recipe)
    meta.update(example=example, example_with=example_with or {})
    if isinstance(default, (dict, list, tuple)):
        return field(default_factory=lambda: type_of(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def type_of(value: Any) -> type:
    return dict if isinstance(value, dict) else tuple


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how. Unset optional settings are ``None`` and resolved against the model later
    (``group``: the method's default; ``seqlen``: ``min(2048, context length)``; ``device``: where it is)."""

    method: str = setting(
        "wanda", "mask criterion, solver or structured method (see `prunekit methods`)", example="magnitude"
    )
    method_params: dict = setting(
        {},
        "method hyper-parameter",
        flag="--method-param",
        keyvalue=True,
        example={"percdamp": 0.05},
        example_with={"method": "sparsegpt"},
    )
    update: tuple = setting(
        (), "weight update / mask refinement after the mask (admm, dsnot); repeatable", repeat=True, example=("dsnot",)
    )
    update_params: dict = setting(
        {},
        "update hyper-parameter; with several updates name it: admm.iterations=3",
        flag="--update-param",
        keyvalue=True,
        example={"dsnot": {"max_cycles": 5}},
        example_with={"update": ("dsnot",)},
    )
    sparsity: float = setting(0.5, "fraction of zeros in the selected layers, in [0, 1)", type=float, example=0.6)
    pattern: str | None = setting(
        None,
        "N:M sparsity, e.g. 2:4 = keep (at most) 2 non-zeros in every 4 "
        "consecutive weights along the input dimension (the hardware convention; the "
        "Wanda code's prune_n:prune_m counts pruned weights instead, the same at 2:4)",
        example="2:4",
    )
    group: str | None = setting(
        None,
        "where scores compete: per-output, per-input, per-layer, global "
        "(default: the method's, per-layer for image models)",
        example="per-layer",
    )
    allocation: str = setting("uniform", "per-layer sparsity: uniform, owl, explicit", example="owl")
    allocation_params: dict = setting(
        {},
        "allocation parameter",
        flag="--allocation-param",
        keyvalue=True,
        example={"lam": 0.05},
        example_with={"allocation": "owl"},
    )
    include: tuple = setting(
        (), "fnmatch pattern of layer names to prune (repeatable)", repeat=True, example=("*.mlp.*",)
    )
    exclude: tuple = setting(
        (), "fnmatch pattern of layer names to keep dense (repeatable)", repeat=True, example=("*.o_proj",)
    )
    layer_types: tuple = setting(
        ("linear",), "linear (incl. 1x1 conv and HF Conv1D), conv, all", repeat=True, example=("all",)
    )
    blocks: str | None = setting(
        None,
        "module path of the block list to calibrate one block at a time "
        "(default: found automatically, e.g. model.layers)",
        example="model.layers",
    )
    nsamples: int = setting(128, "calibration samples (text windows / images)", type=int, example=4)
    seqlen: int | None = setting(
        None,
        "tokens per calibration window (default: min(2048, the model's context))",
        type=int,
        example=16,
    )
    seed: int = setting(0, "seed of the calibration sample", type=int, example=1)
    batch_size: int = setting(8, "calibration batch size", type=int, example=2)
    sequential: bool = setting(
        True,
        "block by block, each fed the pruned blocks' outputs (--no-sequential: one pass over the dense model)",
        type=bool,
        example=False,
    )
    device: str | None = setting(None, "compute device for the current block (cuda, cuda:1, cpu)", example="cpu")
    dtype: str = setting("auto", "model dtype when loading: auto, float32, bfloat16, float16", example="float32")
    offload_activations: str = setting(
        "auto", "where calibration activations live: auto, device, cpu, disk", example="cpu"
    )
    stats_dtype: str = setting(
        "float32",
        "dtype statistics accumulate in: float32, or float64 for very long calibration (methods still see float32)",
        example="float64",
    )
    expert_tokens: str = setting(
        "routed",
        "tokens that calibrate each MoE expert: routed (those the router sends it) or all (every token, for "
        "experts that see too few); the forward pass stays routed either way",
        example="all",
    )
    expert_min_tokens: int = setting(
        16,
        "warn (log and report) when a MoE expert is calibrated on fewer routed tokens than this; from n tokens "
        "a column norm is known to about 1/sqrt(2n) (18 percent at 16) and the Hessian has rank at most n",
        type=int,
        example=4,
    )
    kernels: bool = setting(
        True,
        "compiled CPU selection kernels (numba) where they apply; --no-kernels: torch only (the same masks, slower)",
        type=bool,
        example=False,
    )
    recalibrate_bn: bool | None = setting(
        None,
        "re-estimate BatchNorm statistics after pruning (default: when a "
        "pruned layer feeds a BatchNorm and calibration data is given)",
        type=bool,
        example=True,
    )

    def __post_init__(self) -> None:
        self._normalise()
        check_dataclass(self, "prune setting")
        check_config(self)

    def _normalise(self) -> None:
        """Recipes and the CLI give lists or one string where a tuple is meant; params default to {}."""
        for f in fields(PruneConfig):
            value = getattr(self, f.name)
            if f.metadata.get("repeat"):
                value = (value,) if isinstance(value, str) else tuple(value or ())
                object.__setattr__(self, f.name, value)
            elif f.metadata.get("keyvalue"):
                object.__setattr__(self, f.name, dict(value or {}))
        object.__setattr__(self, "update_params", per_update_params(self.update, self.update_params))
        _pattern_sparsity(self)

    @classmethod
    def of(cls, config: PruneConfig | str | None = None, /, **settings: Any) -> PruneConfig:
        """A config from a ``PruneConfig``, a method name or nothing, with ``settings`` on top (``None`` =
        not given). Unknown settings are errors that list the known ones."""
        given = {k: v for k, v in settings.items() if v is not None}
        unknown = sorted(set(given) - {f.name for f in fields(cls)})
        if unknown:
            raise PrunekitError(f"unknown prune setting(s) {unknown}; known: {', '.join(setting_names(cls))}")
        if isinstance(config, PruneConfig):
            return dataclasses.replace(config, **given) if given else config
        if config is not None:
            given["method"] = config
        return cls(**given)

    @property
    def structured(self) -> bool:
        from .structured import STRUCTURED

        return self.method in STRUCTURED

    def as_config(self) -> PruneConfig:
        """The prune settings alone, as a plain ``PruneConfig`` (a recipe is a config with a job around it)."""
        if type(self) is PruneConfig:
            return self
        return PruneConfig(**{name: getattr(self, name) for name in setting_names(PruneConfig)})

    def settings(self) -> dict[str, Any]:
        """The prune settings alone as plain data (for reports and saved recipes)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(PruneConfig)}


def _pattern_sparsity(config: PruneConfig) -> None:
    """An N:M pattern fixes the sparsity (2:4 keeps 2 of 4: 0.5; 1:4: 0.75): an unset ``sparsity`` takes that value,
    so reports and saved recipes say what was done; a different one contradicts the pattern and is refused."""
    from .groups import parse_pattern

    if not isinstance(config.pattern, str) or not isinstance(config.sparsity, (int, float)):
        return  # the type checks say what is wrong
    nm = parse_pattern(config.pattern)
    if nm is None or config.structured:
        return
    implied = 1 - nm[0] / nm[1]
    default = PruneConfig.__dataclass_fields__["sparsity"].default
    if config.sparsity == default or math.isclose(config.sparsity, implied, abs_tol=1e-9):
        object.__setattr__(config, "sparsity", implied)
        return
    raise PrunekitError(
        f"--pattern {config.pattern} keeps {nm[0]} of every {nm[1]} weights, which is sparsity {implied:g}; "
        f"--sparsity {config.sparsity:g} contradicts it: drop --sparsity (or set it to {implied:g})"
    )


def setting_names(cls: type = PruneConfig) -> list[str]:
    return [f.name for f in fields(cls)]


def given_settings(config: Any, names: Any) -> list[str]:
    """The settings among ``names`` that ``config`` holds with a value other than their default."""
    defaults = {f.name: _default(f) for f in fields(config)}
    return [name for name in names if name in defaults and getattr(config, name) != defaults[name]]


def refuse_unused(config: Any, used: Any, who: str, why: str) -> None:
    """A setting ``who`` does not use, given with a non-default value, is an error (set but ignored would be a
    silent wrong run): one line naming every such setting as a flag, ``why`` it is not used, and the fix."""
    unused = given_settings(config, [f.name for f in fields(config) if f.name not in set(used)])
    if unused:
        them = "it" if len(unused) == 1 else "them"
        raise PrunekitError(f"{who} does not use {flag_list(unused)}: {why}; drop {them}")


def flag_list(names: Any) -> str:
    return ", ".join("--" + name.replace("_", "-") for name in names)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def per_update_params(updates: tuple, params: Mapping) -> dict[str, dict]:
    """``{update: {param: value}}`` from per-update mappings (``{admm: {iterations: 3}}``), dotted keys
    (``admm.iterations``) or, for exactly one update, flat keys. With several updates a flat key would be
    ambiguous (and was once silently dropped), so it is an error."""
    nested: dict[str, dict] = {}
    flat: dict[str, Any] = {}
    for key, value in dict(params or {}).items():
        head, dot, rest = str(key).partition(".")
        if key in updates and isinstance(value, Mapping):
            nested.setdefault(key, {}).update(value)
        elif dot and head in updates:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[key] = value
    if flat and len(updates) != 1:
        what = "no update is set" if not updates else f"there are {len(updates)} updates {list(updates)}"
        raise PrunekitError(
            f"update parameters {sorted(flat)} given but {what}; name the update they belong to "
            "(--update-param admm.iterations=3, or update_params: {admm: {iterations: 3}})"
        )
    if flat:
        nested.setdefault(updates[0], {}).update(flat)
    return nested


# ---------------------------------------------------------------- validation (no model needed)


def lazy_problems(config: PruneConfig) -> list[str]:
    """What a lazy run (one block at a time from the checkpoint to the output) needs that ``config`` lacks."""
    return [
        what
        for what, bad in (
            ("--allocation uniform", config.allocation != "uniform"),
            ("an unstructured --method", config.structured),
            ("a --group other than global", config.group == "global"),
            ("sequential calibration (not --no-sequential)", not config.sequential),
            ("no --recalibrate-bn (causal LMs have no BatchNorm)", bool(config.recalibrate_bn)),
        )
        if bad
    ]


def check_save_format(save_format: str) -> None:
    if save_format not in SAVE_FORMATS:
        raise PrunekitError(f"unknown save_format {save_format!r}; choose from {', '.join(SAVE_FORMATS)}")


def check_config(config: PruneConfig) -> None:
    """Every check that needs no model, in one place, before any loading or work."""
    from .graph import LAYER_TYPES
    from .groups import check_sparsity, parse_pattern

    check_sparsity(config.sparsity)
    nm = parse_pattern(config.pattern)
    _check_counts(config)
    _check_choice("dtype", config.dtype, DTYPES)
    _check_choice("offload_activations", config.offload_activations, OFFLOAD_MODES)
    _check_choice("stats_dtype", config.stats_dtype, ("float32", "float64"))
    _check_choice("expert_tokens", config.expert_tokens, EXPERT_TOKENS)
    unknown_types = sorted(set(config.layer_types) - set(LAYER_TYPES) - {"all"})
    if unknown_types:
        raise PrunekitError(f"unknown layer type(s) {unknown_types}; choose from {', '.join(LAYER_TYPES)} or all")
    check_device(config.device)
    if config.structured:
        _check_structured(config)
    else:
        _check_unstructured(config, nm)


def _check_counts(config: PruneConfig) -> None:
    for name in ("nsamples", "batch_size"):
        if not isinstance(getattr(config, name), int) or getattr(config, name) < 1:
            raise PrunekitError(f"{name} must be a positive integer, got {getattr(config, name)!r}")
    if not isinstance(config.expert_min_tokens, int) or config.expert_min_tokens < 0:
        raise PrunekitError(f"expert_min_tokens must be an integer >= 0, got {config.expert_min_tokens!r}")
    if config.seqlen is not None and (not isinstance(config.seqlen, int) or config.seqlen < 1):
        raise PrunekitError(f"seqlen must be a positive integer (tokens per window), got {config.seqlen!r}")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise PrunekitError(f"unknown {name} {value!r}; choose from {', '.join(choices)}")


def check_device(device: str | None) -> None:
    """A device string torch understands and this machine has (``cuda`` without a GPU fails here, at once)."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise PrunekitError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise PrunekitError(
            f"device {device!r} asked for, but torch sees no CUDA GPU here; use --device cpu (or leave --device out)"
        )
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise PrunekitError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")


def _check_unstructured(config: PruneConfig, nm: tuple[int, int] | None) -> None:
    from .allocate import ALLOCATORS
    from .groups import GLOBAL, GROUPS
    from .methods import METHODS, UPDATES, Solver
    from .structured import STRUCTURED

    if config.method not in METHODS:
        raise PrunekitError(
            f"unknown method {config.method!r}; available: {', '.join(METHODS.names())} "
            f"(structured: {', '.join(STRUCTURED.names())})"
        )
    METHODS.create(config.method, config.method_params)  # names, types and values of its parameters
    for name in config.update:
        UPDATES.create(name, config.update_params.get(name))
    if config.group is not None:
        GROUPS[config.group]  # noqa: B018  (raises with the registered groups)
    ALLOCATORS.create(config.allocation, config.allocation_params)
    if config.group == GLOBAL and issubclass(METHODS[config.method], Solver):
        raise PrunekitError(
            f"method {config.method!r} chooses its own masks layer by layer; use group per-output "
            "or per-layer, not global"
        )
    if config.group == GLOBAL and config.allocation != "uniform":
        raise PrunekitError(
            f"group 'global' sets every layer's sparsity with one threshold, so allocation "
            f"{config.allocation!r} cannot apply; use allocation uniform or another group"
        )
    if nm is not None and config.allocation != "uniform":
        raise PrunekitError(
            f"an N:M pattern fixes every layer's sparsity, so allocation {config.allocation!r} "
            "cannot apply; drop the pattern or use allocation uniform"
        )


# Settings structured methods do not use: setting one of them is an error, not a no-op.
UNUSED_BY_STRUCTURED = (
    "pattern",
    "group",
    "update",
    "update_params",
    "allocation",
    "allocation_params",
    "include",
    "exclude",
    "layer_types",
    "blocks",
    "recalibrate_bn",
    "expert_tokens",
    "expert_min_tokens",
    "kernels",
)


def _check_structured(config: PruneConfig) -> None:
    from .structured import STRUCTURED

    STRUCTURED.create(config.method, config.method_params)  # names, types and values of its parameters
    given = given_settings(config, (*UNUSED_BY_STRUCTURED, "sequential"))
    if given:
        raise PrunekitError(
            f"structured method {config.method!r} removes whole blocks/heads/channels and does not "
            f"use {flag_list(given)}; drop them (or choose an unstructured method)"
        )


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
