"""The sensitivity scan on tiny models: parts, exact restoration of the dense model, trials equal to pruning the part
alone, refusals, and its outputs (JSON round trip, table, heat map)."""

import copy

import pytest
import torch
from torch import nn

import prunekit
from prunekit.errors import PrunekitError
from prunekit.eval.perplexity import perplexity
from prunekit.graph import find_stacks, select_layers
from prunekit.sensitivity import Scan, markdown, plot, scan_parts, sensitivity
from tests.conftest import tiny_llama

CALIB = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
HELD = torch.randint(0, 128, (2 * 16,), generator=torch.Generator().manual_seed(1))


def ppl(model):
    return {"ppl": perplexity(model, HELD, 16)}


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_the_scan_leaves_the_model_exactly_dense(method):
    model = tiny_llama()
    before = state(model)
    scan = sensitivity(model, method, CALIB, ppl, sparsities=(0.5, 0.9), progress=False)
    assert len(scan.parts) == 2 and len(scan.results[0]) == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_trial_is_the_part_pruned_alone_from_the_dense_statistics():
    """Statistics collected once on the dense model are those a sequential prune of that part alone sees."""
    model = tiny_llama()
    scan = sensitivity(model, "wanda", CALIB, ppl, sparsities=(0.7,), progress=False)
    for part, rows in zip(scan.parts, scan.results):
        alone = copy.deepcopy(model)
        prunekit.prune(alone, "wanda", 0.7, calib=CALIB, include=list(part.layers))
        assert rows[0]["ppl"] == pytest.approx(ppl(alone)["ppl"], rel=1e-6)
    assert scan.dense["ppl"] == pytest.approx(ppl(model)["ppl"])


def test_parts_by_block_and_by_kind():
    model = tiny_llama(layers=2)
    layers = select_layers(model)
    blocks = scan_parts(layers, find_stacks(model), "blocks")
    assert [p.name for p in blocks] == ["model.layers.0", "model.layers.1"] and [p.block for p in blocks] == [0, 1]
    assert sum(p.params for p in blocks) == sum(m.weight.numel() for m in layers.values())
    kinds = scan_parts(layers, find_stacks(model), "kinds")
    assert len(kinds) == 14 and kinds[0].name == "model.layers.0: self_attn.q_proj"
    assert kinds[-1].layers == ("model.layers.1.mlp.down_proj",) and kinds[-1].block == 1


class Stage(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)) for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


class Staged(nn.Module):
    """A CNN-like model: stages of sub-blocks, a head outside them."""

    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList(Stage() for _ in range(2))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        for stage in self.stages:
            x = stage(x)
        return self.head(x)


def test_kinds_in_a_stage_group_its_sub_blocks():
    model = Staged()
    kinds = scan_parts(select_layers(model), find_stacks(model), "kinds")
    names = ["stages.0: blocks.*.0", "stages.0: blocks.*.2", "stages.1: blocks.*.0", "stages.1: blocks.*.2"]
    assert [p.name for p in kinds] == names
    assert kinds[0].layers == ("stages.0.blocks.0.0", "stages.0.blocks.1.0")


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        (dict(method="width"), "structured method"),
        (dict(pattern="2:4"), "drop --pattern"),
        (dict(allocation="owl"), "drop --allocation"),
        (dict(sparsities=()), "at least one sparsity"),
        (dict(sparsities=(1.5,)), "sparsity must be in"),
        (dict(granularity="heads"), "unknown scan granularity"),
    ],
)
def test_what_a_scan_cannot_do_is_one_line(settings, says):
    with pytest.raises(PrunekitError, match=says) as err:
        sensitivity(tiny_llama(), calib=CALIB, evaluate=ppl, progress=False, **settings)
    assert "\n" not in str(err.value)


def test_scan_outputs(tmp_path):
    scan = sensitivity(tiny_llama(), "magnitude", None, ppl, sparsities=(0.5, 0.9), progress=False)
    again = Scan.from_dict(scan.to_dict())
    assert again == scan and again.damages() == scan.damages()
    assert "| model.layers.1 | 9,216 |" in markdown(scan)
    assert plot(scan, tmp_path / "heat.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(PrunekitError, match="not a prunekit sensitivity scan"):
        Scan.from_dict({"kind": "report"})
