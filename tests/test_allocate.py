import pytest
import torch
from torch import nn

import prunekit
from prunekit.allocate import ALLOCATORS, rebalance, weighted_mean
from prunekit.collect import LayerStats
from prunekit.errors import PrunekitError
from tests.conftest import tiny_llama


def _no_stats():
    raise AssertionError("this allocator must not run a calibration pass")


def _outlier_setup():
    """Four units with known outlier ratios (all |W| = 1, some input columns with norm 1000, the rest 1):
    block 0 (640 params): 0.1, block 1 (1024): 1/32, block 2 (64): 0, 'head' outside the blocks (64): 0.125."""
    shapes = {"b.0.x": (16, 32, 4), "b.0.y": (8, 16, 0), "b.1.x": (32, 32, 1), "b.2.x": (8, 8, 0), "head": (4, 16, 2)}
    layers, stats = {}, {}
    for name, (out, cols, outliers) in shapes.items():
        layers[name] = nn.Linear(cols, out, bias=False)
        nn.init.ones_(layers[name].weight)
        norms = torch.ones(cols)
        norms[:outliers] = 1000.0
        stats[name] = LayerStats(sq_sum=norms.square()[None])
    block_of = {"b.0.x": 0, "b.0.y": 0, "b.1.x": 1, "b.2.x": 2, "head": None}
    return layers, block_of, stats


def test_owl_follows_the_published_rule_and_keeps_the_weighted_mean_exact():
    layers, block_of, stats = _outlier_setup()
    plan = ALLOCATORS.create("owl").plan(layers, 0.5, block_of, lambda: stats)
    # ratios rescaled to [0, 2 * 0.08]: head 0.16, block 0 0.128, block 1 0.04, block 2 0
    spread = {"head": 0.16, "b.0.x": 0.128, "b.0.y": 0.128, "b.1.x": 0.04, "b.2.x": 0.0}
    params = {n: m.weight.numel() for n, m in layers.items()}
    centre = (0.16 * 64 + 0.128 * 640 + 0.04 * 1024) / 1792
    for name, d in spread.items():
        assert plan[name] == pytest.approx(0.5 - d + centre, abs=1e-12)
    assert weighted_mean(plan, params) == pytest.approx(0.5, abs=1e-12)
    assert plan["head"] < plan["b.0.x"] < plan["b.1.x"] < plan["b.2.x"]  # more outliers, less pruning
    assert plan["b.2.x"] - plan["head"] == pytest.approx(2 * 0.08)


def test_owl_clips_at_zero_and_still_reaches_the_target():
    layers, block_of, stats = _outlier_setup()
    plan = ALLOCATORS.create("owl", {"lam": 0.2}).plan(layers, 0.1, block_of, lambda: stats)
    params = {n: m.weight.numel() for n, m in layers.items()}
    assert min(plan.values()) == 0.0 and plan["head"] == 0.0
    assert weighted_mean(plan, params) == pytest.approx(0.1, abs=1e-12)
    assert plan["b.2.x"] > plan["b.1.x"] > plan["b.0.x"]


def test_owl_with_equal_outlier_ratios_is_uniform():
    layers = {f"b.{i}.x": nn.Linear(8, 8) for i in range(3)}
    stats = {n: LayerStats(sq_sum=torch.ones(1, 8)) for n in layers}
    plan = ALLOCATORS.create("owl").plan(layers, 0.6, {n: int(n[2]) for n in layers}, lambda: stats)
    assert set(plan.values()) == {0.6}


def test_owl_rejects_bad_parameters():
    with pytest.raises(ValueError, match="lam"):
        ALLOCATORS.create("owl", {"lam": 1.5})
    with pytest.raises(ValueError, match="no parameter"):
        ALLOCATORS.create("owl", {"lambda": 0.1})


def test_uniform_needs_no_statistics():
    layers, block_of, _ = _outlier_setup()
    assert set(ALLOCATORS.create("uniform").plan(layers, 0.3, block_of, _no_stats).values()) == {0.3}


def test_rebalance_pins_units_at_the_bounds():
    out = rebalance({"a": -0.2, "b": 0.1, "c": 0.5}, {"a": 1, "b": 1, "c": 2}, 0.2)
    assert out["a"] == 0.0 and weighted_mean(out, {"a": 1, "b": 1, "c": 2}) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="cannot reach"):
        rebalance({"a": 0.5}, {"a": 1}, 0.995)


def test_owl_on_a_tiny_llama_gives_one_sparsity_per_block_and_the_target_overall():
    model = tiny_llama(layers=3)
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    report = prunekit.prune(model, "wanda", 0.5, calib=calib, allocation="owl")
    targets = {}
    for name, row in report.layers.items():
        targets.setdefault(name.split(".")[2], set()).add(row["target"])
    assert all(len(t) == 1 for t in targets.values())
    per_block = [t.pop() for t in targets.values()]
    assert max(per_block) - min(per_block) == pytest.approx(0.16)
    numel = {n: row["numel"] for n, row in report.layers.items()}
    assert weighted_mean({n: row["target"] for n, row in report.layers.items()}, numel) == pytest.approx(0.5)
    assert 0.5 - 1 / 32 < report.sparsity <= 0.5  # each row prunes floor(cols * target), cols >= 32


# ---------------------------------------------------------------- explicit


def test_explicit_patterns_and_block_indices_first_match_wins():
    layers, block_of, _ = _outlier_setup()  # params: b.0.x 512, b.0.y 128, b.1.x 1024, b.2.x 64, head 64
    spec = {"b.0.y": 0.0, 0: 0.5, "1": 0.5, "*": 0.5}
    plan = ALLOCATORS.create("explicit", {"sparsities": spec}).plan(layers, 0.5 * 1664 / 1792, block_of, _no_stats)
    assert plan == {"b.0.x": 0.5, "b.0.y": 0.0, "b.1.x": 0.5, "b.2.x": 0.5, "head": 0.5}


