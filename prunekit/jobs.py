"""What each class of Hugging Face model (``prunekit.model_classes``) is calibrated and evaluated on, prepared from
its tokenizer or processor and config.json before the weights load, so bad data costs seconds, not a model load.

* ``causal-lm``: text windows; perplexity (``ppl``).
* ``masked-lm``: windows as ``input_ids`` + ``attention_mask``; pseudo-perplexity with 15% hidden (``mlm_ppl``).
* ``encoder``: the same windows; cosine of mean-pooled embeddings to the dense model's (``embedding_cosine``).
* ``sequence-classification``: the same windows; ``accuracy`` on labeled ``.jsonl``, else ``agreement`` with the
  dense model's predictions.
* ``seq2seq``: windows split, the encoder reads the first half, the decoder the second; decoder perplexity
  (``decoder_ppl``).
* ``image-text-to-text``: image-text records through the checkpoint's processor; text perplexity given the image
  (``text_ppl``).

Metrics against the dense model take the first evaluation (before pruning) as the reference and report nothing
for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .api import resolve_seqlen
from .data.image_text import image_text_inputs, read_image_text, sample_records
from .data.inputs import decoder_start_id, encoder_inputs, example_inputs, seq2seq_inputs
from .data.labeled import is_jsonl, label_ids, read_examples, tokenize_examples
from .data.text import load_text, random_windows, tokenize
from .eval.agreement import embeddings, fraction_equal, mean_cosine, predictions
from .eval.masked import masked_inputs
from .eval.perplexity import labeled_perplexity, perplexity, token_windows
from .io.hf import load_processor, load_tokenizer
from .recipe import PruneRecipe

log = logging.getLogger(__name__)

IMAGE_TEXT = "image-text-to-text"
# Tokenizers that do not know their model's length say so with a huge model_max_length (1e30).
UNKNOWN_MAX_LENGTH = 1_000_000


@dataclass
class Prepared:
    """What a run prepared before the weights loaded: the resolved model class (None for image models), the
    evaluation batches (and labels), and the dense model's outputs once the first evaluation has run."""

    model_class: str | None
    eval_data: Any = None
    labels: torch.Tensor | None = None
    reference: torch.Tensor | None = None


def load_preprocessor(recipe: PruneRecipe, model_class: str) -> Any:
    """The tokenizer, or for image-text models the processor (which holds the tokenizer)."""
    load = load_processor if model_class == IMAGE_TEXT else load_tokenizer
    return load(recipe.model, recipe.trust_remote_code)


def text_seqlen(seqlen: int | None, config: Any, tokenizer: Any, what: str = "seqlen") -> int:
    """``resolve_seqlen`` against config.json; the default is also capped at the tokenizer's ``model_max_length``
    (RoBERTa's 514 positions hold 512 tokens)."""
    resolved = resolve_seqlen(seqlen, config, what)
    limit = getattr(tokenizer, "model_max_length", None)
    if seqlen is None and isinstance(limit, int) and 0 < limit < min(resolved, UNKNOWN_MAX_LENGTH):
        return limit
    return resolved


def _tokens(tokenizer: Any, source: str, what: str) -> torch.Tensor:
    return tokenize(tokenizer, load_text(source, what=what))


# ---------------------------------------------------------------- calibration


def calibration_data(model_class: str, preprocessor: Any, config: Any, recipe: PruneRecipe) -> Any:
    """The calibration batches ``prunekit.prune`` takes for this model class (causal LMs: the windows tensor)."""
    if model_class == IMAGE_TEXT:
        if recipe.seqlen is not None:
            log.warning("--seqlen does not apply to image-text models: each record is one sample, as long as it is")
        records = sample_records(read_image_text(recipe.calib_data, "--calib-data"), recipe.nsamples, recipe.seed)
        return image_text_inputs(preprocessor, records, recipe.batch_size)
    seqlen = text_seqlen(recipe.seqlen, config, preprocessor)
    tokens = _tokens(preprocessor, recipe.calib_data, "--calib-data")
    windows = random_windows(tokens, recipe.nsamples, seqlen, recipe.seed)
    if model_class == "causal-lm":
        return windows
    if model_class == "seq2seq":
        return seq2seq_inputs(windows, recipe.batch_size, decoder_start_id(config))
    return encoder_inputs(windows, recipe.batch_size)


# ---------------------------------------------------------------- evaluation data


def evaluation_data(model_class: str, preprocessor: Any, config: Any, recipe: PruneRecipe) -> Prepared:
    """``recipe.eval_data`` prepared for this model class."""
    return EVALUATIONS[model_class].prepare(preprocessor, config, recipe)


def _eval_windows(tokenizer: Any, config: Any, recipe: PruneRecipe) -> torch.Tensor:
    seqlen = text_seqlen(recipe.eval_seqlen or recipe.seqlen, config, tokenizer, "eval_seqlen")
    return token_windows(_tokens(tokenizer, recipe.eval_data, "--eval-data"), seqlen)


