"""train.grid: the LR ladder of a cell, its extension until the best LR is interior, and the
seeds at the best LR, driven by a synthetic objective (no training)."""

import math

import pytest

from train import grid
from train.grid import Cell


def drive(cell, objective, left=None, **kwargs):
    """Runs what the plan asks for, one at a time, as python -m train.results does; returns
    the runs in order and the final plan (``left`` collects each plan's ``runs_left``)."""
    done, order = {}, []
    while True:
        p = grid.plan(cell, lambda lr, s: done.get((lr, s)), **kwargs)
        if left is not None:
            left.append(p.runs_left)
        if not p.missing:
            return order, p
        lr, seed = p.missing[0]
        order.append((lr, seed))
        done[(lr, seed)] = objective(lr, seed)


def bowl(best):
    """Loss with its minimum at `best` (in log2 LR), a little seed noise."""
    return lambda lr, seed: 2.0 + (math.log2(lr) - math.log2(best)) ** 2 / 10 + 0.001 * seed


def test_ladder_is_five_x2_rungs_around_the_center():
    assert [grid.rung(3e-3, k) for k in range(-2, 3)] == [7.5e-4, 1.5e-3, 3e-3, 6e-3, 1.2e-2]


def test_interior_best_needs_no_extension_then_three_seeds():
    order, p = drive(Cell("adamw", "uniform", center_lr=3e-3), bowl(3e-3))
    assert order == [(7.5e-4, 0), (1.5e-3, 0), (3e-3, 0), (6e-3, 0), (1.2e-2, 0),
                     (3e-3, 1), (3e-3, 2)]
    assert p.complete and p.best_lr == 3e-3 and p.edge is None
    assert p.seeds == {0: 2.0, 1: 2.001, 2: 2.002}


def test_best_at_the_upper_edge_extends_until_interior():
    order, p = drive(Cell("adamw", "uniform", center_lr=1e-3), bowl(8e-3))
    lrs = [lr for lr, s in order if s == 0]
    # 2.5e-4 .. 4e-3, then 8e-3 (best at the edge again), then 1.6e-2 (worse: interior).
    assert lrs == [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]
    assert p.best_lr == 8e-3 and p.edge is None
    assert order[-2:] == [(8e-3, 1), (8e-3, 2)]


def test_best_at_the_lower_edge_extends_downwards():
    order, p = drive(Cell("adamw", "uniform", center_lr=1e-2), bowl(1.25e-3))
    assert [lr for lr, s in order if s == 0][5:] == [1.25e-3, 6.25e-4]
    assert p.best_lr == 1.25e-3


def test_divergence_above_the_best_counts_as_a_worse_point():
    objective = lambda lr, seed: math.inf if lr > 5e-3 else bowl(1e-2)(lr, seed)
    order, p = drive(Cell("adamw", "uniform", center_lr=3e-3), objective)
    # The bowl wants 1e-2 but 6e-3 and 1.2e-2 diverge: 3e-3 is interior, no extension.
    assert len([1 for _, s in order if s == 0]) == 5
    assert p.best_lr == 3e-3 and p.ladder[-1] == (1.2e-2, math.inf)


def test_extension_stops_at_max_extend_and_says_so():
    monotone = lambda lr, seed: 2.0 + lr   # lower is always better
    order, p = drive(Cell("adamw", "uniform", center_lr=1.0), monotone, max_extend=2)
    assert [lr for lr, s in order if s == 0][-2:] == [0.125, 0.0625]
    assert p.best_lr == 0.0625 and p.edge == "lower" and p.complete


def test_everything_diverging_goes_lower_and_then_gives_up():
    order, p = drive(Cell("sgd", "uniform", center_lr=1.0), lambda lr, s: math.inf,
                     max_extend=1)
    assert len(order) == 6 and p.best_lr is None and not p.complete and p.edge == "lower"


def test_fixed_cell_waits_then_runs_its_seeds_at_the_given_lr():
    cell = Cell("adamw", "upper_bound", fixed_lr_of="adamw/alpha_hill")
    waiting = grid.plan(cell, lambda lr, s: None)
    assert waiting.waiting_for == "adamw/alpha_hill" and not waiting.missing
    order, p = drive(cell, bowl(1e-3), fixed_lr=2e-3)
    assert order == [(2e-3, 0), (2e-3, 1), (2e-3, 2)] and p.complete


@pytest.mark.parametrize("cell, name", [
    (Cell("adamw", "uniform"), "adamw/uniform"),
    (Cell("adamw", "relative", "wsd"), "adamw/relative/wsd"),
    (Cell("adamw", "init_grad", "wsd", variant="fan_in_init"), "adamw/init_grad/fan_in_init/wsd")])
def test_cell_names(cell, name):
    assert cell.name == name


def test_runs_left_is_exact_without_extension_and_a_lower_bound_with_one():
    left = []
    order, _ = drive(Cell("adamw", "uniform", center_lr=3e-3), bowl(3e-3), left=left)
    assert left == list(range(len(order), -1, -1)) == [7, 6, 5, 4, 3, 2, 1, 0]
    left = []
    order, _ = drive(Cell("adamw", "uniform", center_lr=1e-3), bowl(8e-3), left=left)
    actual = list(range(len(order), -1, -1))   # 9 runs: two rungs were added
    assert all(bound <= true for bound, true in zip(left, actual)) and left[0] == 7
    assert left[-1] == 0 and actual[0] == 9
    waiting = grid.plan(Cell("adamw", "upper_bound", fixed_lr_of="adamw/alpha_hill"),
                        lambda lr, s: None, seeds=2)
    assert waiting.runs_left == 2
    gave_up = []
    drive(Cell("sgd", "uniform", center_lr=1.0), lambda lr, s: math.inf, left=gave_up,
          max_extend=1)
    assert gave_up[-1] == 0   # nothing more to run once it has given up
