"""Text models: calibrated on random token windows of a text file; each class with its own metric.

* ``causal-lm``: the windows as they are; perplexity (``ppl``).
* ``masked-lm``: windows as ``input_ids`` + ``attention_mask``; pseudo-perplexity with 15% hidden (``mlm_ppl``).
* ``encoder``: the same windows; cosine of mean-pooled embeddings to the dense model's (``embedding_cosine``).
* ``sequence-classification``: the same windows; ``accuracy`` on labeled ``.jsonl``, else ``agreement`` with the
  dense model's predictions.
* ``seq2seq``: windows split, the encoder reads the first half, the decoder the second; decoder perplexity
  (``decoder_ppl``).

Heavy modules are imported inside the functions: the table is read by ``prunekit --help``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Job, ModelClass, Prepared, Recipe, against_reference

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


# Tokenizers that do not know their model's length say so with a huge model_max_length (1e30).
UNKNOWN_MAX_LENGTH = 1_000_000
TEXT = "text"
TEXT_INPUTS = ("input_ids",)


def tokenizer(source: str, trust_remote_code: bool) -> Any:
    from ..io.hf import load_tokenizer

    return load_tokenizer(source, trust_remote_code)


def text_seqlen(seqlen: int | None, config: Any, tokenizer: Any, what: str = "seqlen") -> int:
    """``resolve_seqlen`` against config.json; the default is also capped at the tokenizer's ``model_max_length``
    (RoBERTa's 514 positions hold 512 tokens)."""
    from ..api import resolve_seqlen

    resolved = resolve_seqlen(seqlen, config, what)
    limit = getattr(tokenizer, "model_max_length", None)
    if seqlen is None and isinstance(limit, int) and 0 < limit < min(resolved, UNKNOWN_MAX_LENGTH):
        return limit
    return resolved


def tokens(tokenizer: Any, source: str, what: str) -> torch.Tensor:
    from ..data.text import load_text, tokenize

    return tokenize(tokenizer, load_text(source, what=what))


def windows(job: Job) -> torch.Tensor:
    """The seeded calibration windows of ``--calib-data``."""
    from ..data.text import random_windows

    recipe = job.recipe
    seqlen = text_seqlen(recipe.seqlen, job.config, job.preprocessor)
    return random_windows(
        tokens(job.preprocessor, recipe.calib_data, "--calib-data"), recipe.nsamples, seqlen, recipe.seed
    )


def eval_windows(job: Job) -> torch.Tensor:
    """``--eval-data`` cut into non-overlapping windows."""
    from ..eval.perplexity import token_windows

    recipe = job.recipe
    seqlen = text_seqlen(recipe.eval_seqlen or recipe.seqlen, job.config, job.preprocessor, "eval_seqlen")
    return token_windows(tokens(job.preprocessor, recipe.eval_data, "--eval-data"), seqlen)


def encoder_windows(job: Job) -> list:
    from ..data.inputs import encoder_inputs

    return encoder_inputs(windows(job), job.recipe.batch_size)


def seq2seq_windows(job: Job) -> list:
    from ..data.inputs import decoder_start_id, seq2seq_inputs

    return seq2seq_inputs(windows(job), job.recipe.batch_size, decoder_start_id(job.config))


# ---------------------------------------------------------------- evaluation data


def causal_data(job: Job) -> Prepared:
    return Prepared("causal-lm", eval_windows(job))


def masked_data(job: Job) -> Prepared:
    from ..eval.masked import masked_inputs

    tok = job.preprocessor
    batches = masked_inputs(eval_windows(job), tok.mask_token_id, list(tok.all_special_ids), job.recipe.eval_batch_size)
    return Prepared("masked-lm", batches)


def encoder_data(job: Job) -> Prepared:
    from ..data.inputs import encoder_inputs

    return Prepared("encoder", encoder_inputs(eval_windows(job), job.recipe.eval_batch_size))


def classifier_data(job: Job) -> Prepared:
    """Labeled (or unlabeled) examples from a ``.jsonl`` file, else text windows scored by agreement."""
    from ..data.inputs import encoder_inputs, example_inputs
    from ..data.labeled import is_jsonl, label_ids, read_examples, tokenize_examples

    recipe, tok = job.recipe, job.preprocessor
    if not is_jsonl(recipe.eval_data):
        return Prepared("sequence-classification", encoder_inputs(eval_windows(job), recipe.eval_batch_size))
    texts, labels = read_examples(recipe.eval_data, "--eval-data")
    labels = label_ids(labels, job.config, "--eval-data") if labels is not None else None
    seqlen = text_seqlen(recipe.eval_seqlen or recipe.seqlen, job.config, tok, "eval_seqlen")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches = example_inputs(tokenize_examples(tok, texts, seqlen), recipe.eval_batch_size, pad)
    return Prepared("sequence-classification", batches, labels)


def seq2seq_data(job: Job) -> Prepared:
    from ..data.inputs import decoder_start_id, seq2seq_inputs

    start = decoder_start_id(job.config)
    return Prepared("seq2seq", seq2seq_inputs(eval_windows(job), job.recipe.eval_batch_size, start, labels=True))


# ---------------------------------------------------------------- metrics


def ppl(model: nn.Module, prepared: Prepared, recipe: Recipe) -> dict[str, float]:
    from ..eval.perplexity import perplexity

    w = prepared.eval_data
    return {"ppl": perplexity(model, w.reshape(-1), w.shape[1], recipe.eval_batch_size, recipe.device)}


def labeled_ppl(key: str, shift: bool):
    """Perplexity over the prepared batches' ``labels`` (``shift``: position t predicts label t + 1)."""

    def score(model: nn.Module, prepared: Prepared, recipe: Recipe) -> dict[str, float]:
        from ..eval.perplexity import labeled_perplexity

        return {key: labeled_perplexity(model, prepared.eval_data, shift, recipe.device)}

    return score


def classifier_score(model: nn.Module, prepared: Prepared, recipe: Recipe) -> dict[str, float]:
    from ..eval.agreement import fraction_equal, predictions

    predicted = predictions(model, prepared.eval_data, recipe.device)
    if prepared.labels is not None:
        return {"accuracy": fraction_equal(predicted, prepared.labels)}
    return against_reference(prepared, predicted, "agreement", fraction_equal)


def embedding_score(model: nn.Module, prepared: Prepared, recipe: Recipe) -> dict[str, float]:
    from ..eval.agreement import embeddings, mean_cosine

    current = embeddings(model, prepared.eval_data, recipe.device)
    return against_reference(prepared, current, "embedding_cosine", mean_cosine)


ROWS = (
    ModelClass(
        "causal-lm",
        "*ForCausalLM decoders",
        TEXT,
        "perplexity (ppl)",
        rank=40,
        calibration=windows,
        prepare=causal_data,
        score=ppl,
        preprocessor=tokenizer,
        auto_class="AutoModelForCausalLM",
        mapping="MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
        suffixes=("ForCausalLM", "LMHeadModel"),
        inputs=TEXT_INPUTS,
        holdout="text",
    ),
    ModelClass(
        "masked-lm",
        "*ForMaskedLM",
        TEXT,
        "pseudo-perplexity, 15% of the tokens masked (mlm_ppl)",
        rank=70,
        calibration=encoder_windows,
        prepare=masked_data,
        score=labeled_ppl("mlm_ppl", shift=False),
        preprocessor=tokenizer,
        auto_class="AutoModelForMaskedLM",
        mapping="MODEL_FOR_MASKED_LM_MAPPING_NAMES",
        suffixes=("ForMaskedLM",),
        inputs=TEXT_INPUTS,
        holdout="text",
    ),
    ModelClass(
        "encoder",
        "bare *Model text encoders, hidden states only",
        TEXT,
        "cosine of mean-pooled embeddings to the dense model's (embedding_cosine)",
        rank=100,
        calibration=encoder_windows,
        prepare=encoder_data,
        score=embedding_score,
        preprocessor=tokenizer,
        auto_class="AutoModel",
        mapping="MODEL_MAPPING_NAMES",
        suffixes=("Model",),
        inputs=TEXT_INPUTS,
        holdout="text",
    ),
    ModelClass(
        "sequence-classification",
        "*ForSequenceClassification",
        f"{TEXT}; for evaluation also labeled .jsonl",
        "accuracy on labeled .jsonl, else agreement with the dense model's predictions",
        rank=60,
        calibration=encoder_windows,
        prepare=classifier_data,
        score=classifier_score,
        preprocessor=tokenizer,
        auto_class="AutoModelForSequenceClassification",
        mapping="MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
        suffixes=("ForSequenceClassification",),
        inputs=TEXT_INPUTS,
        holdout="text",
    ),
    ModelClass(
        "seq2seq",
        "encoder-decoders such as T5, BART",
        f"{TEXT}: the encoder reads the first half of each window, the decoder the second",
        "decoder perplexity (decoder_ppl)",
        rank=30,
        calibration=seq2seq_windows,
        prepare=seq2seq_data,
        score=labeled_ppl("decoder_ppl", shift=False),
        preprocessor=tokenizer,
        auto_class="AutoModelForSeq2SeqLM",
        mapping="MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
        inputs=TEXT_INPUTS,
        holdout="text",
    ),
)
