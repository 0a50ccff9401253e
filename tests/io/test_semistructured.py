"""2:4 semi-structured conversion: which layers qualify, clear errors off-GPU, and (on a GPU) the same output."""

from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit.errors import PrunekitError
from prunekit.io.semistructured import benchmark, semi_structured_layers, to_semi_structured, unsupported_reason
from tests.conftest import tiny_llama

NO_KERNELS = unsupported_reason("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def model_2_4(token_batch):
    model = tiny_llama(hidden=128, intermediate=256, heads=4, kv_heads=4)
    prunekit.prune(model, "wanda", 0.5, pattern="2:4", calib=token_batch)
    return model


def test_semi_structured_layers_are_the_2_4_linears(model_2_4):
    names = set(semi_structured_layers(model_2_4))
    assert names == set(prunekit.select_layers(model_2_4))
    assert "lm_head" not in names


def test_cpu_model_gets_a_clear_error(model_2_4):
    with pytest.raises(PrunekitError, match="compute capability >= 8.0"):
        to_semi_structured(model_2_4)
    with pytest.raises(PrunekitError, match="CUDA GPU"):
        benchmark(model_2_4)
    assert model_2_4.model.layers[0].mlp.up_proj.weight.layout == torch.strided  # untouched


@pytest.mark.skipif(NO_KERNELS is not None, reason=f"no 2:4 kernels here: {NO_KERNELS}")
def test_gpu_conversion_keeps_outputs(model_2_4, token_batch):
    model = model_2_4.half().cuda()
    tokens = token_batch.cuda()
    with torch.no_grad():
        dense = model(tokens, use_cache=False).logits.float()
        converted = to_semi_structured(model)
        sparse = model(tokens, use_cache=False).logits.float()
    assert len(converted) == 14
    assert (dense - sparse).abs().max() < 5e-2


@pytest.mark.skipif(NO_KERNELS is not None, reason=f"no 2:4 kernels here: {NO_KERNELS}")
def test_gpu_rejects_float32(model_2_4):
    with pytest.raises(PrunekitError, match="float16 or bfloat16"):
        to_semi_structured(model_2_4.cuda())
