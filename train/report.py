"""The tables of ``docs/results.md``, from the runs of each cell (pure functions, no JAX).

Every number is computed here from run records by ``train.evidence``; the page only
arranges them. Conventions: losses are final validation losses (nats/token); "± x" is
one standard error of the mean over seeds; a difference is called better/worse only
when it exceeds two standard errors.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from train import evidence, grid, llr_factors
from train.run_cache import RunRecord


@dataclasses.dataclass
class CellResult:
    """A cell's plan and every done run of it, keyed by ``(lr, seed)``."""

    plan: grid.CellPlan
    runs: dict[tuple[float, int], RunRecord]

    @property
    def name(self) -> str:
        return self.plan.cell.name

    @property
    def best_runs(self) -> list[RunRecord]:
        """Finished runs at the best LR (diverged seeds left out; the table counts them)."""
        if self.plan.best_lr is None:
            return []
        found = [self.runs.get((self.plan.best_lr, s)) for s in sorted(self.plan.seeds)]
        return [r for r in found if r is not None and r.final_loss is not None]

    @property
    def best_losses(self) -> list[float]:
        return [r.final_loss for r in self.best_runs]


def curve(run: RunRecord) -> tuple[list[float], list[float]]:
    """``(tokens, validation losses)`` of a run."""
    return [float(t) for _, t, _ in run.evals], [l for _, _, l in run.evals]


def _loss(value: float, se: float, n: int) -> str:
    return f"{value:.4f}" if n == 1 else f"{value:.4f} ± {se:.4f}"


def verdict(diff: float, se: float) -> str:
    if se == 0.0:
        return "one seed: no error bar"
    return "better" if diff < -2 * se else "worse" if diff > 2 * se else "within 2 SE"


def _speedup_text(base: CellResult, result: CellResult) -> str:
    if result is base:
        return "1 (baseline)"
    if len(base.best_runs) == 0 or len(result.best_runs) == 0:
        return "n/a"
    overall, per_seed = evidence.speedups([curve(r) for r in base.best_runs],
                                          [curve(r) for r in result.best_runs])
    reached = [s for s in per_seed if s is not None]
    if overall is None:
        return f"not reached ({len(reached)}/{len(per_seed)} seeds reach it)"
    seeds = (f"; seeds {min(reached):.2f}-{max(reached):.2f}" if len(reached) > 1 else "")
    missing = f", {len(per_seed) - len(reached)} seed(s) never" if len(reached) < len(
        per_seed) else ""
    return f"{overall:.2f}x{seeds}{missing}"


def _grid_text(plan: grid.CellPlan) -> str:
    if plan.cell.fixed_lr_of:
        return f"fixed: {plan.cell.fixed_lr_of}'s best"
    done = sum(1 for _, l in plan.ladder if l is not None)
    text = f"{done} pts, {min(lr for lr, _ in plan.ladder):.3g}-{max(lr for lr, _ in plan.ladder):.3g}"
    if plan.edge:
        text += f", best at {plan.edge} edge"
    return text


def best_vs_best(results: Sequence[CellResult], baseline: CellResult | None) -> str:
    """Markdown table: each method at its own best LR against the tuned ``baseline``."""
    head = ["| method | best peak LR | LR grid (seed 0) | final val loss (mean ± SE) | seeds "
            "| vs tuned uniform (± SE) | speed-up to uniform's final loss |",
            "|---|---|---|---|---|---|---|"]
    rows = []
    for r in results:
        losses = r.best_losses
        n_seeds = len(r.plan.seeds)
        diverged = sum(1 for v in r.plan.seeds.values() if v is not None and math.isinf(v))
        seeds = f"{len(losses)}/{n_seeds}" + (f" ({diverged} diverged)" if diverged else "")
        if not losses:
            rows.append((math.inf, f"| {r.plan.cell.label} | "
                         f"{'-' if r.plan.best_lr is None else f'{r.plan.best_lr:.3g}'} | "
                         f"{_grid_text(r.plan) if r.plan.ladder else '-'} | not yet | {seeds} "
                         "| | |"))
            continue
        mean, se = evidence.mean_se(losses)
        if baseline is not None and baseline.best_losses and r is not baseline:
            d, dse = evidence.difference(losses, baseline.best_losses)
            if min(len(losses), len(baseline.best_losses)) < 2:   # one side has no spread
                versus = f"{d:+.4f} (one seed: no verdict yet)"
            else:
                versus = f"{d:+.4f} ± {dse:.4f}: {verdict(d, dse)}"
            speed = _speedup_text(baseline, r)
        elif r is baseline:
            versus, speed = "(baseline)", "1 (baseline)"
        else:
            versus, speed = "n/a", "n/a"
        rows.append((mean, f"| {r.plan.cell.label} | {r.plan.best_lr:.3g} | "
                     f"{_grid_text(r.plan)} | {_loss(mean, se, len(losses))} | {seeds} | "
                     f"{versus} | {speed} |"))
    rows.sort(key=lambda row: row[0])
    return "\n".join(head + [row for _, row in rows])


