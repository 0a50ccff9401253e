"""The model class a checkpoint loads as, from its config.json alone."""

from __future__ import annotations

import pytest
import transformers

from prunekit.errors import PrunekitError
from prunekit.model_classes import class_of_architecture, resolve_model_class
from tests import zoo


@pytest.mark.parametrize(
    "architecture, expected",
    [
        ("LlamaForCausalLM", "causal-lm"),
        ("GPT2LMHeadModel", "causal-lm"),
        ("BertForMaskedLM", "masked-lm"),
        ("BertModel", "encoder"),
        ("BertForSequenceClassification", "sequence-classification"),
        ("T5ForConditionalGeneration", "seq2seq"),
        ("BartForConditionalGeneration", "seq2seq"),  # also listed as a masked LM
        ("LlavaForConditionalGeneration", "image-text-to-text"),  # also listed for pretraining
        ("Gemma3ForConditionalGeneration", "image-text-to-text"),  # also listed as a causal LM
        ("MyOwnForCausalLM", "causal-lm"),  # remote code: by the name's ending
        ("WhisperForConditionalGeneration", "speech-seq2seq"),
        ("ViTForImageClassification", "image-classification"),
        ("SwinForImageClassification", "image-classification"),
        ("ConvNextForImageClassification", "image-classification"),
        ("Dinov2Model", "vision-encoder"),  # also a bare AutoModel, like BertModel, but reads pixels
        ("CLIPVisionModel", "vision-encoder"),  # listed only as a bare AutoModel: by the name's ending
        ("CLIPModel", "dual-encoder"),
        ("SiglipModel", "dual-encoder"),
        ("Wav2Vec2Model", "audio-encoder"),
        ("Qwen2_5_VLForConditionalGeneration", "image-text-to-text"),
        ("MllamaForConditionalGeneration", "image-text-to-text"),
        ("JambaForCausalLM", "causal-lm"),
    ],
)
def test_architecture_names(architecture, expected):
    assert class_of_architecture(architecture, {}) == expected


def test_remote_code_is_read_from_auto_map():
    assert class_of_architecture("Strange", {"AutoModelForSeq2SeqLM": "modeling.Strange"}) == "seq2seq"


def test_resolution_and_override():
    bert = zoo.config("bert")
    bert.architectures = ["BertForMaskedLM"]
    assert resolve_model_class(bert) == "masked-lm"
    assert resolve_model_class(bert, "sequence-classification") == "sequence-classification"
    with pytest.raises(PrunekitError, match="'bert' model, which --model-class image-text-to-text cannot load"):
        resolve_model_class(bert, "image-text-to-text", "m")
    bert.architectures = ["BertForPoetry"]
    with pytest.raises(PrunekitError, match="architecture BertForPoetry is not .* pass --model-class"):
        resolve_model_class(bert, source="m")


def test_a_class_must_read_what_its_data_gives():
    """Whisper as a text encoder once ended in an AttributeError deep in the forward pass: refused from config.json,
    naming what the loaded class reads and the classes that fit."""
    whisper = zoo.config("whisper")
    whisper.architectures = ["WhisperForConditionalGeneration"]
    assert resolve_model_class(whisper) == "speech-seq2seq"
    with pytest.raises(PrunekitError, match="WhisperModel reads input_features, not the input_ids .* speech-seq2seq"):
        resolve_model_class(whisper, "encoder", "m")
    with pytest.raises(PrunekitError, match="--model-class seq2seq cannot load; choose one of .*speech-seq2seq"):
        resolve_model_class(whisper, "seq2seq", "m")
    vit = transformers.ViTConfig()
    vit.architectures = ["ViTModel"]
    assert resolve_model_class(vit, source="m") == "vision-encoder"
    with pytest.raises(PrunekitError, match="choose one of image-classification, vision-encoder"):
        resolve_model_class(vit, "encoder", "m")


def test_every_class_has_a_row_and_the_table_imports_no_torch():
    """One row per class: name, data, metric; the CLI's --help reads the table without importing torch."""
    import subprocess
    import sys

    from prunekit.model_classes import CHOICES, MODEL_CLASSES

    assert set(CHOICES) == {"auto"} | {n for n, row in MODEL_CLASSES.items() if row.transformers}
    assert all(
        row.data and row.metric and row.calibration and row.prepare and row.score for row in MODEL_CLASSES.values()
    )
    code = "import sys, prunekit.cli; prunekit.cli.build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_the_readme_table_of_classes_is_generated_from_the_rows():
    from pathlib import Path

    from tests.zoo.support import model_class_markdown

    recorded = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "model_classes.md"
    assert recorded.read_text() == model_class_markdown(), "stale: run python benchmarks/support.py --only llama"
