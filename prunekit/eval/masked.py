"""Masked-LM pseudo-perplexity: hide 15% of the tokens of each evaluation window (a fixed seed, so the dense and
the pruned model are scored on the same positions), replace them with the mask token, and take exp(mean
cross-entropy) of the hidden tokens. Special tokens are never hidden. Every hidden token becomes the mask token
(no BERT-style 10% random / 10% kept: this measures, it does not train)."""

from __future__ import annotations

import torch

from ..data.inputs import IGNORE, Inputs, encoder_inputs
from ..errors import PrunekitError

MASK_RATE = 0.15
MASK_SEED = 0


def mask_positions(windows: torch.Tensor, special_ids: list[int], rate: float = MASK_RATE) -> torch.Tensor:
    """A boolean ``[n, seqlen]`` of the positions to hide: each non-special token with probability ``rate``,
    drawn from ``torch.Generator().manual_seed(MASK_SEED)``."""
    draw = torch.rand(windows.shape, generator=torch.Generator().manual_seed(MASK_SEED)) < rate
    return draw & ~torch.isin(windows, torch.tensor(special_ids, dtype=windows.dtype))


def masked_inputs(windows: torch.Tensor, mask_id: int | None, special_ids: list[int], batch_size: int) -> list[Inputs]:
    """Batches whose hidden tokens read ``mask_id`` in ``input_ids`` and are the only ``labels``."""
    if mask_id is None:
        raise PrunekitError(
            "masked-LM evaluation hides tokens behind the tokenizer's mask token, and this tokenizer has none; "
            "use the model's own tokenizer (it defines mask_token)"
        )
    hidden = mask_positions(windows, special_ids)
    if not hidden.any():
        raise PrunekitError("the evaluation text is too short to hide any token; give more --eval-data")
    batches = encoder_inputs(windows.masked_fill(hidden, mask_id), batch_size)
    for batch, ids, mask in zip(batches, windows.split(batch_size), hidden.split(batch_size), strict=True):
        batch["labels"] = ids.masked_fill(~mask, IGNORE)
    return batches
