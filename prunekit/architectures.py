"""What prunekit knows about model families that it cannot read off the model, in one place.

Almost everything is generic: layers are found by type, block lists as the longest list of identical modules,
MoE experts by the attributes transformers' ``@use_experts_implementation`` records (``EXPERTS_LAYOUTS`` below
describes the experts classes transformers ships without it), the model class from
``architectures`` in config.json (``prunekit.model_classes``). What remains are names: of the projections a
structured method couples, of the config entries that describe layers by position, and a few per-family facts
keyed by the Hugging Face ``model_type``. A new family needs an entry here only when a check of the support
table (``tests/zoo``, ``benchmarks/support.py``) says so; docs/architectures.md walks through it.

This module imports no torch: it is data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# ---------------------------------------------------------------- module layouts (attribute names, any family)

# The residual stream of a pre-norm decoder layer, for SliceGPT (paths below the layer; each list is tried in order
# and the first entry whose modules all exist is used). The pre-norms: two (attention, MLP) or one read by both
# sublayers (parallel attention and MLP: Falcon-7B, Phi, GPT-J). Where there are two, the attention readers read the
# first and the MLP readers the second, in sequential blocks and in parallel ones (GPT-NeoX) alike.
PRE_NORMS = (
    ("input_layernorm", "post_attention_layernorm"),  # LLaMA family, GPT-NeoX, StarCoder 2, Falcon (sequential)
    ("ln_1", "ln_2"),  # GPT-2
    ("self_attn_layer_norm", "final_layer_norm"),  # OPT (its MLP pre-norm is called final_layer_norm)
    ("ln_attn", "ln_mlp"),  # Falcon's new decoder architecture
    ("input_layernorm",),  # Falcon-7B, Phi
    ("ln_1",),  # GPT-J
)
ATTENTION_READERS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.qkv_proj",),  # Phi-3
    ("attn.c_attn",),  # GPT-2 (HF Conv1D)
    ("self_attention.query_key_value",),  # Falcon
    ("attention.query_key_value",),  # GPT-NeoX
    ("attn.q_proj", "attn.k_proj", "attn.v_proj"),  # GPT-J
)
ATTENTION_WRITERS = (
    "self_attn.o_proj",
    "self_attn.out_proj",  # OPT
    "self_attn.dense",  # Phi
    "attn.c_proj",  # GPT-2
    "self_attention.dense",  # Falcon
    "attention.dense",  # GPT-NeoX
    "attn.out_proj",  # GPT-J
)
MLP_READERS = (
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.gate_up_proj",),  # Phi-3
    ("mlp.c_fc",),  # GPT-2, StarCoder 2
    ("fc1",),  # OPT
    ("mlp.fc1",),  # Phi
    ("mlp.dense_h_to_4h",),  # Falcon, GPT-NeoX
    ("mlp.fc_in",),  # GPT-J
)
MLP_WRITERS = ("mlp.down_proj", "mlp.c_proj", "fc2", "mlp.fc2", "mlp.dense_4h_to_h", "mlp.fc_out")
# The norm after the last block, next to the blocks (LLaMA, GPT-2 and Falcon, OPT and GPT-NeoX, Phi).
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm")
# Config entries holding the residual norms' epsilon.
NORM_EPS_KEYS = ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", "norm_epsilon")

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


_POST_NORM = (
    "its blocks are post-norm (LayerNorm(x + sublayer(x))): the norm scales the residual stream itself per "
    "channel, which no rotation commutes with"
)

FAMILIES: dict[str, Family] = {
    "gpt2": Family(mlp_size="n_inner"),
    "opt": Family(mlp_size="ffn_dim"),
    "falcon": Family(mlp_size="ffn_hidden_size"),
    # T5's stacks size themselves from private config copies; block 0 alone holds the relative position bias
    # that every later block of its stack reuses.
    "t5": Family(
        mlp_size="d_ff", saved_counts={"encoder": "num_layers", "decoder": "num_decoder_layers"}, pinned_blocks=(0,)
    ),
    # Post-norm blocks, LayerNorm(x + sublayer(x)): the stream itself is normalised with a per-channel scale.
    "bert": Family(no_slicegpt=_POST_NORM),
    "roberta": Family(no_slicegpt=_POST_NORM),
    "llava": Family(
        no_slicegpt="the vision projector's hidden layer is as wide as the text model (text_config.hidden_size) "
        "and sits behind a GELU, which no rotation passes"
    ),
}


def family(model_type: str | None) -> Family:
    """The facts recorded for ``model_type`` (the defaults for any family not listed)."""
    return FAMILIES.get(model_type or "", Family())


# ---------------------------------------------------------------- fused mixture-of-experts layouts

EXPERT_CALLS = ("routed", "dispatched", "sized", "shared")
EXPERT_GATES = ("module", "act", "chunk", "pair", "none")


@dataclass(frozen=True)
class ExpertsLayout:
    """How one fused experts module stores its experts and is called; ``prunekit.moe`` reads nothing else.

    ``call``: what the module receives -- ``routed``: ``(hidden_states [tokens, H], top_k_index, top_k_weights)``,
    each expert picks its tokens from the index; ``dispatched``: ``hidden_states [experts * tokens, H]``, tokens
    already repeated per expert and scaled by their router score (a token not routed to an expert is a zero row
    there); ``sized``: ``(inputs sorted by expert, expert_size)``, expert ``e`` gets the ``e``-th slice;
    ``shared``: ``(hidden_states, gammas [tokens, experts])``, every token reaches every (shared) expert and
    ``gammas`` scales each expert's activated up projection per token.
    ``params``: the fused parameters (paths below the module), in forward order; with more than one, the last
    reads the activated up projection and the others the module's input. ``transposed``: those stored
    ``[experts, in, out]`` instead of the Linear layout ``[experts, out, in]``. ``bias``: ``<param>_bias
    [experts, out]`` is added. ``gate``: how the up projection becomes the last parameter's input -- ``module``:
    the module's own ``_apply_gate``; ``act``: the activation ``act`` alone; ``chunk``: ``act(first half) *
    second half``; ``pair``: ``act(params[0] x) * params[1] x``; ``none``: one matrix, nothing follows.
    ``post_norm``: the module's ``post_expert_norm`` follows each expert. ``count``: the attribute that holds the
    number of experts when the parameters are stacked 2-D ``[experts * out, in]`` (else their leading size).
    """

    call: str = "routed"
    params: tuple[str, ...] = ("gate_up_proj", "down_proj")
    transposed: tuple[str, ...] = ()
    bias: bool = False
    gate: str = "module"
    act: str = "act_fn"
    post_norm: bool = False
    count: str = ""

    def __post_init__(self):
        reads_input = {"none": 1, "pair": 2}.get(self.gate, 1)  # parameters applied to the module's input
        if self.call not in EXPERT_CALLS or self.gate not in EXPERT_GATES:
            raise ValueError(f"call must be one of {EXPERT_CALLS} and gate one of {EXPERT_GATES}: {self}")
        if len(self.params) != reads_input + (self.gate != "none") or not set(self.transposed) <= set(self.params):
            raise ValueError(f"gate {self.gate!r} does not fit the parameters {self.params}: {self}")

    @property
    def up(self) -> tuple[str, ...]:
        """The parameters applied to the module's input (the others read the activated up projection)."""
        return self.params if self.gate == "none" else self.params[:-1]


