"""The figures of ``docs/results.md`` (matplotlib, Agg: files only).

Each function takes what ``train.report`` works with and writes one PNG:
validation curves at each method's best LR, LR sweeps (one panel per optimizer),
speed-up bars, and alpha_hill's factor per module type over time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from train import evidence, llr_factors
from train.plots import _pyplot
from train.report import CellResult, curve


def _panels(n: int, width: float = 5.5, height: float = 4.0):
    plt = _pyplot()
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat)


def _save(plt, fig, path) -> Path:
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curves(groups: Mapping[str, Sequence[CellResult]], path: str | Path) -> Path | None:
    """Seed-averaged validation loss against tokens at each method's best LR, one panel per
    group (optimizer and schedule), zoomed on the second half of training."""
    groups = {k: [r for r in v if r.best_runs] for k, v in groups.items()}
    groups = {k: v for k, v in groups.items() if v}
    if not groups:
        return None
    plt, fig, axes = _panels(len(groups))
    for ax, (title, results) in zip(axes, groups.items()):
        finals = []
        for r in results:
            tokens, losses = evidence.mean_curve([curve(run) for run in r.best_runs])
            ax.plot(np.asarray(tokens) / 1e6, losses, label=f"{r.plan.cell.label} "
                    f"(lr {r.plan.best_lr:.3g})", lw=1.3)
            finals.append(losses[-1])
        lo = min(finals)
        ax.set_ylim(lo - 0.03, lo + 0.45)
        ax.set(title=f"{title}: best LR each, mean of seeds", xlabel="training tokens (M)",
               ylabel="validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def plot_sweeps(groups: Mapping[str, Sequence[CellResult]], path: str | Path) -> Path | None:
    """Seed-0 final loss against peak LR, one panel per optimizer; x marks divergence."""
    groups = {k: [r for r in v if r.plan.ladder and not r.plan.cell.fixed_lr_of]
              for k, v in groups.items()}
    groups = {k: v for k, v in groups.items() if v}
    if not groups:
        return None
    from matplotlib.ticker import NullFormatter  # pylint: disable=import-outside-toplevel

    plt, fig, axes = _panels(len(groups))
    for ax, (title, results) in zip(axes, groups.items()):
        finite_all = [l for r in results for _, l in r.plan.ladder
                      if l is not None and math.isfinite(l)]
        top = (max(finite_all) + 0.05) if finite_all else 1.0
        for r in results:
            done = [(lr, l) for lr, l in r.plan.ladder if l is not None]
            ok = [(lr, l) for lr, l in done if math.isfinite(l)]
            (line,) = ax.plot([lr for lr, _ in ok], [l for _, l in ok], marker="o", ms=3,
                              label=r.plan.cell.label)
            bad = [lr for lr, l in done if not math.isfinite(l)]
            if bad:
                ax.plot(bad, [top] * len(bad), "x", color=line.get_color())
            if r.plan.best_lr is not None and r.best_losses:
                ax.plot([r.plan.best_lr], [dict(r.plan.ladder)[r.plan.best_lr]], "*", ms=10,
                        color=line.get_color())
        ax.set(xscale="log", title=f"{title}: LR sweep (seed 0; * best, x diverged)",
               xlabel="peak learning rate", ylabel="final validation loss")
        # Ticks at the LRs that were run: the log axis' own minor labels collide within a decade.
        tried = sorted({lr for r in results for lr, l in r.plan.ladder if l is not None})
        ax.set_xticks(tried, [f"{lr:.3g}" for lr in tried], rotation=45, fontsize=7)
        ax.xaxis.set_minor_formatter(NullFormatter())
        if finite_all:
            ax.set_ylim(min(finite_all) - 0.02, min(top + 0.02, min(finite_all) + 0.6))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def plot_speedups(items: Sequence[tuple[str, float | None, Sequence[float | None]]],
                  path: str | Path) -> Path | None:
    """Horizontal bars: speed-up of each method to its tuned uniform's final loss (seed-mean
    curves), with the per-seed range; 1 = as fast as tuned uniform; "not reached" when the
    method's mean curve never gets to that loss."""
    if not items:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(items) + 1.5))
    ys = np.arange(len(items))
    values = [0.0 if v is None else v for _, v, _ in items]
    lo = [v - min((s for s in seeds if s is not None), default=v)
          for v, (_, _, seeds) in zip(values, items)]
    hi = [max((s for s in seeds if s is not None), default=v) - v
          for v, (_, _, seeds) in zip(values, items)]
    ax.barh(ys, values, xerr=[np.maximum(lo, 0), np.maximum(hi, 0)], color="tab:blue",
            alpha=0.7, capsize=3)
    for y, (_, v, _) in zip(ys, items):
        if v is None:
            ax.text(0.02, y, "not reached", va="center", fontsize=8)
    ax.axvline(1.0, color="black", lw=1)
    ax.set_yticks(ys, [label for label, _, _ in items], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="tokens tuned uniform needs / tokens the method needs (to uniform's final "
                  "loss)", title="Speed-up (bars: seed-mean curves; whiskers: seeds)")
    ax.grid(alpha=0.3, axis="x")
    return _save(plt, fig, path)


def plot_factors(scale_runs: Sequence[Sequence[dict]], steps: int, path: str | Path
                 ) -> Path | None:
    """alpha_hill's applied LR factor per module type (mean over matrices and seeds) per step."""
    if not scale_runs:
        return None
    series = [llr_factors.per_step(records, steps) for records in scale_runs]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, short in llr_factors.MODULE_TYPES.items():
        if all(label in s for s in series):
            ax.plot(np.arange(steps), np.mean([s[label] for s in series], axis=0), label=short,
                    lw=1.3, ls="--" if label in ("embed", "head") else "-")
    ax.set(xlabel="update", ylabel="applied LR factor",
           title="alpha_hill: mean factor per module type")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=3)
    return _save(plt, fig, path)
