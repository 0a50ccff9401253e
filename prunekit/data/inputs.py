"""Token windows as the keyword inputs each kind of text model takes.

Causal LMs take the windows as they are (``prunekit.data.text``). Encoders, masked LMs and classifiers take
``input_ids`` with an all-ones ``attention_mask`` (every window is full). Encoder-decoders split each window: the
first half is the encoder's input and the second half the decoder's target, fed to the decoder shifted right
behind its start token, so the decoder is calibrated and evaluated on text that continues what the encoder read.
Examples of different lengths (labeled records) are padded on the right and masked out.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import PrunekitError

Inputs = dict[str, torch.Tensor]
IGNORE = -100  # the label transformers' losses skip: padding, image placeholders, unmasked tokens


def encoder_inputs(windows: torch.Tensor, batch_size: int) -> list[Inputs]:
    """``[n, seqlen]`` windows as batches of ``{"input_ids", "attention_mask"}``."""
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in windows.split(batch_size)]


def decoder_start_id(config: Any) -> int:
    """The token an encoder-decoder's decoder starts from (``decoder_start_token_id`` in config.json)."""
    start = getattr(config, "decoder_start_token_id", None)
    if not isinstance(start, int):
        raise PrunekitError(
            "the encoder-decoder's config.json has no decoder_start_token_id, so its decoder has no first input; "
            "set it in config.json"
        )
    return start


def shift_right(labels: torch.Tensor, start: int) -> torch.Tensor:
    """Decoder inputs for ``labels``: the start token, then every label but the last (teacher forcing)."""
    return torch.cat([torch.full_like(labels[:, :1], start), labels[:, :-1]], dim=1)


def seq2seq_inputs(windows: torch.Tensor, batch_size: int, start: int, labels: bool = False) -> list[Inputs]:
    """Each window's first half as encoder input, its second half as decoder target (``labels`` when asked,
    for the decoder's perplexity) fed shifted right."""
    if windows.shape[1] < 2:
        raise PrunekitError("encoder-decoder windows need at least 2 tokens (half for each side); raise --seqlen")
    half = windows.shape[1] // 2
    batches = []
    for ids in windows.split(batch_size):
        source, target = ids[:, :half], ids[:, half:]
        batch = {"input_ids": source, "attention_mask": torch.ones_like(source)}
        batch["decoder_input_ids"] = shift_right(target, start)
        if labels:
            batch["labels"] = target
        batches.append(batch)
    return batches


def padded(sequences: list[list[int]], pad_id: int) -> Inputs:
    """Right-padded ``input_ids`` and the ``attention_mask`` that hides the padding."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def example_inputs(sequences: list[list[int]], batch_size: int, pad_id: int) -> list[Inputs]:
    """Token sequences of any length (one example each) as padded batches."""
    return [padded(sequences[i : i + batch_size], pad_id) for i in range(0, len(sequences), batch_size)]
