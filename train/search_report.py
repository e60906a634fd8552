"""What ``python -m train.search`` writes: the path table, the found table, the plot.

Pure formatting of a :class:`train.local_search.SearchResult` (no JAX, no training), so
the tests can check it on synthetic searches.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from train.local_search import FACTOR_NAMES, SearchResult


def fmt_loss(loss: float) -> str:
    return f"{loss:.4f}" if math.isfinite(loss) else "diverged"


def fmt_value(value: float) -> str:
    return f"{value:.6g}"


def _factor(factor: float) -> str:
    return FACTOR_NAMES.get(factor, f"{factor:g}")


def path_table(result: SearchResult) -> str:
    """Markdown: the start, then one row per coordinate step of the search."""
    lines = ["| # | pass | coordinate | from | tried (x factor: val loss) | kept | "
             "best val loss |", "|---|---|---|---|---|---|---|",
             f"| 0 | - | start | - | - | - | {fmt_loss(result.start_loss)} |"]
    for i, step in enumerate(result.steps, start=1):
        tried = ", ".join(f"x{_factor(f)}: {fmt_loss(l)}" for f, _, l in step.tried)
        kept = fmt_value(step.after) + (" (changed)" if step.changed else "")
        lines.append(f"| {i} | {step.pass_} | {step.coordinate} | {fmt_value(step.before)} | "
                     f"{tried} | {kept} | {fmt_loss(step.best_loss)} |")
    return "\n".join(lines)


def table_markdown(start: Mapping[str, float], best: Mapping[str, float],
                   modules: Sequence[str]) -> str:
    """Markdown: start and found value of every module's multipliers (and lr, wd)."""
    lines = ["| setting | start | found |", "|---|---|---|"]
    for name in ("lr", "weight_decay"):
        if name in best:
            lines.append(f"| {name} | {fmt_value(start[name])} | {fmt_value(best[name])} |")
    for m in modules:
        lines.append(f"| {m} (start, end) | ({fmt_value(start[m + '.start'])}, "
                     f"{fmt_value(start[m + '.end'])}) | ({fmt_value(best[m + '.start'])}, "
                     f"{fmt_value(best[m + '.end'])}) |")
    return "\n".join(lines)


def multipliers_file(best: Mapping[str, float], modules: Sequence[str],
                     final_fraction: float) -> dict[str, Any]:
    """The ``--multipliers`` JSON content of a found point (with its ``lr`` and, when
    searched, ``weight_decay``)."""
    out: dict[str, Any] = {
        "multipliers": {m: [best[m + ".start"], best[m + ".end"]] for m in modules},
        "final_fraction": final_fraction, "lr": best["lr"]}
    if "weight_decay" in best:
        out["weight_decay"] = best["weight_decay"]
    return out


def result_json(result: SearchResult) -> dict[str, Any]:
    """The whole search as JSON (steps and trials; ``null`` for a diverged loss)."""
    def loss(x):
        return x if math.isfinite(x) else None

    return {
        "stopped": result.stopped, "evaluations": result.evaluations,
        "start": result.start, "start_loss": loss(result.start_loss),
        "best": result.best, "best_loss": loss(result.best_loss),
        "steps": [{"pass": s.pass_, "coordinate": s.coordinate, "before": s.before,
                   "after": s.after, "best_loss": loss(s.best_loss),
                   "tried": [{"factor": f, "value": v, "loss": loss(l)}
                             for f, v, l in s.tried]} for s in result.steps],
        "trials": [{"run": t.run, "pass": t.pass_, "coordinate": t.coordinate,
                    "factor": t.factor, "point": t.point, "loss": loss(t.loss)}
                   for t in result.trials],
    }


def plot_path(result: SearchResult, path: str | Path) -> Path:
    """Loss per coordinate step: every candidate (dots; x at the top: diverged) and the
    kept point's loss (line), one x position per step (labelled with its coordinate)."""
    from train import plots  # pylint: disable=import-outside-toplevel  (matplotlib)

    plt = plots._pyplot()  # pylint: disable=protected-access
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(result.steps) + 2), 4.5))
    finite = [l for s in result.steps for _, _, l in s.tried if math.isfinite(l)]
    if math.isfinite(result.start_loss):
        finite.append(result.start_loss)
    top = max(finite) if finite else 1.0
    xs, kept = [0], [result.start_loss]
    ax.scatter([0], [result.start_loss], color="black", zorder=3)
    for i, step in enumerate(result.steps, start=1):
        good = [l for _, _, l in step.tried if math.isfinite(l)]
        ax.scatter([i] * len(good), good, color="tab:blue", alpha=0.5, s=14)
        bad = sum(1 for _, _, l in step.tried if not math.isfinite(l))
        if bad:
            ax.scatter([i] * bad, [top] * bad, color="tab:red", marker="x")
        xs.append(i)
        kept.append(step.best_loss)
    ax.plot(xs, kept, color="black", marker="o", lw=1.5, label="kept (best so far)")
    ax.set_xticks(xs, ["start"] + [f"{s.coordinate} (p{s.pass_})" for s in result.steps],
                  rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="final validation loss", title="Local search (RLRS Algorithm 2): "
           "candidates per coordinate step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def transfer_table(rows: Sequence[tuple[str, list[float]]]) -> str:
    """Markdown: val loss (mean ± std over seeds) per transferred table, and the
    difference to the first row (uniform)."""
    lines = ["| run | val loss | vs uniform | seeds |", "|---|---|---|---|"]
    base = None
    for name, losses in rows:
        finite = [x for x in losses if math.isfinite(x)]
        if finite:
            mean = sum(finite) / len(finite)
            std = (math.sqrt(sum((x - mean) ** 2 for x in finite) / (len(finite) - 1))
                   if len(finite) > 1 else None)
            cell = f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")
        else:
            mean, cell = math.inf, "diverged"
        base = mean if base is None else base
        diff = "-" if name == rows[0][0] or not math.isfinite(mean) else f"{mean - base:+.4f}"
        diverged = len(losses) - len(finite)
        lines.append(f"| {name} | {cell} | {diff} | {len(losses)}"
                     + (f" ({diverged} diverged)" if diverged else "") + " |")
    return "\n".join(lines)


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
