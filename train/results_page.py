"""``docs/results.md`` itself: the page ``python -m train.results`` writes from its grid.

Everything on the page is computed from the run cache at writing time; the setup notes
(what was run and how it departs from the papers) come from the grid's settings
(``train.results_setup``). Text after the line
:data:`KEEP_MARKER` in an existing page is kept as it is (sections other commands or
people maintain, e.g. the MoE comparison).
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from train import evidence, llr_factors, report, results_plots, results_setup

if TYPE_CHECKING:
    from train.results import Grid

KEEP_MARKER = (
    "<!-- Sections below this line are kept when python -m train.results rewrites the page. -->")

GPU_PRESETS = ("20m", "60m")


def gpu_note(path: Path, preset: str) -> str:
    """Where the accelerator pages are: those beside ``path`` that exist, linked."""
    pages = []
    for gpu_preset in GPU_PRESETS:
        name = f"results_{gpu_preset}.md"
        if gpu_preset == preset:
            pages.append(f"`{gpu_preset}`: this page")
        elif (path.parent / name).exists():
            pages.append(f"`{gpu_preset}`: [{name}]({name})")
        else:
            pages.append(f"`{gpu_preset}`: not run yet")
    presets = " and ".join(f"`{p}`" for p in GPU_PRESETS)
    return ("`benchmarks/gpu_evidence.sh` runs uniform, alpha_hill and relative (AdamW; other "
            f"cells with `CELLS=`) on the {presets} presets through this same command (LR "
            "grid, 3 seeds, tokens-to-target) on one accelerator, each into its own page, "
            "which names the device its runs ran on: " + "; ".join(pages) + ".")


def ablation_factors(runs, cfg) -> dict[str, float]:
    """The ``--module-factors`` of the ablation from alpha_hill's runs at its best LR."""
    return llr_factors.factor_file(llr_factors.mean_factors(
        [r.records("scale") for r in runs], base_lrs(cfg)))


