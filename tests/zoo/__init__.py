"""Tiny random models of every architecture family prunekit supports, built in-process from transformers'
own modeling code: nothing is downloaded, each builds in milliseconds, and every code path a real
checkpoint of the family takes (per-layer attention types, fused experts, encoder-decoder stacks, a vision
tower) is taken by the tiny one too.

    from tests.zoo import ZOO, build, batch
    model = build("gemma3")                    # a Gemma3ForCausalLM with 4 blocks, hidden 32
    inputs = batch("gemma3", torch.randint(2, VOCAB, (2, 16)))

The vocabulary matches the bundled KJV tokenizer (``prunekit/assets/kjv-llama-5m``), so a saved zoo model
can be calibrated from text through the CLI like a real checkpoint. Models that read images or sound take
32x32 images (16 patches of 8x8) or one second of 16 kHz audio, prepared by processors built from transformers'
own classes (``processor``), so a saved zoo model is a complete checkpoint.
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
TEXT_POSITIONS = 32  # a dual encoder's text tower: captions of up to 32 tokens

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
_VISION = dict(_SIZES, num_hidden_layers=2, image_size=IMAGE_SIZE, patch_size=PATCH)
LABELS = 10  # image classifiers: the digits' classes
SAMPLING_RATE, SECONDS = 16_000, 1  # audio: one second at 16 kHz
MEL_BINS, MEL_FRAMES = 16, 100  # Whisper: 16 log-mel bins every 10 ms
AUDIO_SAMPLES = 1600  # the waveform a batch of the audio encoder holds (0.1 s: 80 frames after its convolutions)


@dataclass(frozen=True)
class Spec:
    """One architecture: its config and model classes (names in ``transformers``) and the config values."""

    config: str
    model: str
    settings: dict[str, Any] = field(default_factory=dict)
    kind: str = "causal"  # causal | masked | seq2seq | vlm | image | dual | speech | audio
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
    # a hybrid state-space LM: Mamba and attention layers alternate in one block list, some with fused experts
    "jamba": Spec(
        "JambaConfig",
        "JambaForCausalLM",
        dict(
            _DECODER,
            num_hidden_layers=4,
            num_experts=4,
            num_experts_per_tok=2,
            expert_layer_period=2,
            expert_layer_offset=1,
            attn_layer_period=2,
            attn_layer_offset=1,
            mamba_d_state=2,  # a small state, as in Jamba (16 for a width of 4096)
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_dt_rank=4,
        ),
    ),
    # image models without token embeddings: a classifier head, or bare encoders (hidden states only)
    "vit": Spec("ViTConfig", "ViTForImageClassification", dict(_VISION, num_labels=LABELS), kind="image"),
    "dinov2": Spec("Dinov2Config", "Dinov2Model", dict(_VISION, mlp_ratio=2), kind="image"),
    "swin": Spec(  # stages of growing width, windowed attention, patch merging between stages
        "SwinConfig",
        "SwinForImageClassification",
        dict(image_size=IMAGE_SIZE, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4)
        | dict(num_labels=LABELS),
        kind="image",
    ),
    "convnext": Spec(  # Hugging Face's ConvNeXt (timm's is tested with the bundled convnext-digits)
        "ConvNextConfig",
        "ConvNextForImageClassification",
        dict(num_stages=2, hidden_sizes=[16, 32], depths=[2, 2], image_size=IMAGE_SIZE, num_labels=LABELS),
        kind="image",
    ),
    # speech: an encoder-decoder reading log-mel features, and a bare encoder reading the waveform
    "whisper": Spec(
        "WhisperConfig",
        "WhisperForConditionalGeneration",
        dict(
            vocab_size=VOCAB,
            num_mel_bins=MEL_BINS,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_source_positions=MEL_FRAMES // 2,
            max_target_positions=128,
            decoder_start_token_id=BOS,
            bos_token_id=BOS,
            eos_token_id=EOS,
            pad_token_id=EOS,
            begin_suppress_tokens=None,
            suppress_tokens=None,
        ),
        kind="speech",
    ),
    "wav2vec2": Spec(
        "Wav2Vec2Config",
        "Wav2Vec2Model",
        dict(
            _SIZES,
            num_hidden_layers=2,
            conv_dim=(16, 16),
            conv_stride=(5, 4),
            conv_kernel=(10, 8),
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
        ),
        kind="audio",
    ),
}


_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
_TOWER_IMAGE = dict(_TOWER, image_size=IMAGE_SIZE, patch_size=PATCH)
_TEXT_TOWER = dict(_TOWER, vocab_size=VOCAB, max_position_embeddings=TEXT_POSITIONS)
# Extra tokens a vision-language model's processor places in the text, added to the KJV tokenizer in this order
# (ids VOCAB, VOCAB + 1, ...).
VLM_TOKENS = {
    "llava": ("<image>",),
    "qwen2_5_vl": ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"),
    "mllama": ("<|image|>",),
}


def _llava_config():
    import transformers

    text = transformers.LlamaConfig(**{**_DECODER, "vocab_size": VOCAB + 1})
    vision = transformers.CLIPVisionConfig(**_TOWER_IMAGE, projection_dim=32)
    return transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN)


def _qwen2_5_vl_config():
    """Qwen2.5-VL: the vision tower reads every image of a batch as one packed sequence of patches (windowed and
    full attention), merges 2x2 patches into one token, and the language model places them with 3-D rotary
    positions."""
    import transformers

    text = dict(
        _DECODER,
        vocab_size=VOCAB + 4,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
    )
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        patch_size=PATCH,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=32,
        window_size=16,
        fullatt_block_indexes=[1],
    )
    ids = dict(image_token_id=VOCAB, vision_start_token_id=VOCAB + 1, vision_end_token_id=VOCAB + 2)
    return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, video_token_id=VOCAB + 3, **ids)


def _mllama_config():
    """Mllama (Llama 3.2 Vision): the language model attends to the image through cross-attention layers."""
    import transformers

    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        max_num_tiles=1,
        intermediate_layers_indices=[0],
        vision_output_dim=64,
        supported_aspect_ratios=[[1, 1]],
    )
    text = dict(_DECODER, vocab_size=VOCAB + 1, cross_attention_layers=[1], max_position_embeddings=256)
    return transformers.MllamaConfig(vision_config=vision, text_config=text, image_token_index=VOCAB)


def _dual_config(kind: str):
    """A CLIP- or SigLIP-style dual encoder: a text tower and a vision tower mapped into one embedding space."""
    import transformers

    text = dict(_TEXT_TOWER, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS)
    configs = {"clip": transformers.CLIPConfig, "siglip": transformers.SiglipConfig}
    extra = {"projection_dim": 16} if kind == "clip" else {}
    return configs[kind](text_config=text, vision_config=dict(_TOWER_IMAGE), **extra)


_CUSTOM_CONFIGS: dict[str, Callable[[], Any]] = {
    "llava": _llava_config,
    "qwen2_5_vl": _qwen2_5_vl_config,
    "mllama": _mllama_config,
    "clip": lambda: _dual_config("clip"),
    "siglip": lambda: _dual_config("siglip"),
}
ZOO["llava"] = Spec("LlavaConfig", "LlavaForConditionalGeneration", kind="vlm")
ZOO["qwen2_5_vl"] = Spec("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", kind="vlm")
ZOO["mllama"] = Spec("MllamaConfig", "MllamaForConditionalGeneration", kind="vlm")
ZOO["clip"] = Spec("CLIPConfig", "CLIPModel", kind="dual")
ZOO["siglip"] = Spec("SiglipConfig", "SiglipModel", kind="dual")


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


def image_tokens(name: str = "llava") -> int:
    """The placeholder tokens one image takes in the text (Qwen2.5-VL merges 2x2 patches; Mllama: one)."""
    patches = (IMAGE_SIZE // PATCH) ** 2
    return {"qwen2_5_vl": patches // 4, "mllama": 1}.get(name, patches)


def batch(name: str, ids: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Model inputs for a ``[batch, seqlen]`` tensor of token ids: what calibration feeds the model.

    Encoder-decoders get the same ids as decoder inputs; vision-language models get one random image per
    row, its placeholder tokens after the first token (``seqlen`` must exceed ``image_tokens()``); image models
    get random images, dual encoders images and ids, speech models random features (the random values are seeded
    by the ids unless a ``generator`` is given)."""
    kind = ZOO[name].kind
    generator = generator or torch.Generator().manual_seed(int(ids.sum()))
    rows = ids.shape[0]
    if kind == "seq2seq":
        return {"input_ids": ids, "decoder_input_ids": ids}
    if kind == "vlm":
        return _VLM_INPUTS[name](ids.clone(), generator)
    if kind == "image":
        return {"pixel_values": _images(rows, generator)}
    if kind == "dual":
        return {"input_ids": ids, "pixel_values": _images(rows, generator)}
    if kind == "speech":
        return {
            "input_features": torch.randn(rows, MEL_BINS, MEL_FRAMES, generator=generator),
            "decoder_input_ids": ids,
        }
    if kind == "audio":
        return {"input_values": torch.randn(rows, AUDIO_SAMPLES, generator=generator)}
    return {"input_ids": ids}