def _causal_data(tokenizer: Any, config: Any, recipe: PruneRecipe) -> Prepared:
    windows = _eval_windows(tokenizer, config, recipe)
    return Prepared("causal-lm", windows)


def _masked_data(tokenizer: Any, config: Any, recipe: PruneRecipe) -> Prepared:
    windows = _eval_windows(tokenizer, config, recipe)
    specials = list(tokenizer.all_special_ids)
    return Prepared("masked-lm", masked_inputs(windows, tokenizer.mask_token_id, specials, recipe.eval_batch_size))


def _encoder_data(tokenizer: Any, config: Any, recipe: PruneRecipe) -> Prepared:
    return Prepared("encoder", encoder_inputs(_eval_windows(tokenizer, config, recipe), recipe.eval_batch_size))


def _classifier_data(tokenizer: Any, config: Any, recipe: PruneRecipe) -> Prepared:
    """Labeled (or unlabeled) examples from a ``.jsonl`` file, else text windows scored by agreement."""
    if not is_jsonl(recipe.eval_data):
        windows = _eval_windows(tokenizer, config, recipe)
        return Prepared("sequence-classification", encoder_inputs(windows, recipe.eval_batch_size))
    texts, labels = read_examples(recipe.eval_data, "--eval-data")
    labels = label_ids(labels, config, "--eval-data") if labels is not None else None
    seqlen = text_seqlen(recipe.eval_seqlen or recipe.seqlen, config, tokenizer, "eval_seqlen")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = example_inputs(tokenize_examples(tokenizer, texts, seqlen), recipe.eval_batch_size, pad)
    return Prepared("sequence-classification", batches, labels)


def _seq2seq_data(tokenizer: Any, config: Any, recipe: PruneRecipe) -> Prepared:
    windows = _eval_windows(tokenizer, config, recipe)
    batches = seq2seq_inputs(windows, recipe.eval_batch_size, decoder_start_id(config), labels=True)
    return Prepared("seq2seq", batches)


def _image_text_data(processor: Any, config: Any, recipe: PruneRecipe) -> Prepared:
    records = read_image_text(recipe.eval_data, "--eval-data")
    return Prepared(IMAGE_TEXT, image_text_inputs(processor, records, recipe.eval_batch_size, labels=True))


# ---------------------------------------------------------------- evaluation


def evaluate_prepared(model: nn.Module, prepared: Prepared, recipe: PruneRecipe) -> dict[str, float]:
    """The metrics of ``model`` on the prepared data (``{}`` for the reference run of a comparison metric)."""
    return EVALUATIONS[prepared.model_class].score(model, prepared, recipe)


def _against_reference(prepared: Prepared, current: torch.Tensor, key: str, compare: Callable) -> dict[str, float]:
    """The first evaluation (the dense model) becomes the reference; later ones are compared with it."""
    if prepared.reference is None:
        prepared.reference = current
        return {}
    return {key: compare(prepared.reference, current)}


def _ppl(model: nn.Module, prepared: Prepared, recipe: PruneRecipe) -> dict[str, float]:
    windows = prepared.eval_data
    return {"ppl": perplexity(model, windows.reshape(-1), windows.shape[1], recipe.eval_batch_size, recipe.device)}


def _labeled_ppl(key: str, shift: bool) -> Callable[[nn.Module, Prepared, PruneRecipe], dict[str, float]]:
    def score(model: nn.Module, prepared: Prepared, recipe: PruneRecipe) -> dict[str, float]:
        return {key: labeled_perplexity(model, prepared.eval_data, shift, recipe.device)}

    return score


def _classifier_score(model: nn.Module, prepared: Prepared, recipe: PruneRecipe) -> dict[str, float]:
    predicted = predictions(model, prepared.eval_data, recipe.device)
    if prepared.labels is not None:
        return {"accuracy": fraction_equal(predicted, prepared.labels)}
    return _against_reference(prepared, predicted, "agreement", fraction_equal)


def _embedding_score(model: nn.Module, prepared: Prepared, recipe: PruneRecipe) -> dict[str, float]:
    return _against_reference(
        prepared, embeddings(model, prepared.eval_data, recipe.device), "embedding_cosine", mean_cosine
    )


@dataclass(frozen=True)
class Evaluation:
    """How one model class is evaluated: its data, prepared before the weights load, and its metric."""

    prepare: Callable[[Any, Any, PruneRecipe], Prepared]
    score: Callable[[nn.Module, Prepared, PruneRecipe], dict[str, float]]


EVALUATIONS: dict[str, Evaluation] = {
    "causal-lm": Evaluation(_causal_data, _ppl),
    "masked-lm": Evaluation(_masked_data, _labeled_ppl("mlm_ppl", shift=False)),
    "encoder": Evaluation(_encoder_data, _embedding_score),
    "sequence-classification": Evaluation(_classifier_data, _classifier_score),
    "seq2seq": Evaluation(_seq2seq_data, _labeled_ppl("decoder_ppl", shift=False)),
    IMAGE_TEXT: Evaluation(_image_text_data, _labeled_ppl("text_ppl", shift=True)),
}