def base_lrs(cfg) -> np.ndarray:
    """The base schedule's LR at every update of ``cfg``."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    from train import optimizers  # pylint: disable=import-outside-toplevel

    return np.asarray(jax.jit(jax.vmap(optimizers.base_schedule(cfg)))(jnp.arange(cfg.steps)))


def _groups(results: list[report.CellResult]) -> dict[str, list[report.CellResult]]:
    out: dict[str, list[report.CellResult]] = {}
    for r in results:
        cell = r.plan.cell
        key = cell.optimizer if cell.schedule == "cosine" else f"{cell.optimizer}, {cell.schedule}"
        out.setdefault(key, []).append(r)
    return out


def _has_runs(r: report.CellResult) -> bool:
    return bool(r.runs)


def budget_left(plans: list, records: list) -> str:
    """What is still to run, at least, and its cost at the median CPU time of a run so far."""
    left = sum(p.runs_left for p in plans)
    if not left:
        return ""
    line = f" Still to run: at least {left} runs"
    if records:
        # The median: a run whose first attempt died with its parent records only the rest.
        per_run = float(np.median([rec.cpu_seconds for rec in records])) / 60
        total = (f"{left * per_run / 60:.0f} CPU-hours" if left * per_run >= 90
                 else f"{left * per_run:.0f} CPU-min")
        line += (f", about {total} at the median {per_run:.1f} CPU-min of a run "
                 "so far")
    return line + " (more if a ladder must be extended)."


def software_line(records: list) -> str:
    """The package versions the runs recorded, with how many runs each (runs kept before
    the cache recorded versions are counted as such)."""
    def runs(n: int) -> str:
        return f"{n} run{'s' if n != 1 else ''}"

    counts = collections.Counter(rec.software for rec in records)
    parts = [f"{software} ({runs(n)})" for software, n in sorted(counts.items()) if software]
    if counts[""]:
        parts.append(f"not recorded ({runs(counts[''])}, kept before runs recorded them)")
    return f"- **Software.** {'; '.join(parts) or 'no runs yet'}."


def write(g: Grid, path: Path, command: str, date: str) -> None:
    """Writes the page and its figures next to it."""
    results = [g.result(cell) for cell in g.page_cells]
    shown = [r for r in results if _has_runs(r)]
    groups = _groups(shown)
    stem = path.with_suffix("")
    baselines = {k: next((r for r in v if r.plan.cell.label == "uniform"), None)
                 for k, v in groups.items()}
    records = [rec for r in results for rec in r.runs.values()]
    cpu_hours = sum(rec.cpu_seconds for rec in records) / 3600
    wall_hours = sum(rec.wall_seconds for rec in records) / 3600
    complete = [r for r in results if r.plan.complete]
    if g.cache.ledger is None:
        sources, them = "the run cache lacks", "it"
    else:
        sources = f"the run cache and the ledger `{g.cache.ledger}/` (its runs, in git) lack"
        them = "them"
    missing = report.missing_lines([r.plan for r in results])

    text = [f"# Results: each method at its own best LR (preset `{g.preset}`, "
            f"{g.base['steps']} steps)", "",
            f"Regenerate with `{command}`: it trains only what {sources}"
            f"; add `--report-only` to rewrite this page from {them} without training. "
            "Every number and figure below comes from that command; none is edited by hand.",
            "",
            f"**State ({date}):** {len(complete)} of {len(results)} cells complete, "
            f"{len(records)} runs, {cpu_hours:.1f} CPU-hours ({wall_hours:.1f} h wall, "
            "summed over runs, with any other load on the machine)."
            + budget_left([r.plan for r in results], records)]
    if missing:
        text += ["", "Not yet run or incomplete (the tables show what exists):", "", *missing]
    devices = sorted({rec.device for rec in records if rec.device})
    text += ["", "## Setup and departures from the papers", "",
             f"- **Hardware.** The runs ran on: {', '.join(devices) or 'nothing yet'}.",
             software_line(records),
             *results_setup.setup_lines(g), *results_setup.departure_lines(g), ""]

    figures = {}
    for title, items in groups.items():
        base = baselines[title]
        text += [f"## Best vs best: {title}", "",
                 "Each method at its own best peak LR (mean ± standard error over seeds); "
                 "the difference to tuned uniform of the same optimizer and schedule; the "
                 "speed-up is tuned uniform's tokens to reach its own mean final loss over "
                 "the method's (seed-mean curves, linear interpolation between evaluations).",
                 "", report.best_vs_best(items, base), ""]
    text += ["## LR sweeps (seed 0)", ""]
    for title, items in groups.items():
        text += [f"**{title}**", "", report.sweep_table(items), ""]
    figures["sweeps"] = results_plots.plot_sweeps(groups, f"{stem}_lr_sweeps.png")
    figures["curves"] = results_plots.plot_curves(groups, f"{stem}_curves.png")
    speed_items = []
    for title, items in groups.items():
        base = baselines[title]
        if base is None or not base.best_runs:
            continue
        for r in items:
            if r is base or not r.best_runs:
                continue
            overall, seeds = evidence.speedups([report.curve(x) for x in base.best_runs],
                                               [report.curve(x) for x in r.best_runs])
            speed_items.append((f"{title}: {r.plan.cell.label}", overall, seeds))
    figures["speedups"] = results_plots.plot_speedups(speed_items, f"{stem}_speedups.png")
    for key, fig in figures.items():
        if fig is not None:
            text += [f"![{key}]({fig.name})", ""]
    text += _llr_section(g, results, stem)
    text += ["## On a GPU", "", gpu_note(path, g.preset), ""]
    kept = []
    if path.exists():
        old = path.read_text(encoding="utf-8")
        if KEEP_MARKER in old:
            kept = [old[old.index(KEEP_MARKER) + len(KEEP_MARKER):].strip("\n")]
    text += [KEEP_MARKER, *kept, ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text), encoding="utf-8")


def _llr_section(g: Grid, results, stem: Path) -> list[str]:
    by_name = {r.name: r for r in results}
    alpha = by_name.get("adamw/alpha_hill")
    lines = ["## What LLR actually does", ""]
    if alpha is None or not alpha.best_runs:
        return lines + ["(needs alpha_hill's runs at its best LR)", ""]
    cfg = g.config(alpha.plan.cell, alpha.plan.best_lr, 0)
    table, _ = report.factor_table(alpha.best_runs, base_lrs(cfg))
    fig = results_plots.plot_factors([r.records("scale") for r in alpha.best_runs], cfg.steps,
                                     f"{stem}_llr_factors.png")
    lines += [f"alpha_hill with AdamW at its best LR ({alpha.plan.best_lr:.3g}), "
              f"{len(alpha.best_runs)} seed(s): the LR factor it applied per module type (mean "
              "over the matrices of that type in all layers, then over seeds). "
              + results_setup.llr_intro(g, [llr_factors.per_label(r.records("alpha")[0]["alpha"])
                                            for r in alpha.best_runs if r.records("alpha")]),
              "", table, ""]
    if fig is not None:
        lines += [f"![llr factors]({fig.name})", ""]
    if not any(c.method == "module_constant" for c in g.cells):
        return lines
    lines += ["**Ablation:** `module_constant` applies the last column as constant factors "
              "(same for every layer, every step) at alpha_hill's best LR. If it matches "
              "alpha_hill, the gain comes from the module-type pattern; if it falls short, "
              "from the per-matrix, over-time detail.", ""]
    lines += report.ablation_lines(by_name.get("adamw/uniform"), alpha,
                                   by_name.get("adamw/module_constant"))
    return lines + [""]
