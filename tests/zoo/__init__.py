"""Tiny random models of every architecture family prunekit supports, built in-process from transformers'
own modeling code: nothing is downloaded, each builds in milliseconds, and every code path a real
checkpoint of the family takes (per-layer attention types, fused experts, encoder-decoder stacks, a vision
tower) is taken by the tiny one too.

    from tests.zoo import ZOO, build, batch
    model = build("gemma3")                    # a Gemma3ForCausalLM with 4 blocks, hidden 32
    inputs = batch("gemma3", torch.randint(2, VOCAB, (2, 16)))

The vocabulary matches the bundled KJV tokenizer (``prunekit/assets/kjv-llama-5m``), so a saved zoo model
can be calibrated from text through the CLI like a real checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

VOCAB = 4096  # the bundled KJV tokenizer's vocabulary
BOS, EOS = 0, 1
IMAGE_TOKEN = VOCAB  # LLaVA-style models: ``<image>``, added to the tokenizer; the processor expands it per patch
IMAGE_SIZE, PATCH = 32, 8  # 16 image tokens per image

_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
_DECODER = dict(
    _SIZES,
    vocab_size=VOCAB,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=EOS,
)
_MOE = dict(num_experts_per_tok=2)


@dataclass(frozen=True)
class Spec:
    """One architecture: its config and model classes (names in ``transformers``) and the config values."""

    config: str
    model: str
    settings: dict[str, Any] = field(default_factory=dict)
    kind: str = "causal"  # causal | masked | seq2seq | vlm
    moe: bool = False

    def build_config(self):
        import transformers

        return getattr(transformers, self.config)(**self.settings)


ZOO: dict[str, Spec] = {
    # decoder-only LMs, LLaMA-like
    "llama": Spec("LlamaConfig", "LlamaForCausalLM", _DECODER),
    "mistral": Spec("MistralConfig", "MistralForCausalLM", dict(_DECODER, sliding_window=8)),
    "qwen2": Spec("Qwen2Config", "Qwen2ForCausalLM", _DECODER),
    "qwen3": Spec("Qwen3Config", "Qwen3ForCausalLM", dict(_DECODER, head_dim=8)),
    "phi3": Spec("Phi3Config", "Phi3ForCausalLM", _DECODER),
    "gemma": Spec("GemmaConfig", "GemmaForCausalLM", dict(_DECODER, head_dim=8)),
    # sliding-window and full-attention layers alternate: per-layer masks and rotary tables
    "gemma2": Spec("Gemma2Config", "Gemma2ForCausalLM", dict(_DECODER, head_dim=8, sliding_window=4)),
    "gemma3": Spec(
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(_DECODER, head_dim=8, sliding_window=4, num_hidden_layers=4, sliding_window_pattern=2),
    ),
    "olmo2": Spec("Olmo2Config", "Olmo2ForCausalLM", _DECODER),
    "starcoder2": Spec("Starcoder2Config", "Starcoder2ForCausalLM", _DECODER),
    # decoder-only LMs, other shapes (HF Conv1D, fused QKV, parallel attention + MLP, learned positions, LayerNorm)
    "gpt2": Spec(
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=128, bos_token_id=BOS, eos_token_id=EOS),
    ),
    "opt": Spec(
        "OPTConfig",
        "OPTForCausalLM",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=32,
            bos_token_id=BOS,
            eos_token_id=EOS,
            pad_token_id=EOS,
        ),
    ),
    "falcon": Spec(
        "FalconConfig",
        "FalconForCausalLM",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            bos_token_id=BOS,
            eos_token_id=EOS,
        ),
    ),
    "gpt_neox": Spec("GPTNeoXConfig", "GPTNeoXForCausalLM", _DECODER),
    # Phi-2's class: one LayerNorm read by attention and MLP in parallel, partial rotary, biased head
    "phi": Spec("PhiConfig", "PhiForCausalLM", _DECODER),
    # mixture of experts: experts are fused 3-D tensors in transformers 5
    "mixtral": Spec("MixtralConfig", "MixtralForCausalLM", dict(_DECODER, **_MOE, num_local_experts=4), moe=True),
    "qwen2_moe": Spec(
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(_DECODER, **_MOE, num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=32),
        moe=True,
    ),
    "qwen3_moe": Spec(
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(_DECODER, **_MOE, num_experts=4, moe_intermediate_size=16, head_dim=8),
        moe=True,
    ),
    "gpt_oss": Spec(
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(_DECODER, **_MOE, num_local_experts=4, head_dim=8, sliding_window=4),
        moe=True,
    ),
    "deepseek_v3": Spec(
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            _DECODER,
            **_MOE,
            num_key_value_heads=4,
            n_routed_experts=4,
            moe_intermediate_size=16,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            head_dim=8,
        ),
        moe=True,
    ),
    # Llama 4: its own experts module (tokens dispatched per expert, pre-scaled by the router score), MoE and
    # dense MLP layers alternating as in Maverick, top-1 routing with a shared expert
    "llama4": Spec(
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        dict(
            _DECODER,
            num_hidden_layers=4,
            intermediate_size=32,
            intermediate_size_mlp=64,
            head_dim=8,
            num_local_experts=4,
            num_experts_per_tok=1,
            interleave_moe_layer_step=2,
        ),
        moe=True,
    ),
    # JetMoE: experts as one fused matrix per module called with tokens sorted by expert, in the MLP and as
    # mixture-of-attention heads
    "jetmoe": Spec(
        "JetMoeConfig",
        "JetMoeForCausalLM",
        dict(
            {k: v for k, v in _DECODER.items() if k != "num_attention_heads"},
            **_MOE,
            intermediate_size=32,
            num_local_experts=4,
            kv_channels=8,
        ),
        moe=True,
    ),
    # encoders
    "bert": Spec(
        "BertConfig", "BertForMaskedLM", dict(_SIZES, vocab_size=VOCAB, max_position_embeddings=128), kind="masked"
    ),
    "roberta": Spec(
        "RobertaConfig",
        "RobertaForMaskedLM",
        dict(
            _SIZES, vocab_size=VOCAB, max_position_embeddings=130, pad_token_id=EOS, bos_token_id=BOS, eos_token_id=EOS
        ),
        kind="masked",
    ),
    # encoder-decoder
    "t5": Spec(
        "T5Config",
        "T5ForConditionalGeneration",
        dict(
            vocab_size=VOCAB,
            d_model=32,
            d_ff=64,
            d_kv=8,
            num_layers=3,
            num_heads=4,
            decoder_start_token_id=BOS,
            pad_token_id=EOS,
            eos_token_id=EOS,
        ),
        kind="seq2seq",
    ),
}


def _llava_config():
    import transformers

    text = transformers.LlamaConfig(**{**_DECODER, "vocab_size": VOCAB + 1})
    vision = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        projection_dim=32,
    )
    return transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN)


_CUSTOM_CONFIGS: dict[str, Callable[[], Any]] = {"llava": _llava_config}
ZOO["llava"] = Spec("LlavaConfig", "LlavaForConditionalGeneration", kind="vlm")


def config(name: str):
    """The tiny config of architecture ``name``."""
    if name in _CUSTOM_CONFIGS:
        return _CUSTOM_CONFIGS[name]()
    return ZOO[name].build_config()


def build(name: str, seed: int = 0) -> nn.Module:
    """A freshly initialised tiny ``name`` model in eval mode, float32, the same weights for the same seed."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, ZOO[name].model)(config(name))
    return model.float().eval()


