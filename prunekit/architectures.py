"""What prunekit knows about model families that it cannot read off the model, in one place.

Almost everything is generic: layers are found by type, block lists as the longest list of identical modules,
MoE experts by the attributes transformers' ``@use_experts_implementation`` records, the model class from
``architectures`` in config.json (``prunekit.model_classes``). What remains are names: of the projections a
structured method couples, of the config entries that describe layers by position, and a few per-family facts
keyed by the Hugging Face ``model_type``. A new family needs an entry here only when a check of the support
table (``tests/zoo``, ``benchmarks/support.py``) says so; docs/architectures.md walks through it.

This module imports no torch: it is data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# ---------------------------------------------------------------- module layouts (attribute names, any family)

# Readers of the residual stream in a LLaMA-style decoder layer's sublayers (one of these layouts each) and the
# norms in front of them: q/k/v (or Phi-3's fused qkv_proj) after input_layernorm; gate/up (or gate_up_proj)
# after post_attention_layernorm. Used by SliceGPT.
ATTENTION_READERS = (("q_proj", "k_proj", "v_proj"), ("qkv_proj",))
MLP_READERS = (("gate_proj", "up_proj"), ("gate_up_proj",))
PRE_NORMS = ("input_layernorm", "post_attention_layernorm")

# (reader, writer) of a plain MLP around an elementwise activation, as paths below the module holding both: OPT
# and timm, GPT-2 and StarCoder 2, Falcon and GPT-NeoX, BERT, T5. Used by width pruning's coupling.
PLAIN_MLPS = (
    ("fc1", "fc2"),
    ("c_fc", "c_proj"),
    ("dense_h_to_4h", "dense_4h_to_h"),
    ("intermediate.dense", "output.dense"),
    ("wi", "wo"),
)

# ---------------------------------------------------------------- config entries that describe layers by position

# Rewritten for the kept layers when depth pruning removes blocks (transformers' names):
PER_LAYER_LISTS = (
    "layer_types",
    "mlp_layer_types",
    "layers_block_type",
    "layer_rope_theta",
    "no_rope_layers",
    "prunekit_layer_sizes",  # blocks of different sizes after width pruning of a layer range
)
LAYER_INDEX_LISTS = ("mlp_only_layers", "moe_layers")  # indices of the layers that are special
LEADING_COUNTS = ("first_k_dense_replace", "max_window_layers")  # the first k layers are special

# ---------------------------------------------------------------- per-family facts, by model_type


@dataclass(frozen=True)
class Family:
    """Facts about one family that no generic rule finds.

    ``mlp_size``: the config entry holding the MLP width (width pruning rewrites it). ``saved_counts``: block list
    (first path component) -> the config entry that holds its block count, where that is not ``num_hidden_layers``
    (depth pruning). ``pinned_blocks``: blocks holding weights later blocks reuse, never removed. ``no_slicegpt``:
    why SliceGPT cannot rotate this family's residual stream ('' = nothing family-specific)."""

    mlp_size: str = "intermediate_size"
    saved_counts: dict[str, str] = field(default_factory=dict)
    pinned_blocks: tuple[int, ...] = ()
    no_slicegpt: str = ""


FAMILIES: dict[str, Family] = {
    "gpt2": Family(mlp_size="n_inner"),
    "opt": Family(mlp_size="ffn_dim"),
    "falcon": Family(mlp_size="ffn_hidden_size"),
    # T5's stacks size themselves from private config copies; block 0 alone holds the relative position bias
    # that every later block of its stack reuses.
    "t5": Family(
        mlp_size="d_ff", saved_counts={"encoder": "num_layers", "decoder": "num_decoder_layers"}, pinned_blocks=(0,)
    ),
    "llava": Family(
        no_slicegpt="the vision projector's hidden layer is as wide as the text model (text_config.hidden_size) "
        "and sits behind a GELU, which no rotation passes"
    ),
}


def family(model_type: str | None) -> Family:
    """The facts recorded for ``model_type`` (the defaults for any family not listed)."""
    return FAMILIES.get(model_type or "", Family())
