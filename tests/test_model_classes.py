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
        ("WhisperForConditionalGeneration", None),  # speech: not a class prunekit loads
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


def test_vision_only_configs_are_not_text_models():
    vit = transformers.ViTConfig()
    vit.architectures = ["ViTModel"]
    with pytest.raises(PrunekitError, match="not a text model"):
        resolve_model_class(vit, source="m")
