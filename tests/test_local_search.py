"""train.local_search: RLRS Algorithm 2 on cheap synthetic objectives (no training).

The objective is a separable bowl in log space, ``sum_k ln(v_k / target_k)^2``, so the
best candidate of each coordinate step is the one nearest its target on a log scale and
the whole path can be worked out by hand (below, step by step).
"""

import math

import pytest

from train import local_search as search_lib
from train import search_report as report


def bowl(targets):
    """The objective, recording every point it is asked about (in order)."""
    calls = []

    def objective(point):
        calls.append(dict(point))
        return sum(math.log(point[k] / t) ** 2 for k, t in targets.items())

    return objective, calls


def path(result):
    return [(s.pass_, s.coordinate, s.before, s.after) for s in result.steps]


def test_path_on_a_log_bowl_is_the_hand_computed_one():
    # Targets: a = 7.5 = 5 * 3/2 (two moves: x5 then x3/2), b = 0.2 = 1/5 (one move).
    objective, calls = bowl({"a": 7.5, "b": 0.2})
    result = search_lib.local_search({"a": 1.0, "b": 1.0}, objective)
    # Pass 1: a from 1 tries 0.2, 0.666667, 1.5, 5 -> 5 (|ln 1.5| is the smallest);
    #         b from 1 tries 0.2, ... -> 0.2 (exact).
    # Pass 2: a from 5 tries 1, 3.33333, 7.5, 25 -> 7.5; b from 0.2 stays.
    # Pass 3: nothing moves -> converged.
    assert path(result) == [(1, "a", 1.0, 5.0), (1, "b", 1.0, 0.2),
                            (2, "a", 5.0, 7.5), (2, "b", 0.2, 0.2),
                            (3, "a", 7.5, 7.5), (3, "b", 0.2, 0.2)]
    assert result.stopped == "converged"
    assert result.best == {"a": 7.5, "b": 0.2} and result.best_loss == pytest.approx(0.0)
    # Distinct points: start 1; pass 1: 4 + 4; pass 2: a 4 new, b 4 new (a moved);
    # pass 3: a at 1.5, 11.25, 37.5 new (a=5, b=0.2 was seen in pass 1), b: none new.
    assert result.evaluations == 20 == len(calls)
    keys = [tuple(sorted(c.items())) for c in calls]
    assert len(set(keys)) == len(keys), "a point must never be evaluated twice"
    assert calls[0] == {"a": 1.0, "b": 1.0}
    assert [c["a"] for c in calls[1:5]] == [0.2, 0.666667, 1.5, 5.0]
    assert [c["b"] for c in calls[5:9]] == [0.2, 0.666667, 1.5, 5.0]
    assert [c["a"] for c in calls[17:20]] == [1.5, 11.25, 37.5]
    # Each step's tried list holds all five factors (the current value's known loss too).
    first = result.steps[0]
    assert [f for f, _, _ in first.tried] == list(search_lib.FACTORS)
    assert first.tried[2] == (1.0, 1.0, pytest.approx(result.start_loss))


def test_coordinates_restrict_and_order_the_search():
    objective, calls = bowl({"a": 7.5, "b": 0.2})
    result = search_lib.local_search({"a": 1.0, "b": 1.0}, objective, coordinates=["b"])
    assert path(result) == [(1, "b", 1.0, 0.2), (2, "b", 0.2, 0.2)]
    # Start, pass 1 (4 new), pass 2 from 0.2: 0.04, 0.133333, 0.3 new (1 is the start).
    assert all(c["a"] == 1.0 for c in calls) and result.evaluations == 1 + 4 + 3


@pytest.mark.parametrize("budget", [1, 3, 7, 13])
def test_budget_counts_distinct_points_and_keeps_the_best_seen(budget):
    objective, calls = bowl({"a": 7.5, "b": 0.2})
    result = search_lib.local_search({"a": 1.0, "b": 1.0}, objective, budget=budget)
    assert result.stopped == "budget" and result.evaluations == budget == len(calls)
    assert result.best_loss == min(t.loss for t in result.trials)
    assert objective(result.best) == pytest.approx(result.best_loss)


def test_stopping_rules_converged_at_the_optimum_and_max_passes():
    objective, calls = bowl({"a": 1.0, "b": 1.0})
    at_optimum = search_lib.local_search({"a": 1.0, "b": 1.0}, objective)
    assert at_optimum.stopped == "converged" and at_optimum.evaluations == 9
    assert [s.pass_ for s in at_optimum.steps] == [1, 1]
    objective, _ = bowl({"a": 7.5, "b": 0.2})
    one_pass = search_lib.local_search({"a": 1.0, "b": 1.0}, objective, max_passes=1)
    assert one_pass.stopped == "max_passes" and one_pass.best == {"a": 5.0, "b": 0.2}


def test_a_diverged_point_counts_as_infinitely_bad():
    def objective(point):  # better with larger a, but a >= 5 diverges (nan)
        return math.nan if point["a"] >= 5 else -point["a"]

    result = search_lib.local_search({"a": 1.0}, objective, max_passes=1)
    assert result.best == {"a": 1.5}
    assert [l for _, v, l in result.steps[0].tried if v == 5.0] == [math.inf]


def test_resumed_search_takes_the_same_path_from_its_cache():
    """An objective answered from a cache (as the run cache does for finished runs) must
    give the same path; interrupting it (an exception) loses nothing already cached."""
    objective, _ = bowl({"a": 7.5, "b": 0.2})
    cache, trained = {}, []

    def cached(point, stop_after=None):
        key = tuple(sorted(point.items()))
        if key not in cache:
            if stop_after is not None and len(trained) >= stop_after:
                raise KeyboardInterrupt
            trained.append(key)
            cache[key] = objective(point)
        return cache[key]

    with pytest.raises(KeyboardInterrupt):
        search_lib.local_search({"a": 1.0, "b": 1.0}, lambda p: cached(p, stop_after=11))
    assert len(trained) == 11
    resumed = search_lib.local_search({"a": 1.0, "b": 1.0}, cached)
    fresh = search_lib.local_search({"a": 1.0, "b": 1.0}, bowl({"a": 7.5, "b": 0.2})[0])
    assert path(resumed) == path(fresh) and len(trained) == fresh.evaluations


@pytest.mark.parametrize("kwargs, match", [
    (dict(coordinates=["c"]), "unknown coordinate"),
    (dict(budget=0), "budget must be >= 1"),
    (dict(factors=(0.5, 2.0)), "must contain 1"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        search_lib.local_search({"a": 1.0}, lambda p: 0.0, **kwargs)
    with pytest.raises(ValueError, match="finite number >= 0"):
        search_lib.local_search({"a": -1.0}, lambda p: 0.0)


def test_report_path_table_and_multipliers_file():
    objective, _ = bowl({"lr": 0.015, "embed.start": 1.0, "embed.end": 0.6})
    start = {"lr": 0.003, "embed.start": 5.0, "embed.end": 0.6}
    result = search_lib.local_search(start, objective, max_passes=1)
    table = report.path_table(result).splitlines()
    assert len(table) == 3 + len(result.steps)
    assert table[3].startswith("| 1 | 1 | lr | 0.003 | x1/5: ")
    assert "| 0.015 (changed) |" in table[3]
    found = report.multipliers_file(result.best, ["embed"], 0.04)
    assert found == {"multipliers": {"embed": [1.0, 0.6]}, "final_fraction": 0.04,
                     "lr": 0.015}
