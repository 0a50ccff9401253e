"""``prunekit prune`` on every class of Hugging Face model it loads (issue 15): tiny zoo models saved with the bundled
KJV tokenizer, calibrated and evaluated from the command line as a user's checkpoint would be."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from prunekit.cli import demo_assets, main
from tests import zoo

# name -> (how it is built, the class it loads as, the auto class that reloads the output)
CASES = {
    "llama": ("causal-lm", "AutoModelForCausalLM"),
    "bert": ("masked-lm", "AutoModelForMaskedLM"),
    "roberta": ("masked-lm", "AutoModelForMaskedLM"),
    "t5": ("seq2seq", "AutoModelForSeq2SeqLM"),
    "llava": ("image-text-to-text", "AutoModelForImageTextToText"),
    "bert-classifier": ("sequence-classification", "AutoModelForSequenceClassification"),
    "bert-encoder": ("encoder", "AutoModel"),
}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "bert-classifier":
        config = zoo.config("bert")
        config.num_labels = 3
        return transformers.BertForSequenceClassification(config)
    if name == "bert-encoder":
        return transformers.BertModel(zoo.config("bert"))
    return zoo.build(name)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Every case saved as a checkpoint with its tokenizer (LLaVA: its processor), plus the data files."""
    root = tmp_path_factory.mktemp("models")
    for name in CASES:
        model = build(name)
        model.save_pretrained(root / name)
        zoo.processor("llava" if name == "llava" else "bert").save_pretrained(root / name)
    text = (demo_assets() / "kjv" / "test.txt").read_text()
    (root / "train.txt").write_text(text[:30000])
    (root / "test.txt").write_text(text[30000:36000])
    verses = [line for line in text.splitlines() if line.strip()][:24]
    labeled = "".join(json.dumps({"text": v, "label": i % 3}) + "\n" for i, v in enumerate(verses))
    (root / "labeled.jsonl").write_text(labeled)
    zoo.write_image_text(root / "pairs", verses[:8])
    return root


def eval_data(models: Path, name: str) -> Path:
    return {"llava": models / "pairs", "bert-classifier": models / "labeled.jsonl"}.get(name, models / "test.txt")


def prune_args(models: Path, name: str, out: Path, *extra: str) -> list[str]:
    """4 samples in batches of 2; text models in 32-token windows, image-text models one record a sample."""
    data = ["--calib-data", str(models / "pairs")] if name == "llava" else ["--calib-data", str(models / "train.txt")]
    data += ["--eval-data", str(eval_data(models, name))]
    windows = [] if name == "llava" else ["--seqlen", "32"]
    model = ["--model", str(models / name)]
    return ["prune", *model, *data, "--nsamples", "4", "--batch-size", "2", *windows, "--out", str(out), *extra]


METRIC = {
    "causal-lm": "ppl",
    "masked-lm": "mlm_ppl",
    "seq2seq": "decoder_ppl",
    "image-text-to-text": "text_ppl",
    "sequence-classification": "accuracy",
    "encoder": "embedding_cosine",
}


def zero_fraction(model: torch.nn.Module, layer: str) -> float:
    return float((model.get_submodule(layer).weight == 0).float().mean())


@pytest.mark.parametrize("name", CASES)
def test_prune_any_model_class_end_to_end(models, tmp_path, name):
    check_end_to_end(models, tmp_path, name)


def test_image_text_model_one_record_a_batch(models, tmp_path):
    check_end_to_end(models, tmp_path, "llava", "--batch-size", "1")


def check_end_to_end(models: Path, tmp_path: Path, name: str, *extra: str) -> None:
    """Exit 0; the output reloads as the checkpoint's own class, pruned to the sparsity asked; the report holds the
    class's metric and the resolved class."""
    model_class, auto = CASES[name]
    out = tmp_path / "out"
    assert main(prune_args(models, name, out, *extra)) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["settings"]["model_class"] == model_class
    assert report["sparsity"] == pytest.approx(0.5)
    assert report["metrics"][METRIC[model_class]] > 0
    assert yaml.safe_load((out / "recipe.yaml").read_text())["model_class"] == model_class  # resolved, not auto
    reloaded = getattr(transformers, auto).from_pretrained(out)
    assert type(reloaded).__name__ == json.loads((models / name / "config.json").read_text())["architectures"][0]
    assert all(zero_fraction(reloaded, layer) == pytest.approx(0.5) for layer in report["layers"])


def test_classifier_without_labels_reports_agreement_with_the_dense_model(models, tmp_path):
    argv = prune_args(models, "bert-classifier", tmp_path / "out")
    argv[argv.index("--eval-data") + 1] = str(models / "test.txt")
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "out" / "prune_report.json").read_text())["metrics"]
    assert set(metrics) == {"agreement"} and 0 <= metrics["agreement"] <= 1


