"""``docs/results.md`` itself: the page ``python -m train.results`` writes from its grid.

Everything on the page is computed from the run cache at writing time, except the setup
notes below (what was run and how it departs from the papers). Text after the line
:data:`KEEP_MARKER` in an existing page is kept as it is (sections other commands or
people maintain, e.g. the MoE comparison).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from train import evidence, llr_factors, report, results_plots

if TYPE_CHECKING:
    from train.results import Grid

KEEP_MARKER = "<!-- Sections below this line are kept when python -m train.results rewrites the page. -->"

def setup_lines(g: Grid) -> list[str]:
    """The scale and validation bullets, from the grid's own settings."""
    from models.presets import model_config, param_count  # pylint: disable=import-outside-toplevel

    cfg = g.config(g.cells[0], 1e-3, 0)
    params = param_count(model_config(cfg.preset, 257, cfg.seq_len))
    tokens = cfg.steps * cfg.batch_size * cfg.seq_len
    subset = (cfg.eval_batches or 0) * (cfg.val_batch_size or cfg.batch_size) * cfg.seq_len
    return [
        f"- **Scale.** The `{cfg.preset}` LLaMa ({params / 1e6:.1f} M parameters with the "
        f"byte vocabulary), byte-level tokens, the default corpus (an English Wikipedia "
        f"sample, 2.7 M training tokens), {cfg.steps} steps of {cfg.batch_size} x "
        f"{cfg.seq_len} tokens = {tokens / 1e6:.1f} M tokens per run. The papers train "
        "60 M-1 B parameters on billions of tokens: read the gaps as what happens at this "
        "scale only.",
        f"- **Validation.** Every {cfg.eval_every} steps ({cfg.steps // cfg.eval_every} "
        f"evaluations per run) on a fixed subset, the first {cfg.eval_batches} batches of "
        f"{cfg.val_batch_size or cfg.batch_size} x {cfg.seq_len} tokens ({subset:,} tokens) of "
        "the validation split, the same for every run, because a full pass is expensive (on "
        "`tiny`, 179 k tokens from 5 documents: as much as 20 training steps). Losses in the "
        "tables are on that subset, in nats per token.",
    ]


DEPARTURES = """\
- **LR tuning.** x2 ladders around a center (AdamW/Muon 3e-3, LARS 1e-2, LAMB 3e-2, Lion 6e-4,
  SGD 0.5), extended until the best point is interior (at most 3 extra rungs per side); seed 0
  at the best LR is also the grid's run, so the best point is picked on a noisy single seed
  (each method's mean is biased low by this selection in the same way).
- **LLR (alpha_hill).** s in [1, 5] (the `tiny` preset's; the paper studies (1, 2) to (1, 5)
  and its released 130 M recipe uses [1, 3]), the authors' all-eigenvalue Hill estimate, recomputed every 50 steps during the
  first 20% of the run and ramped over 25 steps (the paper: every 100 steps); embedding and head
  at s_max. `tempbalance` maps onto [0.5, 1.5] and recomputes all run long; `alpha_decay` uses
  the same interval.
- **RLRS (relative).** The paper's dense table and final fraction 0.06 with its 1% warmup; every
  other method warms up over 10%. The multipliers were tuned by the paper on its own models and
  are not searched here (`python -m train.search` does that, issue 11).
- **Blockwise.** Peak ratios from the authors' README, every block decaying to the run's own
  floor (0.1 x peak here; their OpenWebText runs use 0.05 and WSD on some runs).
- **upper_bound** is uniform at s_max x the LR it is given; it is run at alpha_hill's best LR
  (the LLR paper's control: is alpha_hill more than a larger LR?), not tuned on its own, since
  tuned it would be tuned uniform again.
- **module_constant** (the ablation) runs at alpha_hill's best LR with alpha_hill's
  base-LR-weighted mean factor per module type, constant over time and the same for every
  layer.
- **init_grad** measures its factors at the fan-in initialisation (matrices N(0, 1/fan_in),
  the untied embedding std 1) and trains, like every method, from the model's own init
  (normal, std 0.02): the paper trains its baseline and layer-wise runs from one shared init
  (GPT-2's std 0.02 for language models). **init_grad/fan_in_init**
  (`--init-grad-train-init paper`, the trainer's default until 2026-11-30) trains from the
  fan-in weights the factors were measured at, tuned on its own ladder; **uniform/fan_in_init**
  (`--fan-in-start`) trains uniform from the same weights with the same seed, at uniform's
  best LR: together they split a gain between the factors and the start.
  **alpha_hill/fan_in_init** runs alpha_hill from those weights at its own best LR: on `tiny`
  the model's std 0.02 is 4.4x below 1/sqrt(width 128) (1.8x at the 130 M width), so it asks
  whether alpha_hill's gain is more than making up for a small init.
- **Lion** uses the init-grad paper's GPT-2 settings (b1 0.95, b2 0.98, weight decay 1.0) but,
  like every optimizer here, decays every parameter (the paper: linear layers only). **SGD**
  (heavy-ball 0.9, L2 1e-4) has no language-model setting in any of the papers.
  **Sophia** (optax.contrib) is not run: its update needs the loss closure (Hutchinson's
  Hessian estimate) passed through the clip, MultiSteps and layer-wise links of the trainer's
  chain, a change to the training step for one optimizer.
- **WSD.** Warmup 10%, stable, then linear decay to 0.1 x peak over the last 20% (LLR's
  Table 16 does not state its decay shape). relative/blockwise on WSD keep their start
  multipliers through the stable phase and move to their end multipliers during the decay
  (`relative_schedule(progress=wsd_progress)`; the RLRS paper only defines the cosine).
- **Weight decay** 0.1 (AdamW, Muon) on every parameter, norms and embeddings included.
"""

GPU_NOTE = """\
`benchmarks/gpu_evidence.sh` runs uniform, alpha_hill and relative (AdamW) on the `20m` and
`60m` presets through this same command (LR grid, 3 seeds, tokens-to-target), each into its own
page (`docs/results_20m.md`, `docs/results_60m.md`). No accelerator was available where this
page was produced, so those pages do not exist yet; when they do, they name the device they
ran on."""


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
        line += (f", about {left * per_run / 60:.0f} CPU-hours at the median "
                 f"{per_run:.0f} CPU-min of a run so far")
    return line + " (more if a ladder must be extended)."


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
    missing = report.missing_lines([r.plan for r in results])

    text = [f"# Results: each method at its own best LR (preset `{g.preset}`, "
            f"{g.base['steps']} steps)", "",
            f"Regenerate with `{command}`: it trains only what the run cache lacks "
            "(add `--report-only` to rewrite this page from the cache without training). "
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
             *setup_lines(g), DEPARTURES]

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
    text += ["## On a GPU", "", GPU_NOTE, ""]
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
              "over the matrices of that type in all layers, then over seeds). At step 0 the "
              "rectangular MLP matrices (128 x 352) have a larger alpha than the square "
              "attention ones (128 x 128) before any training, from their aspect ratio alone, "
              "so the first assignment boosts the MLP.", "", table, ""]
    if fig is not None:
        lines += [f"![llr factors]({fig.name})", ""]
    lines += ["**Ablation:** `module_constant` applies the last column as constant factors "
              "(same for every layer, every step) at alpha_hill's best LR. If it matches "
              "alpha_hill, the gain comes from the module-type pattern; if it falls short, "
              "from the per-matrix, over-time detail.", ""]
    lines += report.ablation_lines(by_name.get("adamw/uniform"), alpha,
                                   by_name.get("adamw/module_constant"))
    return lines + [""]
