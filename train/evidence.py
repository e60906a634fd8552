"""The arithmetic behind docs/results.md: best-vs-best comparisons and the papers' speed-up.

Pure functions on plain numbers (no JAX, no training), so they are tested against NumPy on
synthetic curves:

* `tokens_to_reach`: the tokens a validation curve needs to first reach a target loss, linearly
  interpolated between the two evaluations around the crossing;
* `speedup`: the LLR / RLRS / Blockwise headline metric, tokens the tuned uniform baseline needs
  to reach its own final validation loss over the tokens a method needs to reach it;
* `best_point` and `grid_extension`: each method's best LR on a grid, and whether the grid must
  grow because the best point is at an edge;
* `mean_se` and `difference`: mean and standard error over seeds, and a difference of means with
  its standard error;
* `mean_curve` and `speedups`: the seed-averaged validation curve, and the speed-up of a method
  over the tuned baseline both from the averaged curves and seed by seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def tokens_to_reach(tokens: Sequence[float], losses: Sequence[float],
                    target: float) -> float | None:
    """Tokens at which the curve `(tokens[i], losses[i])` first reaches `losses <= target`.

    Between the last evaluation above the target and the first at or below it the curve is
    taken as linear. Returns None if it never reaches the target; `tokens[0]` if it starts there.

    Raises:
      ValueError: lengths differ, fewer than one point, or tokens not increasing.
    """
    if len(tokens) != len(losses) or len(tokens) == 0:
        raise ValueError("tokens and losses must be non-empty and of equal length")
    if any(b <= a for a, b in zip(tokens, tokens[1:])):
        raise ValueError("tokens must be strictly increasing")
    for i, loss in enumerate(losses):
        if loss <= target:
            if i == 0:
                return float(tokens[0])
            t0, t1, l0, l1 = tokens[i - 1], tokens[i], losses[i - 1], loss
            return float(t0 + (l0 - target) / (l0 - l1) * (t1 - t0))
    return None


def speedup(baseline: tuple[Sequence[float], Sequence[float]],
            method: tuple[Sequence[float], Sequence[float]], target: float) -> float | None:
    """Tokens the baseline needs to reach `target` over the tokens `method` needs (None if the
    method never reaches it). Each argument is a `(tokens, losses)` validation curve."""
    t_base = tokens_to_reach(*baseline, target)
    t_method = tokens_to_reach(*method, target)
    if t_base is None:
        raise ValueError("the baseline never reaches the target: choose its own final loss")
    return None if t_method is None else t_base / t_method


def best_point(values: Sequence[float], losses: Sequence[float]) -> tuple[float, float]:
    """The `(value, loss)` of the lowest finite loss (e.g. the best LR of a sweep).

    Raises:
      ValueError: no finite loss.
    """
    finite = [(l, v) for v, l in zip(values, losses) if l is not None and math.isfinite(l)]
    if not finite:
        raise ValueError("no finite loss on the grid")
    loss, value = min(finite)
    return value, loss


def grid_extension(values: Sequence[float], losses: Sequence[float]) -> str | None:
    """Where a sorted grid must grow so that its best point is interior: "lower" when the best
    is the smallest value, "higher" when it is the largest, None when it is inside."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    best, _ = best_point(values, losses)
    if best == values[order[0]]:
        return "lower"
    if best == values[order[-1]]:
        return "higher"
    return None


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n); 0 for one value)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """`mean(a) - mean(b)` and its standard error `sqrt(se_a^2 + se_b^2)` (independent seeds)."""
    (ma, sa), (mb, sb) = mean_se(a), mean_se(b)
    return ma - mb, math.sqrt(sa * sa + sb * sb)


def mean_curve(curves: Sequence[tuple[Sequence[float], Sequence[float]]]
               ) -> tuple[list[float], list[float]]:
    """The pointwise mean of `(tokens, losses)` curves over the evaluations they all have.

    Seeds of one configuration evaluate at the same steps; a curve cut short (a run still
    going) limits the mean to its length.

    Raises:
      ValueError: no curves, or curves whose common evaluations are at different tokens.
    """
    if not curves:
        raise ValueError("no curves")
    n = min(len(t) for t, _ in curves)
    tokens = list(curves[0][0][:n])
    if any(list(t[:n]) != tokens for t, _ in curves):
        raise ValueError("the curves are evaluated at different tokens")
    return tokens, [sum(l[i] for _, l in curves) / len(curves) for i in range(n)]


def speedups(baseline: Sequence[tuple[Sequence[float], Sequence[float]]],
             method: Sequence[tuple[Sequence[float], Sequence[float]]]
             ) -> tuple[float | None, list[float | None]]:
    """The papers' speed-up of `method` over the tuned `baseline`, each a list of seed curves.

    The target is the baseline's mean final loss; the baseline needs the tokens at which its
    seed-averaged curve first reaches it. Returns the speed-up of the method's seed-averaged
    curve and that of each of its seeds (None where a curve never reaches the target).
    """
    target = sum(l[-1] for _, l in baseline) / len(baseline)
    base = mean_curve(baseline)
    t_base = tokens_to_reach(*base, target)
    if t_base is None:   # cannot happen: the mean curve ends at the target
        raise ValueError("the baseline never reaches its own mean final loss")
    overall = speedup(base, mean_curve(method), target)
    per_seed = [None if (t := tokens_to_reach(*curve, target)) is None else t_base / t
                for curve in method]
    return overall, per_seed
