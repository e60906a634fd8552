"""train.evidence (the speed-up and best-vs-best arithmetic) against NumPy on synthetic curves."""

import math

import numpy as np
import pytest

from train import evidence


def _curve(rate, n=25, total=1e6):
    tokens = np.linspace(total / n, total, n)
    return tokens, 2.0 + 3.0 * np.exp(-rate * tokens / total)


def test_tokens_to_reach_interpolates_linearly_between_evaluations():
    tokens, losses = _curve(3.0)
    target = 2.5
    got = evidence.tokens_to_reach(tokens, losses, target)
    # NumPy: the first index at or below the target, and the linear crossing before it.
    i = int(np.argmax(losses <= target))
    want = np.interp(target, [losses[i], losses[i - 1]], [tokens[i], tokens[i - 1]])
    assert got == pytest.approx(want, rel=1e-12)
    # Linear interpolation of an exponential: within one evaluation gap of the exact crossing.
    exact = -math.log((target - 2.0) / 3.0) / 3.0 * 1e6
    assert abs(got - exact) < tokens[1] - tokens[0]


def test_tokens_to_reach_edges():
    assert evidence.tokens_to_reach([1, 2, 3], [1.0, 0.5, 0.2], 2.0) == 1.0
    assert evidence.tokens_to_reach([1, 2, 3], [1.0, 0.9, 0.8], 0.5) is None
    # Non-monotone curves: the FIRST crossing counts.
    assert evidence.tokens_to_reach([1, 2, 3, 4], [1.0, 0.4, 0.6, 0.3], 0.5) == pytest.approx(
        1 + (1.0 - 0.5) / (1.0 - 0.4))
    with pytest.raises(ValueError, match="increasing"):
        evidence.tokens_to_reach([1, 1], [1.0, 0.5], 0.7)
    with pytest.raises(ValueError, match="equal length"):
        evidence.tokens_to_reach([1, 2], [1.0], 0.7)


def test_speedup_is_the_ratio_of_tokens_to_the_baselines_final_loss():
    base, fast = _curve(2.0), _curve(4.0)
    target = base[1][-1]   # the baseline's own final loss
    got = evidence.speedup(base, fast, target)
    want = base[0][-1] / evidence.tokens_to_reach(*fast, target)
    assert got == pytest.approx(want, rel=1e-12)
    # Exponential curves: the rate ratio is the speed-up, up to the interpolation error.
    assert got == pytest.approx(2.0, rel=0.05)
    assert evidence.speedup(base, _curve(1.0), target) is None
    with pytest.raises(ValueError, match="baseline never reaches"):
        evidence.speedup(_curve(1.0), base, target)


def test_best_point_and_grid_extension():
    lrs = [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]
    assert evidence.best_point(lrs, [3.0, 2.5, 2.4, float("nan"), 2.6]) == (4e-3, 2.4)
    assert evidence.grid_extension(lrs, [3.0, 2.5, 2.4, 2.45, 2.6]) is None
    assert evidence.grid_extension(lrs, [2.0, 2.5, 2.4, 2.45, 2.6]) == "lower"
    assert evidence.grid_extension(lrs, [3.0, 2.5, 2.4, 2.3, 2.2]) == "higher"
    with pytest.raises(ValueError, match="no finite"):
        evidence.best_point([1.0], [float("inf")])


def test_mean_se_and_difference_match_numpy():
    a, b = [2.01, 2.05, 1.98], [2.10, 2.13, 2.07, 2.11]
    m, se = evidence.mean_se(a)
    assert m == pytest.approx(np.mean(a)) and se == pytest.approx(np.std(a, ddof=1) / np.sqrt(3))
    d, sd = evidence.difference(a, b)
    assert d == pytest.approx(np.mean(a) - np.mean(b))
    assert sd == pytest.approx(np.hypot(np.std(a, ddof=1) / np.sqrt(3),
                                        np.std(b, ddof=1) / np.sqrt(4)))
    assert evidence.mean_se([1.5]) == (1.5, 0.0)


def test_mean_curve_and_seed_speedups_match_numpy():
    base = [_curve(2.0 + 0.1 * k) for k in range(3)]         # three "seeds" of the baseline
    fast = [_curve(3.0 + 0.2 * k) for k in range(3)]
    tokens, mean = evidence.mean_curve(base)
    np.testing.assert_allclose(mean, np.mean([l for _, l in base], axis=0), rtol=1e-12)
    np.testing.assert_allclose(tokens, base[0][0])
    overall, per_seed = evidence.speedups(base, fast)
    target = np.mean([l[-1] for _, l in base])
    # NumPy: first crossing of the mean curves, linear in between (losses decrease here).
    def cross(t, l):
        i = int(np.argmax(l <= target))
        return np.interp(target, [l[i], l[i - 1]], [t[i], t[i - 1]]) if i else t[0]
    t_base = cross(np.asarray(tokens), np.asarray(mean))
    fast_mean = np.mean([l for _, l in fast], axis=0)
    assert overall == pytest.approx(t_base / cross(fast[0][0], fast_mean), rel=1e-12)
    for got, (t, l) in zip(per_seed, fast):
        assert got == pytest.approx(t_base / cross(t, l), rel=1e-12)
    assert all(s > 1.2 for s in per_seed)  # faster curves need fewer tokens
    slow = [_curve(0.5)]
    assert evidence.speedups(base, slow) == (None, [None])
    # A cut-short curve limits the mean; misaligned evaluations are refused.
    short = (base[0][0][:10], base[0][1][:10])
    assert len(evidence.mean_curve([base[1], short])[0]) == 10
    with pytest.raises(ValueError, match="different tokens"):
        evidence.mean_curve([base[0], (base[0][0] * 2, base[0][1])])