def image_tokens() -> int:
    return (IMAGE_SIZE // PATCH) ** 2


def batch(name: str, ids: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Model inputs for a ``[batch, seqlen]`` tensor of token ids: what calibration feeds the model.

    Encoder-decoders get the same ids as decoder inputs; vision-language models get one random image per
    row, its placeholder tokens after the first token (``seqlen`` must exceed ``image_tokens()``)."""
    kind = ZOO[name].kind
    if kind == "seq2seq":
        return {"input_ids": ids, "decoder_input_ids": ids}
    if kind == "vlm":
        ids = ids.clone()
        ids[:, 1 : 1 + image_tokens()] = IMAGE_TOKEN
        pixels = torch.randn(ids.shape[0], 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        return {"input_ids": ids, "pixel_values": pixels}
    return {"input_ids": ids}


def token_ids(batch_size: int = 2, seqlen: int = 24, seed: int = 0) -> torch.Tensor:
    """Random ids that avoid the special tokens."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch_size, seqlen), generator=generator)


def processor(name: str):
    """What a checkpoint of ``name`` ships to turn data into inputs: the bundled KJV tokenizer, and for a
    vision-language model a processor around it (CLIP image processor, ``<image>`` token added)."""
    import transformers

    from prunekit.cli import demo_assets

    tokenizer = transformers.AutoTokenizer.from_pretrained(demo_assets() / "kjv-llama-5m")
    if ZOO[name].kind == "masked":
        tokenizer.add_special_tokens({"mask_token": "<unk>"})  # an existing token stands in for [MASK]
    if ZOO[name].kind != "vlm":
        return tokenizer
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    images = transformers.CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return transformers.LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def save(name: str, path, model: nn.Module | None = None) -> None:
    """``model`` (default: a fresh ``build(name)``) saved as a checkpoint the CLI can prune: weights, config and the
    tokenizer / processor."""
    (model if model is not None else build(name)).save_pretrained(path)
    processor(name).save_pretrained(path)


def write_image_text(folder, lines: list[str]):
    """The CLI's image-text data format: ``data.jsonl`` beside an ``images/`` folder of small PNGs."""
    import json
    from pathlib import Path

    from PIL import Image

    folder = Path(folder)
    (folder / "images").mkdir(parents=True)
    records = []
    for i, line in enumerate(lines):
        Image.new("RGB", (40, 30), (20 * i % 256, 255 - 20 * i % 256, 90)).save(folder / "images" / f"{i}.png")
        records.append({"image": f"images/{i}.png", "text": line})
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder
