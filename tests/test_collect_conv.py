"""Convolutions as matmuls: collector statistics against an explicit im2col, grouped convs as separate
matmuls, 1x1 convs as Linears, N:M along the flattened input dimension, transposed convs rejected."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
import prunekit.collect as collect_mod
from prunekit.collect import collect, conv_columns
from prunekit.graph import find_layers, layer_type, select_layers, weight_matrix

CONVS = {
    "1d": lambda: nn.Conv1d(4, 6, 3),
    "1d-grouped-strided-dilated-padded": lambda: nn.Conv1d(4, 6, 4, stride=2, padding=3, dilation=2, groups=2),
    "1d-depthwise-same-reflect": lambda: nn.Conv1d(4, 4, 5, padding="same", padding_mode="reflect", groups=4),
    "1d-even-same-dilated-circular": lambda: nn.Conv1d(6, 4, 4, padding="same", dilation=3, padding_mode="circular"),
    "2d": lambda: nn.Conv2d(4, 8, 3, padding=1),
    "2d-grouped-strided": lambda: nn.Conv2d(4, 8, 3, stride=2, padding=(1, 2), groups=2),
    "2d-depthwise": lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6),
    "2d-depthwise-multiplier": lambda: nn.Conv2d(3, 6, 3, padding=1, groups=3),
    "2d-even-same-dilated": lambda: nn.Conv2d(4, 6, (2, 4), padding="same", dilation=(2, 1)),
    "2d-same-reflect-dilated": lambda: nn.Conv2d(4, 6, 3, padding="same", padding_mode="reflect", dilation=2),
    "2d-replicate-strided": lambda: nn.Conv2d(4, 6, 3, padding=2, padding_mode="replicate", stride=(2, 1)),
    "2d-valid-stride3": lambda: nn.Conv2d(4, 6, 5, padding="valid", stride=3),
    "2d-pointwise": lambda: nn.Conv2d(4, 8, 1),
    "3d-grouped": lambda: nn.Conv3d(4, 6, (2, 3, 3), stride=(1, 2, 1), padding=(1, 0, 2), groups=2),
    "3d-same-reflect": lambda: nn.Conv3d(3, 6, 3, padding="same", padding_mode="reflect", dilation=(1, 2, 1)),
    "3d-depthwise-strided": lambda: nn.Conv3d(4, 4, 3, padding=1, groups=4, stride=2),
}
SPATIAL = {1: (13,), 2: (9, 11), 3: (5, 7, 6)}


def make(key: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The conv and two input batches of different sizes."""
    torch.manual_seed(seed)
    conv = CONVS[key]()
    shape = SPATIAL[len(conv.kernel_size)]
    return conv, torch.randn(3, conv.in_channels, *shape), torch.randn(2, conv.in_channels, *shape)


def explicit_pads(conv: nn.Module) -> list[tuple[int, int]]:
    """(before, after) padding per spatial dim; 'same' puts the odd pixel after, as torch documents."""
    if conv.padding == "valid":
        return [(0, 0)] * len(conv.kernel_size)
    if conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in conv.padding]


def explicit_im2col(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """``[groups, batch * out positions, in/groups * prod(kernel)]`` built with Tensor.unfold, dim by dim."""
    n = len(conv.kernel_size)
    flat_pads = [v for pair in reversed(explicit_pads(conv)) for v in pair]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    x = F.pad(x, flat_pads, mode=mode)
    for dim, (k, s, d) in enumerate(zip(conv.kernel_size, conv.stride, conv.dilation)):
        x = x.unfold(2 + dim, d * (k - 1) + 1, s)  # window appended last: [B, C, o.., rest.., w..]
    x = x[(...,) + tuple(slice(None, None, d) for d in conv.dilation)]  # keep the dilated taps
    b, c, g = x.shape[0], x.shape[1], conv.groups
    out = x.shape[2 : 2 + n]
    x = x.reshape(b, g, c // g, *out, *conv.kernel_size)
    x = x.permute(1, 0, *range(3, 3 + n), 2, *range(3 + n, 3 + 2 * n))  # [G, B, out.., Cg, k..]
    return x.reshape(g, b * math.prod(out), (c // g) * math.prod(conv.kernel_size))


def conv_output_from_columns(cols: torch.Tensor, conv: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """``W_g @ columns_g`` for every group, laid out like the conv's own output (bias excluded)."""
    g = conv.groups
    w = weight_matrix(conv).detach().reshape(g, conv.out_channels // g, -1)
    y = torch.einsum("grc,goc->gro", cols, w)  # [G, B*P, Og]
    b = like.shape[0]
    return y.reshape(g, b, -1, w.shape[1]).permute(1, 0, 3, 2).reshape(like.shape)


@pytest.mark.parametrize("key", sorted(CONVS))
def test_explicit_im2col_reproduces_the_conv(key):
    """Guards the reference itself: the hand-built columns times the weights are the conv's output."""
    conv, x, _ = make(key)
    with torch.no_grad():
        out = conv(x) - conv.bias.view(1, -1, *[1] * len(conv.kernel_size))
    torch.testing.assert_close(conv_output_from_columns(explicit_im2col(x, conv), conv, out), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key", sorted(CONVS))
def test_conv_columns_equal_explicit_im2col(key):
    conv, x, _ = make(key)
    torch.testing.assert_close(conv_columns(x, conv), explicit_im2col(x, conv))


@pytest.mark.parametrize("hessian", [False, True], ids=["norms", "hessian"])
@pytest.mark.parametrize("key", sorted(CONVS))
def test_collected_statistics_equal_explicit_unfold(key, hessian):
    conv, x1, x2 = make(key)
    with torch.no_grad(), collect({"c": conv}, hessian=hessian) as stats:
        conv(x1)
        conv(x2)
    cols = torch.cat([explicit_im2col(x1, conv), explicit_im2col(x2, conv)], dim=1)
    s = stats["c"]
    assert s.groups == conv.groups and s.nsamples == 5 and s.ntokens == cols.shape[1]
    torch.testing.assert_close(s.sq_sum, cols.square().sum(dim=1), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(s.norms(), cols.square().sum(dim=1).sqrt(), atol=1e-4, rtol=1e-5)
    if hessian:
        torch.testing.assert_close(s.xtx, cols.transpose(1, 2) @ cols, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(s.hessian(), 2 * cols.transpose(1, 2) @ cols / 5, atol=1e-4, rtol=1e-5)
    else:
        assert s.xtx is None


def test_conv2d_statistics_match_torch_unfold():
    """An independent reference for 2-D zero padding: ``F.unfold`` (channel-major, kernel row-major)."""
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2)
    x = torch.randn(3, 4, 10, 9)
    with torch.no_grad(), collect({"c": conv}, hessian=True) as stats:
        conv(x)
    cols = F.unfold(x, 3, dilation=2, padding=1, stride=2).transpose(1, 2).reshape(-1, 36)
    torch.testing.assert_close(stats["c"].sq_sum[0], cols.square().sum(0), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(stats["c"].xtx[0], cols.T @ cols, atol=1e-4, rtol=1e-5)


def test_hessian_is_the_same_when_the_batch_is_chunked(monkeypatch):
    conv, x, _ = make("2d-grouped-strided")
    with torch.no_grad(), collect({"c": conv}, hessian=True) as whole:
        conv(x)
    monkeypatch.setattr(collect_mod, "_CHUNK_ELEMENTS", 1)  # one image per chunk
    with torch.no_grad(), collect({"c": conv}, hessian=True) as chunked:
        conv(x)
    torch.testing.assert_close(chunked["c"].xtx, whole["c"].xtx)
    assert chunked["c"].nsamples == whole["c"].nsamples == 3


@pytest.mark.parametrize("key", ["1d", "2d-grouped-strided", "3d-grouped"])
def test_unbatched_conv_input_counts_one_sample(key):
    conv, x, _ = make(key)
    with torch.no_grad(), collect({"c": conv}) as stats:
        conv(x[0])
    assert stats["c"].nsamples == 1
    torch.testing.assert_close(
        stats["c"].sq_sum, explicit_im2col(x[:1], conv).square().sum(dim=1), atol=1e-4, rtol=1e-5
    )


# ---------------------------------------------------------------- 1x1 convs are Linears


class ChannelsLastLinear(nn.Module):
    """A Linear applied to every pixel: the same matmul as a 1x1 conv."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.fc = nn.Linear(conv.in_channels, conv.out_channels)
        with torch.no_grad():
            self.fc.weight.copy_(weight_matrix(conv))
            self.fc.bias.copy_(conv.bias)

    def forward(self, x):
        return self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def test_pointwise_conv_is_a_linear():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 1)
    linear = ChannelsLastLinear(conv)
    x = torch.randn(4, 8, 5, 3)
    assert layer_type(conv) == "linear"
    with torch.no_grad(), collect({"c": conv}, hessian=True) as cs, collect({"l": linear.fc}, hessian=True) as ls:
        torch.testing.assert_close(conv(x), linear(x), atol=1e-5, rtol=1e-5)
    for field in ("sq_sum", "xtx"):
        torch.testing.assert_close(getattr(cs["c"], field), getattr(ls["l"], field), atol=1e-4, rtol=1e-5)
    assert (cs["c"].nsamples, cs["c"].ntokens) == (ls["l"].nsamples, ls["l"].ntokens) == (4, 60)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_pointwise_conv_prunes_like_the_linear(method):
    if method not in prunekit.METHODS:
        pytest.skip(f"{method} not registered")
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(16, 8, 1))
    linear = ChannelsLastLinear(conv[0])
    calib = [torch.randn(4, 16, 6, 6)]
    prunekit.prune(conv, method, 0.5, group="per-output", calib=calib, include=["0"])
    prunekit.prune(linear, method, 0.5, group="per-output", calib=calib, include=["fc"])
    torch.testing.assert_close(weight_matrix(conv[0]), linear.fc.weight, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- grouped convs are separate matmuls


class SplitConv(nn.Module):
    """A grouped conv written as ``groups`` independent convs, each on its slice of channels."""

    def __init__(self, grouped: nn.Conv2d):
        super().__init__()
        g = grouped.groups
        cin, cout = grouped.in_channels // g, grouped.out_channels // g
        self.parts = nn.ModuleList(
            nn.Conv2d(cin, cout, grouped.kernel_size, grouped.stride, grouped.padding, grouped.dilation)
            for _ in range(g)
        )
        with torch.no_grad():
            for i, part in enumerate(self.parts):
                part.weight.copy_(grouped.weight[i * cout : (i + 1) * cout])
                part.bias.copy_(grouped.bias[i * cout : (i + 1) * cout])

    def forward(self, x):
        chunks = x.chunk(len(self.parts), dim=1)
        return torch.cat([p(c) for p, c in zip(self.parts, chunks)], dim=1)


def _grouped_and_split(groups: int = 4):
    torch.manual_seed(0)
    grouped = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1, stride=2, groups=groups))
    return grouped, SplitConv(grouped[0]), [torch.randn(4, 8, 9, 9), torch.randn(3, 8, 9, 9)]


def test_split_conv_is_the_grouped_conv():
    grouped, split, calib = _grouped_and_split()
    with torch.no_grad():
        torch.testing.assert_close(grouped(calib[0]), split(calib[0]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", sorted(prunekit.METHODS.names()))
def test_every_method_prunes_conv_groups_as_separate_matmuls(method):
    """Per-output masks and solver updates of a grouped conv equal those of its groups as separate convs."""
    grouped, split, calib = _grouped_and_split()
    prunekit.prune(grouped, method, 0.5, group="per-output", calib=calib, include=["0"])
    prunekit.prune(split, method, 0.5, group="per-output", calib=calib, include=["parts.*"], sequential=False)
    expected = torch.cat([p.weight for p in split.parts])
    torch.testing.assert_close(grouped[0].weight, expected, atol=1e-4, rtol=1e-4)
    assert int((grouped[0].weight == 0).sum()) == 12 * (18 // 2)


@pytest.mark.parametrize("update", sorted(prunekit.UPDATES.names()))
def test_every_update_treats_conv_groups_as_separate_matmuls(update):
    grouped, split, calib = _grouped_and_split()
    prunekit.prune(grouped, "wanda", 0.5, group="per-output", update=update, calib=calib, include=["0"])
    prunekit.prune(
        split, "wanda", 0.5, group="per-output", update=update, calib=calib, include=["parts.*"], sequential=False
    )
    torch.testing.assert_close(grouped[0].weight, torch.cat([p.weight for p in split.parts]), atol=1e-4, rtol=1e-4)


def test_parallel_identical_branches_are_not_calibrated_as_a_chain():
    grouped, split, calib = _grouped_and_split()
    prunekit.prune(grouped, "wanda", 0.5, group="per-output", calib=calib, include=["0"])
    prunekit.prune(split, "wanda", 0.5, group="per-output", calib=calib, include=["parts.*"])
    torch.testing.assert_close(grouped[0].weight, torch.cat([p.weight for p in split.parts]), atol=1e-4, rtol=1e-4)


def test_per_layer_compares_across_conv_groups():
    """Per-layer is one comparison over the whole grouped layer: the exact layer-wide count is pruned."""
    grouped, _, calib = _grouped_and_split()
    prunekit.prune(grouped, "wanda", 0.3, group="per-layer", calib=calib, include=["0"])
    assert int((grouped[0].weight == 0).sum()) == int(grouped[0].weight.numel() * 0.3)


# ---------------------------------------------------------------- every method on every conv kind


@pytest.mark.parametrize("method", sorted(prunekit.METHODS.names()))
@pytest.mark.parametrize(
    "key", ["1d-grouped-strided-dilated-padded", "2d-same-reflect-dilated", "2d-depthwise", "3d-grouped"]
)
def test_every_method_prunes_every_conv_kind(key, method):
    conv, x, _ = make(key)
    net = nn.Sequential(conv)
    report = prunekit.prune(net, method, 0.5, group="per-output", calib=[x], include=["0"])
    w = weight_matrix(conv)
    per_row = w.shape[1] // 2
    assert (w == 0).sum(dim=1).tolist() == [per_row] * w.shape[0]
    assert report.layers["0"]["zeros"] == w.shape[0] * per_row
    assert torch.isfinite(net(x)).all()


# ---------------------------------------------------------------- N:M along in/groups * prod(kernel)

NM_CONVS = {  # columns per group: in/groups * prod(kernel), a multiple of 4
    "1d-even-kernel": lambda: nn.Conv1d(6, 4, 4, padding="same", dilation=3, padding_mode="circular"),
    "2d": lambda: nn.Conv2d(4, 8, 3, padding=1),
    "2d-grouped": lambda: nn.Conv2d(8, 6, 3, stride=2, groups=2),
    "2d-pointwise": lambda: nn.Conv2d(8, 6, 1),
    "3d-grouped": lambda: nn.Conv3d(4, 6, (2, 3, 3), stride=(1, 2, 1), padding=(1, 0, 2), groups=2),
}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("key", sorted(NM_CONVS))
def test_nm_on_convs_along_the_flattened_input(key, method):
    if method not in prunekit.METHODS:
        pytest.skip(f"{method} not registered")
    torch.manual_seed(0)
    conv = NM_CONVS[key]()
    x = torch.randn(4, conv.in_channels, *SPATIAL[len(conv.kernel_size)])
    prunekit.prune(nn.Sequential(conv), method, 0.5, pattern="2:4", calib=[x], include=["0"])
    w = weight_matrix(conv)
    kept = (w != 0).reshape(w.shape[0], -1, 4).sum(dim=2)
    assert (kept == 2).all()


def test_nm_error_names_the_conv_and_its_columns():
    torch.manual_seed(0)
    net = nn.Sequential(OrderedDict(full=nn.Conv2d(4, 8, 3), dw=nn.Conv2d(8, 8, 3, groups=8)))
    with pytest.raises(ValueError, match=r"these are not: dw \(9 columns\)") as err:  # depthwise: 1 * 3 * 3
        prunekit.prune(net, "magnitude", 0.5, pattern="2:4", include=["*"])
    assert "exclude" in str(err.value)
    prunekit.prune(net, "magnitude", 0.5, pattern="2:4", include=["*"], exclude=["dw"])  # 4 * 9 = 36 columns
    assert ((weight_matrix(net.full) != 0).reshape(8, 9, 4).sum(dim=2) == 2).all()
    assert (net.dw.weight != 0).all()


# ---------------------------------------------------------------- which convs are selected


class UNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.proj = nn.Conv2d(8, 8, 1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.up(self.proj(self.mid(self.down(x)))))


def test_default_selection_keeps_stem_and_head_and_takes_pointwise_convs():
    model = UNetish()
    assert list(find_layers(model)) == ["down", "mid", "proj", "head"]  # the transposed conv is not a matmul
    assert list(select_layers(model)) == ["proj"]
    assert list(select_layers(model, layer_types=("conv",))) == ["mid"]
    assert list(select_layers(model, layer_types=("all",))) == ["mid", "proj"]
    assert list(select_layers(model, include=["down", "mid"])) == ["down", "mid"]


def test_explicitly_included_transposed_conv_is_a_clear_error():
    with pytest.raises(ValueError, match=r"'up' is a transposed convolution"):
        select_layers(UNetish(), include=["up"])
    with pytest.raises(ValueError, match="transposed"):
        prunekit.prune(UNetish(), "magnitude", 0.5, include=["*"])


def test_excluded_transposed_conv_is_no_error():
    assert list(select_layers(UNetish(), include=["*"], exclude=["up"])) == ["down", "mid", "proj", "head"]