def test_the_model_class_can_be_overridden_by_flag_and_recipe(models, tmp_path, capsys):
    """An architecture prunekit does not know loads with --model-class (or model_class: in a recipe)."""
    unknown = tmp_path / "custom"
    shutil.copytree(models / "bert", unknown)
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "architectures": ["BertForPoetry"]}))
    argv = prune_args(models, "bert", tmp_path / "o1")
    argv[argv.index("--model") + 1] = str(unknown)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "BertForPoetry" in err and "--model-class" in err and not (tmp_path / "o1").exists()
    assert main([*argv, "--model-class", "masked-lm"]) == 0
    assert isinstance(transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "o1"), transformers.BertForMaskedLM)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(unknown), "model_class": "encoder", "method": "magnitude"}))
    assert main(["prune", "--recipe", str(recipe), "--out", str(tmp_path / "o2")]) == 0
    assert json.loads((tmp_path / "o2" / "prune_report.json").read_text())["settings"]["model_class"] == "encoder"


def test_compact_output_of_a_masked_lm_reads_back(models, tmp_path):
    """The compact format restores any class; BERT's tied decoder is stored once."""
    from prunekit.io.hf import load_hf_model

    assert main(prune_args(models, "bert", tmp_path / "dense")) == 0
    assert main(prune_args(models, "bert", tmp_path / "compact", "--save-format", "compact")) == 0
    dense = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "dense").state_dict()
    restored = load_hf_model(tmp_path / "compact", "AutoModelForMaskedLM").state_dict()
    assert all(torch.equal(dense[k], restored[k]) for k in dense)


# ---------------------------------------------------------------- image, dual encoders, speech, VLM layouts (issue 27)

ASSETS = demo_assets()
# zoo name -> (class, the auto class that reloads the output, calibration data, evaluation data, the metric's key)
NEW_CASES = {
    "vit": ("image-classification", "AutoModelForImageClassification", "digits/train", "digits/val", "top1"),
    "dinov2": ("vision-encoder", "AutoModel", "digits/train", "digits/val", "embedding_cosine"),
    "clip": ("dual-encoder", "AutoModelForZeroShotImageClassification", "digits/train", "digits/val", "zeroshot_top1"),
    "siglip": (
        "dual-encoder",
        "AutoModelForZeroShotImageClassification",
        "digits/train-captions.jsonl",
        "digits/val-captions.jsonl",
        "i2t_recall@1",
    ),
    "whisper": ("speech-seq2seq", "AutoModelForSpeechSeq2Seq", "speech", "speech", "decoder_ppl"),
    "wav2vec2": ("audio-encoder", "AutoModel", "speech", "speech", "embedding_cosine"),
    "qwen2_5_vl": ("image-text-to-text", "AutoModelForImageTextToText", "pairs", "pairs", "text_ppl"),
    "mllama": ("image-text-to-text", "AutoModelForImageTextToText", "pairs", "pairs", "text_ppl"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every new case saved as a checkpoint with its processor, and image-text pairs for the VLMs."""
    root = tmp_path_factory.mktemp("saved")
    for name in NEW_CASES:
        zoo.save(name, root / name)
    verses = [line for line in (ASSETS / "kjv" / "test-small.txt").read_text().splitlines() if line.strip()]
    zoo.write_image_text(root / "pairs", verses[:6])
    return root


def data_path(saved: Path, data: str) -> str:
    return str(saved / data if data == "pairs" else ASSETS / data)


@pytest.mark.parametrize("name", NEW_CASES)
def test_prune_reload_and_evaluate_each_new_class(saved, tmp_path, name):
    """Prune with the class's own data, write, reload as the checkpoint's class, and evaluate the output with
    ``prunekit eval model``: the same metric the prune run reported for the pruned model."""
    model_class, auto, calib, evaluation, metric = NEW_CASES[name]
    out, result = tmp_path / "out", tmp_path / "eval.json"
    argv = ["prune", "--model", str(saved / name), "--calib-data", data_path(saved, calib)]
    argv += ["--eval-data", data_path(saved, evaluation), "--nsamples", "4", "--batch-size", "2", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["settings"]["model_class"] == model_class and report["sparsity"] == pytest.approx(0.5, abs=0.01)
    reloaded = getattr(transformers, auto).from_pretrained(out)
    assert type(reloaded).__name__ == zoo.ZOO[name].model
    assert all(zero_fraction(reloaded, layer) == pytest.approx(0.5, abs=0.01) for layer in report["layers"])
    reference = ["--reference", str(saved / name)] if metric == "embedding_cosine" else []
    argv = ["eval", "model", "--model", str(out), "--data", data_path(saved, evaluation), *reference]
    assert main([*argv, "--batch-size", "8", "--json", str(result)]) == 0
    assert json.loads(result.read_text())[metric] == pytest.approx(report["metrics"][metric], abs=1e-5)
