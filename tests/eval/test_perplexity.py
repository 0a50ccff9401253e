import math

import pytest
import torch

from prunekit.eval import perplexity, token_windows
from tests.conftest import tiny_llama


def test_perplexity_equals_hf_loss_per_window():
    model = tiny_llama()
    tokens = torch.randint(0, 128, (100,), generator=torch.Generator().manual_seed(0))
    ppl = perplexity(model, tokens, seqlen=16, batch_size=4)
    windows = token_windows(tokens, 16)
    assert windows.shape == (6, 16)  # the 4-token tail is dropped
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss for w in windows]
    assert ppl == pytest.approx(math.exp(torch.stack(losses).mean().item()), rel=1e-5)


def test_too_short_text():
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows(torch.arange(5), 16)


@pytest.mark.slow
def test_fixture_dense_perplexity_matches_metrics(kjv_dense_ppl):
    """perplexity(kjv-llama-5m, all of kjv/test.txt, 256) -- computed once per session in conftest.py."""
    assert kjv_dense_ppl == pytest.approx(46.62, abs=0.01)  # METRICS.md