def sweep_table(results: Sequence[CellResult]) -> str:
    """Seed-0 final loss per LR (rows) and method (columns); the best of each column bold."""
    tuned = [r for r in results if r.plan.ladder and not r.plan.cell.fixed_lr_of]
    if not tuned:
        return "(no LR grid run yet)"
    lrs = sorted({lr for r in tuned for lr, _ in r.plan.ladder})
    head = ["| peak LR | " + " | ".join(r.plan.cell.label for r in tuned) + " |",
            "|---|" + "---|" * len(tuned)]
    lines = []
    for lr in lrs:
        cells = []
        for r in tuned:
            loss = dict(r.plan.ladder).get(lr, "absent")
            if loss == "absent":
                cells.append("")
            elif loss is None:
                cells.append("(to run)")
            elif math.isinf(loss):
                cells.append("diverged")
            else:
                text = f"{loss:.4f}"
                cells.append(f"**{text}**" if lr == r.plan.best_lr else text)
        lines.append(f"| {lr:.4g} | " + " | ".join(cells) + " |")
    return "\n".join(head + lines)


def factor_table(runs: Sequence[RunRecord], base_lrs) -> tuple[str, dict[str, float]]:
    """Per module type: alpha at the first recompute, the factor alpha_hill applied at the
    first and last update, and its base-LR-weighted mean (the ablation's factors)."""
    scales = [r.records("scale") for r in runs]
    means = llr_factors.mean_factors(scales, base_lrs)
    steps = len(base_lrs)
    series = [llr_factors.per_step(s, steps) for s in scales]
    alphas = [llr_factors.per_label(r.records("alpha")[0]["alpha"]) for r in runs
              if r.records("alpha")]
    head = ["| module type | alpha at step 0 | factor at step 0 | factor at the end "
            "| base-LR-weighted mean factor |", "|---|---|---|---|---|"]
    lines = []
    for label, short in llr_factors.MODULE_TYPES.items():
        if label not in means:
            continue
        alpha = [a[label] for a in alphas if label in a]
        lines.append(
            f"| {short} | {sum(alpha) / len(alpha):.2f} | " if alpha else f"| {short} | - | ")
        lines[-1] += (f"{sum(s[label][0] for s in series) / len(series):.2f} | "
                      f"{sum(s[label][-1] for s in series) / len(series):.2f} | "
                      f"{means[label]:.2f} |")
    return "\n".join(head + lines), means


def ablation_lines(uniform: CellResult | None, alpha: CellResult | None,
                   constant: CellResult | None) -> list[str]:
    """module_constant vs full alpha_hill (same LR) vs tuned uniform, in words and numbers."""
    if not (alpha and constant and alpha.best_losses and constant.best_losses):
        return ["The ablation has not run yet."]
    d, se = evidence.difference(constant.best_losses, alpha.best_losses)
    lines = [f"- module_constant minus alpha_hill at alpha_hill's best LR: {d:+.4f} ± {se:.4f} "
             f"nats ({verdict(d, se)}; negative: the constant pattern is better)."]
    if uniform and uniform.best_losses:
        gain, gse = evidence.difference(uniform.best_losses, alpha.best_losses)
        kept, kse = evidence.difference(uniform.best_losses, constant.best_losses)
        share = kept / gain if gain > 0 else math.nan
        lines.append(f"- Gain over tuned uniform: alpha_hill {gain:+.4f} ± {gse:.4f}, "
                     f"module_constant {kept:+.4f} ± {kse:.4f} nats"
                     + (f"; the constant per-module-type factors reproduce {share:.0%} of "
                        "alpha_hill's gain." if math.isfinite(share) else
                        "; alpha_hill has no gain over tuned uniform to explain."))
    return lines


def missing_lines(plans: Sequence[grid.CellPlan]) -> list[str]:
    """One line per cell that is not complete: what it still needs."""
    out = []
    for p in plans:
        if p.complete:
            continue
        if p.waiting_for:
            out.append(f"- {p.cell.name}: waits for {p.waiting_for}'s best LR")
        elif p.best_lr is None and not p.missing:
            out.append(f"- {p.cell.name}: every LR of the grid diverged")
        elif p.best_lr is None:
            done = sum(1 for _, l in p.ladder if l is not None)
            out.append(f"- {p.cell.name}: LR grid {done}/{len(p.ladder)} run"
                       + ("" if done else " (not started)"))
        else:
            done = sum(1 for v in p.seeds.values() if v is not None)
            out.append(f"- {p.cell.name}: {done}/{len(p.seeds)} seeds at its best LR "
                       f"{p.best_lr:.3g}")
    return out
