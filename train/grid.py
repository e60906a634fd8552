"""Each method at its own best learning rate: the grid a cell of ``python -m train.results`` runs.

A *cell* is one (base optimizer, method, schedule). A tuned cell runs

1. an LR ladder ``center * 2**k``, ``k = -2 .. 2`` (5 points), one seed each;
2. while the best point is at an edge of the ladder, one more rung on that side
   (``train.evidence.grid_extension``), at most ``max_extend`` per side, so the best LR
   is interior or the report says it is not;
3. ``seeds`` seeds at the best LR (seed 0 is the ladder's run).

A fixed cell (``fixed_lr_of``) runs its seeds at another cell's best LR: ``upper_bound``
(uniform at ``s_max`` times alpha_hill's best LR) and the ablations ``module_constant``,
``uniform/fan_in_init`` and ``alpha_hill/fan_in_init``.

:func:`plan` is a pure function of the runs done so far, so the order of the runs, the
extensions and the resumption after an interruption are all the same decision: ask the
plan what is missing, run one, ask again.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from train import evidence

# One ladder step: x2, as the issue asks (x1.5-2 around the preset LR).
LADDER_BASE = 2.0


@dataclasses.dataclass(frozen=True)
class Cell:
    """One (optimizer, method, schedule) of the evidence grid.

    Attributes:
      optimizer: Base optimizer.
      method: Layer-wise method.
      schedule: ``"cosine"`` or ``"wsd"``.
      center_lr: The middle of the LR ladder (tuned cells).
      overrides: Extra ``TrainConfig`` fields of this cell, e.g. RLRS's 1% warmup.
      fixed_lr_of: ``None`` for a tuned cell; else the name of the cell whose best LR this
        one runs at.
      variant: Tells apart two cells of the same method whose ``overrides`` differ (an
        ablation), e.g. ``"fan_in_init"``; empty for the method as the grid runs it.
    """

    optimizer: str
    method: str
    schedule: str = "cosine"
    center_lr: float = 3e-3
    overrides: tuple[tuple[str, Any], ...] = ()
    fixed_lr_of: str | None = None
    variant: str = ""

    @property
    def label(self) -> str:
        """The method, plus ``/variant`` for a variant: what tables and plots call it."""
        return f"{self.method}/{self.variant}" if self.variant else self.method

    @property
    def name(self) -> str:
        """``optimizer/label`` (plus ``/wsd`` off the cosine): how cells are referred to."""
        base = f"{self.optimizer}/{self.label}"
        return base if self.schedule == "cosine" else f"{base}/{self.schedule}"


def rung(center: float, k: int) -> float:
    """The ladder's ``k``-th LR, ``center * 2**k``, to 4 significant digits (stable keys)."""
    return float(f"{center * LADDER_BASE ** k:.4g}")


# What a lookup returns for (lr, seed): the final validation loss, math.inf for a diverged
# run, None for a run not done yet.
Lookup = Callable[[float, int], "float | None"]


@dataclasses.dataclass
class CellPlan:
    """Where a cell stands.

    Attributes:
      cell: The cell.
      ladder: ``[(lr, seed-0 final loss or inf or None)]`` in increasing LR.
      best_lr: The best LR once the ladder is settled (``None`` before).
      edge: ``"lower"``/``"higher"`` when the best LR is still at that edge after
        ``max_extend`` extensions (the optimum may lie beyond it), else ``None``.
      seeds: ``{seed: final loss or inf or None}`` at ``best_lr``.
      missing: ``[(lr, seed)]`` to run next, in order (empty when complete).
      waiting_for: A cell this one needs first (fixed cells), or ``None``.
      seed_count: The seeds it runs at its best LR.
    """

    cell: Cell
    ladder: list[tuple[float, float | None]]
    best_lr: float | None
    edge: str | None
    seeds: dict[int, float | None]
    missing: list[tuple[float, int]]
    waiting_for: str | None = None
    seed_count: int = 3

    @property
    def complete(self) -> bool:
        return not self.missing and self.waiting_for is None and self.best_lr is not None

    @property
    def runs_left(self) -> int:
        """The runs it still needs at least (exact unless the ladder has to be extended,
        which the runs not done yet decide): for the budget line of the report."""
        if self.waiting_for is not None:
            return self.seed_count
        if self.best_lr is None and self.missing:   # ladder, then the other seeds
            return len(self.missing) + self.seed_count - 1
        return len(self.missing)


def plan(cell: Cell, lookup: Lookup, *, seeds: int = 3, initial: int = 5,
         max_extend: int = 3, fixed_lr: float | None = None) -> CellPlan:
    """What ``cell`` has and what it needs next, given the runs done (``lookup``).

    Args:
      cell: The cell.
      lookup: ``(lr, seed) -> final loss`` (``math.inf`` diverged, ``None`` not run).
      seeds: Seeds at the best LR.
      initial: Points of the first ladder (centred on ``cell.center_lr``).
      max_extend: Extensions allowed on each side.
      fixed_lr: For a fixed cell, the LR to run at (``None`` while the cell it follows has
        no best LR yet).
    """
    if cell.fixed_lr_of is not None:
        if fixed_lr is None:
            return CellPlan(cell, [], None, None, {}, [], waiting_for=cell.fixed_lr_of,
                            seed_count=seeds)
        got = {s: lookup(fixed_lr, s) for s in range(seeds)}
        return CellPlan(cell, [(fixed_lr, got[0])], fixed_lr, None, got,
                        [(fixed_lr, s) for s, v in got.items() if v is None], seed_count=seeds)
    low = -(initial // 2)
    ks = list(range(low, low + initial))
    extended = {"lower": 0, "higher": 0}
    edge = None
    while True:
        lrs = [rung(cell.center_lr, k) for k in ks]
        losses = [lookup(lr, 0) for lr in lrs]
        ladder = list(zip(lrs, losses))
        todo = [(lr, 0) for lr, loss in ladder if loss is None]
        if todo:
            return CellPlan(cell, ladder, None, None, {}, todo, seed_count=seeds)
        finite = [l for l in losses if math.isfinite(l)]
        side = "lower" if not finite else evidence.grid_extension(lrs, losses)
        if side is None:
            break
        if extended[side] >= max_extend:
            edge = side
            if finite:
                break
            return CellPlan(cell, ladder, None, edge, {}, [],   # everything diverged
                            seed_count=seeds)
        extended[side] += 1
        ks = [ks[0] - 1] + ks if side == "lower" else ks + [ks[-1] + 1]
    best_lr, _ = evidence.best_point(lrs, losses)
    got = {s: lookup(best_lr, s) for s in range(seeds)}
    return CellPlan(cell, ladder, best_lr, edge, got,
                    [(best_lr, s) for s, v in got.items() if v is None], seed_count=seeds)
