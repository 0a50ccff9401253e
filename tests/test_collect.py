import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.collect import collect
from prunekit.errors import PrunekitError


def _stats(module, *inputs, hessian=True):
    with collect({"m": module}, hessian=hessian) as stats:
        for x in inputs:
            module(x)
    return stats["m"]


def test_linear_norms_and_hessian_equal_explicit():
    torch.manual_seed(0)
    lin = nn.Linear(6, 3)
    xs = [torch.randn(2, 5, 6), torch.randn(3, 5, 6)]
    s = _stats(lin, *xs)
    rows = torch.cat([x.reshape(-1, 6) for x in xs])
    torch.testing.assert_close(s.sq_sum[0], rows.square().sum(0))
    torch.testing.assert_close(s.xtx[0], rows.T @ rows)
    assert s.nsamples == 5 and s.ntokens == 25
    torch.testing.assert_close(s.hessian()[0], 2 * rows.T @ rows / 5)  # published SparseGPT scaling


def test_hf_conv1d_columns_are_inputs():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(4, 6)
    x = torch.randn(2, 3, 6)
    s = _stats(conv, x)
    torch.testing.assert_close(s.sq_sum[0], x.reshape(-1, 6).square().sum(0))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(stride=2, padding=1),
        dict(dilation=2, padding=2),
        dict(groups=2, padding=1),
        dict(groups=4),
        dict(stride=(2, 1)),
    ],
)
def test_conv2d_equals_unfold(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, **kwargs)
    x = torch.randn(2, 4, 9, 7)
    s = _stats(conv, x)
    cols = F.unfold(x, 3, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)  # [B, C*9, P]
    g = conv.groups
    per_group = cols.reshape(2, g, -1, cols.shape[-1]).permute(1, 0, 3, 2).reshape(g, -1, cols.shape[1] // g)
    torch.testing.assert_close(s.sq_sum, per_group.square().sum(1))
    torch.testing.assert_close(s.xtx, per_group.transpose(1, 2) @ per_group, rtol=1e-4, atol=1e-4)
    no_hessian = _stats(conv, x, hessian=False)  # the unfold-free path gives the same norms
    torch.testing.assert_close(no_hessian.sq_sum, s.sq_sum, rtol=1e-5, atol=1e-5)


def test_conv1d_equals_explicit_im2col():
    conv = nn.Conv1d(3, 4, 3, stride=2, padding=1)
    x = torch.randn(2, 3, 10)
    s = _stats(conv, x)
    xp = F.pad(x, (1, 1))
    cols = xp.unfold(2, 3, 2).permute(0, 2, 1, 3).reshape(-1, 9)  # rows = (batch, position), cols = (c, k)
    torch.testing.assert_close(s.sq_sum[0], cols.square().sum(0))
    torch.testing.assert_close(s.xtx[0], cols.T @ cols, rtol=1e-4, atol=1e-4)


def test_stats_float32_from_bf16_model():
    lin = nn.Linear(4, 2).to(torch.bfloat16)
    s = _stats(lin, torch.randn(2, 4, dtype=torch.bfloat16))
    assert s.sq_sum.dtype == torch.float32 and s.xtx.dtype == torch.float32


def test_hooks_removed_even_when_forward_raises():
    lin = nn.Linear(4, 2)
    with pytest.raises(RuntimeError):
        with collect({"m": lin}):
            lin(torch.randn(3, 5))  # wrong shape
    assert not lin._forward_hooks


def test_nan_activations_are_reported():
    lin = nn.Linear(3, 2)
    s = _stats(lin, torch.tensor([[float("nan"), 1.0, 2.0]]))
    with pytest.raises(PrunekitError, match="NaN/inf activations"):
        s.check_finite("m")


def test_statistics_can_accumulate_in_float64():
    """``stats_dtype=float64``: sums kept in double precision, handed to methods as float32."""
    lin = nn.Linear(8, 2)
    x = torch.randn(4, 16, 8, dtype=torch.float64) * 1e3
    with collect({"m": lin}, dtype=torch.float64) as stats:
        for chunk in x.float().split(1):
            lin(chunk)
        assert stats["m"].sq_sum.dtype == torch.float32
        exact = stats._collectors["m"].stats.sq_sum
    assert exact.dtype == torch.float64
    assert torch.allclose(exact[0], x.float().double().square().sum(dim=(0, 1)), rtol=1e-12)


def test_stats_dtype_setting_reaches_the_collectors(token_batch):
    import prunekit
    from prunekit.errors import PrunekitError
    from tests.conftest import tiny_llama

    a, b = tiny_llama(), tiny_llama()
    prunekit.prune(a, "wanda", 0.5, calib=token_batch)
    prunekit.prune(b, "wanda", 0.5, calib=token_batch, stats_dtype="float64")
    assert all((pa == 0).eq(pb == 0).float().mean() > 0.99 for pa, pb in zip(a.parameters(), b.parameters()))
    with pytest.raises(PrunekitError, match="stats_dtype"):
        prunekit.PruneConfig(stats_dtype="float16")