def _images(rows: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(rows, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)


def _llava_inputs(ids: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    ids[:, 1 : 1 + image_tokens()] = IMAGE_TOKEN
    return {"input_ids": ids, "pixel_values": _images(ids.shape[0], generator)}


def _qwen2_5_vl_inputs(ids: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """As Qwen2VLImageProcessor packs them: every image's patches in one ``[patches, 3 * 2 * 8 * 8]`` tensor, with
    each image's (frames, rows, columns) grid."""
    rows, grid = ids.shape[0], IMAGE_SIZE // PATCH
    tokens = image_tokens("qwen2_5_vl")
    ids[:, 1], ids[:, 2 : 2 + tokens], ids[:, 2 + tokens] = VOCAB + 1, VOCAB, VOCAB + 2
    return {
        "input_ids": ids,
        "pixel_values": torch.randn(rows * grid * grid, 3 * 2 * PATCH * PATCH, generator=generator),
        "image_grid_thw": torch.tensor([[1, grid, grid]] * rows),
        "mm_token_type_ids": (ids == VOCAB).long(),
    }


def _mllama_inputs(ids: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """As MllamaProcessor makes them: one image of one tile per row, seen by the tokens from its placeholder on."""
    rows = ids.shape[0]
    ids[:, 1] = VOCAB
    cross = torch.zeros(rows, ids.shape[1], 1, 1, dtype=torch.long)
    cross[:, 1:] = 1
    return {
        "input_ids": ids,
        "pixel_values": torch.randn(rows, 1, 1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
        "aspect_ratio_ids": torch.ones(rows, 1, dtype=torch.long),
        "aspect_ratio_mask": torch.ones(rows, 1, 1, dtype=torch.long),
        "cross_attention_mask": cross,
    }


_VLM_INPUTS = {"llava": _llava_inputs, "qwen2_5_vl": _qwen2_5_vl_inputs, "mllama": _mllama_inputs}


def output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's main output for ``inputs``: logits, a dual encoder's image-text logits, else the last hidden
    state (bare encoders)."""
    from prunekit.forward import run_model

    out = run_model(model, inputs)
    for key in ("logits", "logits_per_image", "last_hidden_state"):
        if isinstance(out.get(key), torch.Tensor):
            return out[key]
    raise AssertionError(f"{type(model).__name__} returned none of logits, logits_per_image, last_hidden_state")


def token_ids(batch_size: int = 2, seqlen: int = 24, seed: int = 0) -> torch.Tensor:
    """Random ids that avoid the special tokens."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch_size, seqlen), generator=generator)


def tokenizer(name: str):
    """The bundled KJV tokenizer as ``name``'s checkpoint ships it: a ``[MASK]`` stand-in for masked LMs, padding
    for dual encoders, a vision-language model's extra tokens."""
    import transformers

    from prunekit.cli import demo_assets

    tok = transformers.AutoTokenizer.from_pretrained(demo_assets() / "kjv-llama-5m")
    if ZOO[name].kind == "masked":
        tok.add_special_tokens({"mask_token": "<unk>"})  # an existing token stands in for [MASK]
    if ZOO[name].kind in ("dual", "speech"):
        tok.pad_token = tok.eos_token  # CLIP pads with its end-of-text token, and pools where it first appears
    if name in VLM_TOKENS:
        tok.add_special_tokens({"additional_special_tokens": list(VLM_TOKENS[name])})
    return tok


def processor(name: str):
    """What a checkpoint of ``name`` ships to turn data into inputs, built from transformers' own classes: the
    tokenizer, an image processor, a feature extractor, or a processor holding both."""
    import transformers as t

    kind = ZOO[name].kind
    if kind in ("causal", "masked", "seq2seq"):
        return tokenizer(name)
    square = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    if kind == "audio":
        return t.Wav2Vec2FeatureExtractor(sampling_rate=SAMPLING_RATE)
    if kind == "speech":
        features = t.WhisperFeatureExtractor(feature_size=MEL_BINS, sampling_rate=SAMPLING_RATE, chunk_length=SECONDS)
        return t.WhisperProcessor(feature_extractor=features, tokenizer=tokenizer(name))
    images = {
        "vit": lambda: t.ViTImageProcessor(size=square),
        "swin": lambda: t.ViTImageProcessor(size=square),
        "dinov2": lambda: t.BitImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=square),
        "convnext": lambda: t.ConvNextImageProcessor(size={"shortest_edge": IMAGE_SIZE}),
        "clip": lambda: t.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=square),
        "siglip": lambda: t.SiglipImageProcessor(size=square),
        "llava": lambda: t.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=square),
        "mllama": lambda: t.MllamaImageProcessor(size=square, max_image_tiles=1),
        "qwen2_5_vl": lambda: t.Qwen2VLImageProcessor(
            patch_size=PATCH, merge_size=2, temporal_patch_size=2, min_pixels=IMAGE_SIZE**2, max_pixels=IMAGE_SIZE**2
        ),
    }[name]()
    if kind == "image":
        return images
    if name == "clip":
        return t.CLIPProcessor(image_processor=images, tokenizer=tokenizer(name))
    if name == "siglip":
        return t.SiglipProcessor(image_processor=images, tokenizer=tokenizer(name))
    if name == "mllama":
        return t.MllamaProcessor(image_processor=images, tokenizer=tokenizer(name))
    if name == "qwen2_5_vl":
        videos = t.Qwen2VLVideoProcessor(patch_size=PATCH, merge_size=2, temporal_patch_size=2)
        return t.Qwen2_5_VLProcessor(image_processor=images, tokenizer=tokenizer(name), video_processor=videos)
    return t.LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer(name),
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