def test_explicit_mean_must_match_the_target_unless_normalized():
    layers, block_of, _ = _outlier_setup()
    spec = {"b.1.*": 0.6, "*": 0.3}
    with pytest.raises(ValueError, match="normalize"):
        ALLOCATORS.create("explicit", {"sparsities": spec}).plan(layers, 0.5, block_of, _no_stats)
    plan = ALLOCATORS.create("explicit", {"sparsities": spec, "normalize": True}).plan(layers, 0.5, block_of, _no_stats)
    params = {n: m.weight.numel() for n, m in layers.items()}
    assert weighted_mean(plan, params) == pytest.approx(0.5, abs=1e-9)
    assert plan["b.1.x"] == pytest.approx(2 * plan["head"])


def test_explicit_errors_name_the_problem():
    layers, block_of, _ = _outlier_setup()
    with pytest.raises(ValueError, match="matches no key"):
        ALLOCATORS.create("explicit", {"sparsities": {"b.*": 0.5}}).plan(layers, 0.5, block_of, _no_stats)
    with pytest.raises(ValueError, match="sparsity must be in"):
        ALLOCATORS.create("explicit", {"sparsities": {"*": 1.5}})
    with pytest.raises(ValueError, match="outside"):
        ALLOCATORS.create("explicit", {"sparsities": {"b.1.*": 0.9, "*": 0.1}, "normalize": True}).plan(
            layers, 0.8, block_of, _no_stats
        )


# ---------------------------------------------------------------- from a sensitivity scan


def test_least_damage_meets_the_budget_and_matches_a_brute_force_optimum():
    """Two parts of unequal size with convex damage curves: the greedy spend equals the best split on a fine grid."""
    from prunekit.allocate import least_damage

    params = [300, 100]
    curves = [lambda s: 0.02 * 2.0 ** (10 * s), lambda s: 0.05 * 2.0 ** (10 * s)]
    levels = least_damage(params, curves, 0.6)
    assert (levels[0] * 300 + levels[1] * 100) / 400 == pytest.approx(0.6, abs=1e-12)

    def total(s0):
        s1 = (0.6 * 400 - s0 * 300) / 100
        return curves[0](s0) + curves[1](s1) if 0 <= s1 <= 0.99 else float("inf")

    best = min((g / 1000 for g in range(0, 990)), key=total)
    assert levels[0] == pytest.approx(best, abs=0.006) and levels[0] > 0.6 > levels[1]
    assert all(abs(s - 0.6) <= 0.1 + 1e-12 for s in least_damage(params, curves, 0.6, lam=0.1))


def test_damage_curve_reads_the_scan_points_and_floors_noise():
    from prunekit.allocate import damage_curve

    curve = damage_curve([0.5, 0.7, 0.9], [-0.01, 0.02, 0.08], floor=1e-3)
    assert curve(0.5) == pytest.approx(1e-3) and curve(0.7) == pytest.approx(0.02) and curve(0.9) == pytest.approx(0.08)
    assert curve(0.8) == pytest.approx(0.04)  # log-linear between points
    assert curve(0.95) == pytest.approx(0.08 * 4**0.25)  # the last growth (4x per 0.2) beyond them
    assert curve(0.25) == pytest.approx(1e-3 / 4)  # quadratic from the dense model


def _scan_file(tmp_path, model, damages_by_block):
    """A scan's JSON for ``model``'s blocks with perplexities ``dense * exp(damage)``."""
    import json
    import math

    from prunekit.graph import find_stacks, select_layers
    from prunekit.sensitivity import Scan, scan_parts

    parts = scan_parts(select_layers(model), find_stacks(model))
    results = [[{"ppl": 10 * math.exp(d)} for d in row] for row in damages_by_block]
    scan = Scan("ppl", {"ppl": 10.0}, [0.5, 0.7, 0.9], "blocks", parts, results)
    path = tmp_path / "sensitivity.json"
    path.write_text(json.dumps(scan.to_dict()))
    return path


def test_sensitivity_allocation_prunes_the_robust_block_more(tmp_path):
    model = tiny_llama(layers=2)
    scan = _scan_file(tmp_path, model, [[0.05, 0.4, 3.0], [0.01, 0.05, 0.2]])
    report = prunekit.prune(model, "magnitude", 0.6, allocation="sensitivity", allocation_params={"scan": str(scan)})
    targets = {name.split(".")[2]: row["target"] for name, row in report.layers.items()}
    assert targets["0"] == pytest.approx(0.52) and targets["1"] == pytest.approx(0.68)  # pinned at +-lam
    assert report.sparsity == pytest.approx(0.6, abs=0.01)


def test_sensitivity_allocation_refuses_what_does_not_fit(tmp_path):
    model = tiny_llama(layers=2)
    scan = _scan_file(tmp_path, model, [[0.05, 0.4, 3.0], [0.01, 0.05, 0.2]])
    cases = [
        ({"scan": str(tmp_path / "none.json")}, {}, "does not exist"),
        ({"scan": str(scan), "lam": 1.5}, {}, "0 <= lam < 1"),
        ({"scan": str(scan), "metric": "top1"}, {}, "not 'top1'"),
        ({"scan": str(scan)}, {"include": ["model.layers.0.*"]}, "covers other layers"),
    ]
    for params, settings, says in cases:
        with pytest.raises(PrunekitError, match=says) as err:
            prunekit.prune(model, "magnitude", 0.6, allocation="sensitivity", allocation_params=params, **settings)
        assert "\n" not in str(err.value)