# Experts classes transformers ships without ``@use_experts_implementation`` (whose attributes describe every
# other family), by class name (subclasses match). ``tests/test_moe.py`` walks transformers' modeling code and
# fails on an experts class that is neither decorated nor listed here.
EXPERTS_LAYOUTS: dict[str, ExpertsLayout] = {
    # Llama 4: tokens arrive repeated per expert and pre-scaled by the router's sigmoid score.
    "Llama4TextExperts": ExpertsLayout(call="dispatched", transposed=("gate_up_proj", "down_proj"), gate="chunk"),
    # Step 3.7: the decorated layout (own _apply_gate with clamps), without the decorator.
    "Step3p7Experts": ExpertsLayout(),
    # LongCat-Flash: gate_up_proj also has rows for the zero-compute (identity) experts, which nothing reads.
    "LongcatFlashExperts": ExpertsLayout(gate="chunk"),
    # JetMoE: one fused matrix per module, used twice per MoE MLP (input_linear -> GLU -> output_linear) and for
    # the mixture-of-attention heads' query and output projections.
    "JetMoeParallelExperts": ExpertsLayout(call="sized", params=("weight",), gate="none"),
    # Inkling: shared experts that every token passes, weighted per token by the router's shared gammas.
    "InklingSharedExperts": ExpertsLayout(call="shared", params=("gate_proj", "up_proj", "down_proj"), gate="pair"),
    # DBRX: the matrices live on the child ``mlp`` stacked 2-D [experts * ffn, hidden]; w2 is stored [in, out].
    "DbrxExperts": ExpertsLayout(
        params=("mlp.w1", "mlp.v1", "mlp.w2"),
        transposed=("mlp.w2",),
        gate="pair",
        act="mlp.activation_fn",
        count="num_experts",
    ),
}
