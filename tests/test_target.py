"""Quality targets: the bound parser (one-line refusals), and the search on synthetic metric curves, where the true
answer is known from a 0.01 grid."""

import math

import pytest

from prunekit.errors import PrunekitError
from prunekit.metrics import damage
from prunekit.target import Search, parse_bound

DENSE = 46.62


def kjv_like(s: float) -> float:
    """Perplexity of a curve shaped like Wanda on kjv-llama-5m (METRICS.md: 47.86 at 0.5 ... 93.30 at 0.8): the rise
    of mean NLL grows about 3x per 0.1 of sparsity."""
    return DENSE * math.exp(0.026 * 2.9 ** ((s - 0.5) / 0.1)) if s > 0 else DENSE


def run(search: Search, curve) -> Search:
    while (sparsity := search.propose()) is not None:
        search.record(sparsity, {search.bound.metric: curve(sparsity)})
    return search


def grid_max(bound, curve, dense) -> float | None:
    met = [g / 100 for g in range(1, 100) if bound.met(curve(g / 100), dense)]
    return max(met, default=None)


# ---------------------------------------------------------------- the bound


@pytest.mark.parametrize(
    ("text", "dense", "limit"),
    [("ppl<=+10%", 46.62, 51.282), ("ppl<=60", 46.62, 60.0), ("top1>=0.98", 0.99, 0.98), ("top1 >= -0.01", 0.99, 0.98)],
)
def test_bounds_as_written(text, dense, limit):
    bound = parse_bound(text)
    assert bound.threshold(dense) == pytest.approx(limit)
    assert bound.met(limit, dense)
    worse = limit * 1.001 if bound.op.startswith("<") else limit * 0.999
    assert not bound.met(worse, dense)


def test_strict_bounds_exclude_the_limit():
    assert not parse_bound("ppl<60").met(60.0, DENSE) and parse_bound("ppl<60").met(59.9, DENSE)
    assert parse_bound("accuracy>-2%").threshold(0.5) == pytest.approx(0.49)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("ppl", "not METRIC OP VALUE"),
        ("ppl<=ten", "not METRIC OP VALUE"),
        ("ppl>=60", "better lower"),
        ("top1<=0.9", "better higher"),
        ("top1>=98%", "needs a sign"),
        ("bleu>=20", "unknown metric 'bleu'"),
    ],
)
def test_bad_bounds_are_one_line(text, says):
    with pytest.raises(PrunekitError, match=says) as err:
        parse_bound(text)
    assert "\n" not in str(err.value)


def test_damage_of_a_perplexity_is_the_rise_of_mean_nll():
    assert damage("ppl", DENSE * math.e, DENSE) == pytest.approx(1.0)
    assert damage("top1", 0.9, 0.95) == pytest.approx(0.05)


# ---------------------------------------------------------------- the search


@pytest.mark.parametrize("target", ["ppl<=+10%", "ppl<=60", "ppl<=+2%", "ppl<=+300%"])
@pytest.mark.parametrize("first", [0.3, 0.5, 0.9])
def test_search_finds_the_grid_maximum_in_at_most_8_trials(target, first):
    bound = parse_bound(target)
    search = run(Search(bound, DENSE, first=first), kjv_like)
    assert len(search.trials) <= 8
    assert search.trials[0].sparsity == first
    assert abs(search.best.sparsity - grid_max(bound, kjv_like, DENSE)) <= 0.02
    low, high = search.bracket()
    assert high - low <= 0.01 + 1e-9  # it stopped because the answer is pinned to one step


def test_a_top1_curve_with_plateaus():
    """Top-1 moves in steps of one image (1/450) and sits flat for a while: no log-damage to interpolate early."""

    def top1(s):
        return round((0.9933 - max(0.0, s - 0.6) ** 2 * 0.5) * 450) / 450

    bound = parse_bound("top1>=0.98")
    search = run(Search(bound, 0.9933), top1)
    assert len(search.trials) <= 8 and abs(search.best.sparsity - grid_max(bound, top1, 0.9933)) <= 0.02


def test_everything_meets_up_to_the_highest_sparsity():
    search = run(Search(parse_bound("ppl<=1e9"), DENSE), kjv_like)
    assert search.best.sparsity == 0.99 and len(search.trials) <= 8


def test_nothing_meets_ends_at_the_smallest_step():
    search = run(Search(parse_bound("ppl<=46.63"), DENSE, max_trials=20), lambda s: DENSE + 1)
    assert search.best is None and min(t.sparsity for t in search.trials) == 0.01


def test_a_bound_the_dense_model_misses_is_refused_before_any_trial():
    with pytest.raises(PrunekitError, match="dense model already misses") as err:
        Search(parse_bound("ppl<=40"), DENSE).check_dense()
    assert "\n" not in str(err.value)


def test_trials_that_cannot_prune_count_as_misses():
    """A structured ratio the model cannot take (the method refuses it) is a miss, and the search goes lower."""
    search = Search(parse_bound("ppl<=+100%"), DENSE)
    while (sparsity := search.propose()) is not None:
        error = "cannot remove that much" if sparsity > 0.55 else None
        search.record(sparsity, {} if error else {"ppl": kjv_like(sparsity)}, error=error)
    assert search.best.sparsity == 0.55 and all(t.error for t in search.trials if t.sparsity > 0.55)


def test_the_search_is_recorded_for_the_report():
    search = run(Search(parse_bound("ppl<=+10%"), DENSE), kjv_like)
    record = search.to_dict()
    assert record["chosen"] == search.best.sparsity and record["threshold"] == pytest.approx(51.282)
    assert [t["sparsity"] for t in record["trials"]] == [t.sparsity for t in search.trials]
