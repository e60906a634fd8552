"""RLRS's Algorithm 2 (its appendix A.1): coordinate-wise local search, on any objective.

The search holds a point (a value per coordinate, e.g. the base LR and each module's
start and end multiplier) and its loss. For one coordinate at a time it evaluates the
point with that coordinate multiplied by each of :data:`FACTORS` (1/5, 2/3, 1, 3/2, 5),
keeps the best (the current value unless another is strictly better) and moves to the
next coordinate. A pass visits every coordinate once; passes repeat until one changes
nothing ("converged") or ``budget`` distinct points have been evaluated ("budget").

This module knows nothing about training: :func:`local_search` takes
``objective(point) -> loss`` (``python -m train.search`` passes "train with these
settings, return the final validation loss", cached on disk), so the path it takes is
tested on cheap synthetic objectives.

Details a user may ask about:

* Every value is rounded to 6 significant digits (``0.6 * 2/3`` is ``0.4``), so a value
  reached twice is the same point.
* A point is evaluated at most once per search (the same point reached again, e.g. the
  current value of the previous coordinate, is looked up); the budget counts distinct
  points, the start included. So a resumed search (objective answered from its cache)
  takes exactly the same path.
* A non-finite loss (a diverged run) counts as infinitely bad.
* When the budget runs out inside a coordinate, the best point evaluated so far is kept:
  the search never ends on a point worse than one it has seen.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

# RLRS, Algorithm 2: "change its value by {1/5, 2/3, 1, 3/2, 5/1}".
FACTORS: tuple[float, ...] = (1 / 5, 2 / 3, 1.0, 3 / 2, 5.0)
FACTOR_NAMES = {1 / 5: "1/5", 2 / 3: "2/3", 1.0: "1", 3 / 2: "3/2", 5.0: "5"}


def rounded(value: float) -> float:
    """``value`` to 6 significant digits (how every searched value is stored)."""
    return float(f"{value:.6g}")


@dataclasses.dataclass(frozen=True)
class Trial:
    """One evaluation of the objective (a distinct point).

    Attributes:
      run: 1-based count of distinct points evaluated so far (the budget's unit).
      pass_: The pass it belongs to (0 for the start point).
      coordinate: The coordinate being varied (``""`` for the start point).
      factor: The factor applied to the coordinate's current value.
      point: The whole point evaluated.
      loss: Its loss (``math.inf`` when the objective gave a non-finite value).
    """

    run: int
    pass_: int
    coordinate: str
    factor: float
    point: dict[str, float]
    loss: float


@dataclasses.dataclass(frozen=True)
class Step:
    """One coordinate visited: the candidates tried and the value kept.

    Attributes:
      pass_: 1-based pass number.
      coordinate: The coordinate.
      before: Its value when the step began.
      after: Its value after the step (the best candidate).
      tried: ``(factor, value, loss)`` per candidate, in :data:`FACTORS` order; the
        factor-1 entry is the current point's known loss. Cut short when the budget ran
        out.
      best_loss: The loss of the point after the step.
    """

    pass_: int
    coordinate: str
    before: float
    after: float
    tried: tuple[tuple[float, float, float], ...]
    best_loss: float

    @property
    def changed(self) -> bool:
        return self.after != self.before


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """What :func:`local_search` found.

    Attributes:
      start: The start point (rounded).
      start_loss: Its loss.
      best: The final point.
      best_loss: Its loss (the smallest of every point evaluated).
      steps: Every coordinate step, in order.
      trials: Every distinct evaluation, in order.
      stopped: ``"converged"`` (a full pass changed nothing), ``"budget"`` or
        ``"max_passes"``.
    """

    start: dict[str, float]
    start_loss: float
    best: dict[str, float]
    best_loss: float
    steps: tuple[Step, ...]
    trials: tuple[Trial, ...]
    stopped: str

    @property
    def evaluations(self) -> int:
        return len(self.trials)


class _BudgetSpent(Exception):
    pass


def local_search(
    start: Mapping[str, float],
    objective: Callable[[dict[str, float]], float],
    *,
    coordinates: Sequence[str] | None = None,
    factors: Sequence[float] = FACTORS,
    budget: int | None = None,
    max_passes: int | None = None,
    before_trial: Callable[[int, int, str, float, dict[str, float]], None] | None = None,
    on_trial: Callable[[Trial, float, dict[str, float]], None] | None = None,
    on_step: Callable[[Step], None] | None = None,
) -> SearchResult:
    """Coordinate-wise local search (RLRS Algorithm 2); see the module docstring.

    Args:
      start: The start point, ``{coordinate: value}`` (values > 0 to move at all: a
        zero stays zero).
      objective: ``point -> loss`` (lower is better); called once per distinct point.
      coordinates: The coordinates to vary, in this order every pass (default: all of
        ``start``'s, in its order); the others stay fixed.
      factors: The multipliers tried per coordinate; must contain 1.
      budget: At most this many distinct points are evaluated (the start included);
        ``None``: no limit.
      max_passes: Stop after this many passes; ``None``: no limit.
      before_trial: Called before each evaluation with ``(run, pass, coordinate,
        factor, point)`` (progress: what is about to run).
      on_trial: Called after each evaluation with the trial, the best loss so far and
        the best point so far (progress).
      on_step: Called after each coordinate step.

    Returns:
      The :class:`SearchResult`.

    Raises:
      ValueError: Unknown coordinates, factors without 1, a budget < 1, a negative or
        non-finite start value.
    """
    point = {k: rounded(float(v)) for k, v in start.items()}
    for name, value in point.items():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"start value of {name!r} must be a finite number >= 0, "
                             f"got {value!r}")
    coords = list(point) if coordinates is None else list(coordinates)
    unknown = [c for c in coords if c not in point]
    if unknown:
        raise ValueError(f"unknown coordinate(s) {unknown}; the point has {list(point)}")
    if 1.0 not in factors:
        raise ValueError(f"factors must contain 1 (the current value), got {factors}")
    if budget is not None and budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")

    seen: dict[tuple, float] = {}
    trials: list[Trial] = []
    best = {"loss": math.inf, "point": dict(point)}

    def evaluate(candidate: dict[str, float], pass_: int, coordinate: str,
                 factor: float) -> float:
        key = tuple(sorted(candidate.items()))
        if key in seen:
            return seen[key]
        if budget is not None and len(seen) >= budget:
            raise _BudgetSpent
        if before_trial is not None:
            before_trial(len(seen) + 1, pass_, coordinate, factor, dict(candidate))
        loss = float(objective(dict(candidate)))
        loss = loss if math.isfinite(loss) else math.inf
        seen[key] = loss
        trial = Trial(len(seen), pass_, coordinate, factor, dict(candidate), loss)
        trials.append(trial)
        if loss < best["loss"]:
            best.update(loss=loss, point=dict(candidate))
        if on_trial is not None:
            on_trial(trial, best["loss"], dict(best["point"]))
        return loss

    start_point = dict(point)
    loss = start_loss = evaluate(point, 0, "", 1.0)
    steps: list[Step] = []
    stopped, pass_ = "", 0
    while not stopped:
        pass_ += 1
        changed = False
        for coordinate in coords:
            before = point[coordinate]
            chosen, chosen_loss, tried = before, loss, []
            try:
                for factor in factors:
                    value = rounded(before * factor)
                    if value == before:
                        candidate_loss = loss
                    else:
                        candidate_loss = evaluate({**point, coordinate: value}, pass_,
                                                  coordinate, factor)
                    tried.append((factor, value, candidate_loss))
                    if candidate_loss < chosen_loss:
                        chosen, chosen_loss = value, candidate_loss
            except _BudgetSpent:
                stopped = "budget"
            point[coordinate], loss = chosen, chosen_loss
            changed |= chosen != before
            if tried:
                steps.append(Step(pass_, coordinate, before, chosen, tuple(tried), loss))
                if on_step is not None:
                    on_step(steps[-1])
            if stopped:
                break
        if not stopped and not changed:
            stopped = "converged"
        elif not stopped and max_passes is not None and pass_ >= max_passes:
            stopped = "max_passes"
    return SearchResult(start=start_point, start_loss=start_loss, best=dict(point),
                        best_loss=loss, steps=tuple(steps), trials=tuple(trials),
                        stopped=stopped)
