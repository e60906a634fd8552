"""The evidence behind ``docs/results.md``: ``python -m train.results``.

Runs, on one preset (default ``tiny``):

1. the method grid: every method with AdamW and every chainable method with Muon, several
   seeds each (``python -m train.compare`` per (optimizer, method), so each group's runs,
   table and plots stay in their own folder);
2. the LR sweep: ``uniform`` and ``alpha_hill`` with AdamW at several peak LRs (the LLR
   paper's claim is that the layer-wise method works at the uniform baseline's best LR);

then writes a markdown report (default ``docs/results.md``) with mean ± std over seeds of
the final validation loss and bits per byte, and two figures next to it.

Every run has its own folder (``runs/results/{grid,sweep}/<group>/seed<k>``); interruption
loses at most the run in progress: a run whose ``results.json`` exists is read back instead of
rerun (``--rerun`` forces a fresh start). So the report can also be grown step by step, e.g.
``--methods uniform,alpha_hill`` first and the rest later.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

from train import compare
from train import config as config_lib

GRID_METHODS = ("uniform", "alpha_hill", "tempbalance", "relative", "init_grad", "lars", "lamb")
SWEEP_METHODS = ("uniform", "alpha_hill")
SWEEP_LRS = (1e-3, 3e-3, 1e-2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.results", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", choices=list(config_lib.PRESETS))
    p.add_argument("--seeds", type=int, default=3, help="seeds per grid cell (default: 3)")
    p.add_argument("--sweep-seeds", type=int, default=1, help="seeds per sweep point (default: 1)")
    p.add_argument("--standalone-seeds", type=int, default=1,
                   help="seeds for lars/lamb, whole optimizers of their own shown for "
                        "reference (default: 1)")
    p.add_argument("--methods", default=",".join(GRID_METHODS),
                   type=lambda s: compare._parse_list(s, config_lib.METHODS, "method"))
    p.add_argument("--optimizers", default="adamw,muon",
                   type=lambda s: compare._parse_list(s, config_lib.OPTIMIZERS, "optimizer"))
    p.add_argument("--muon-methods", default=None,
                   type=lambda s: compare._parse_list(s, config_lib.METHODS, "method"),
                   help="methods run with muon (default: the same as --methods)")
    p.add_argument("--sweep-lrs", default=",".join(f"{x:g}" for x in SWEEP_LRS),
                   type=lambda s: [float(x) for x in s.split(",") if x.strip()])
    p.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    p.add_argument("--runs", default="runs/results", help="where the runs are kept")
    p.add_argument("--report", default="docs/results.md", help="the markdown report to write")
    p.add_argument("--rerun", action="store_true", help="rerun groups that already have results")
    return p


def _group(args, out: Path, optimizer: str, method: str, seeds: int,
           lr: float | None = None) -> list[dict]:
    """The results of one (optimizer, method, lr) group, one seed per folder: a seed whose
    ``results.json`` exists is read back, the others are run."""
    found = []
    for seed in range(seeds):
        where = out / f"seed{seed}"
        done = where / "results.json"
        if done.exists() and not args.rerun:
            print(f"= {where}: already done, reading it back", flush=True)
        else:
            argv = ["--preset", args.preset, "--methods", method, "--optimizers", optimizer,
                    "--seeds", "1", "--first-seed", str(seed), "--out", str(where),
                    "--no-progress"]
            argv += ["--steps", str(args.steps)] if args.steps else []
            argv += (["--lr", f"{lr:g}", "--method-lr", f"{method}={lr:g}"]
                     if lr is not None else [])
            print(f"> python -m train.compare {shlex.join(argv)}", flush=True)
            compare.main(argv)
        groups = json.loads(done.read_text(encoding="utf-8"))
        found += next(iter(groups.values()))
    return found


def _stats(values: list[float]) -> str:
    if not values:
        return "n/a"
    mean, std = compare._mean_std(values)
    return f"{mean:.4f}" if len(values) == 1 else f"{mean:.4f} ± {std:.4f}"


def _final(results: list[dict], key: str) -> list[float]:
    return [r["final"][key] for r in results if r.get("final") and r["final"].get(key) is not None]


def grid_table(grid: dict[str, list[dict]]) -> str:
    """Rows sorted by mean final validation loss within each optimizer."""
    rows = []
    for (optimizer, method), results in grid.items():
        losses = _final(results, "val_loss")
        mean = sum(losses) / len(losses) if losses else math.inf
        tps = [r["tokens_per_sec"] for r in results if r.get("tokens_per_sec")]
        lr = results[0]["config"]["lr"]
        diverged = sum(1 for r in results if not r.get("final"))
        rows.append((optimizer, mean, f"| {optimizer} | {method} | {lr:g} | {_stats(losses)} | "
                     f"{_stats(_final(results, 'val_bpb'))} | "
                     f"{sum(tps) / len(tps):,.0f} | {len(losses)}"
                     + (f" ({diverged} diverged)" if diverged else "") + " |"))
    order = {o: i for i, o in enumerate(dict.fromkeys(o for o, _ in grid))}
    rows.sort(key=lambda r: (order[r[0]], r[1]))
    head = ["| optimizer | method | peak lr | val loss (mean ± std) | bits/byte (mean ± std) "
            "| tokens/s | seeds |", "|---|---|---|---|---|---|---|"]
    return "\n".join(head + [r[2] for r in rows])


def versus_uniform(grid: dict[tuple[str, str], list[dict]]) -> str:
    """Each method's mean final val loss minus uniform's (same optimizer), with the standard
    error of that difference, so a reader can tell a gap from seed noise."""
    lines = []
    for (optimizer, method), results in grid.items():
        base = grid.get((optimizer, "uniform"))
        if method == "uniform" or not base:
            continue
        a, b = _final(results, "val_loss"), _final(base, "val_loss")
        if not a or not b:
            continue
        diff = sum(a) / len(a) - sum(b) / len(b)
        var = lambda v: (sum((x - sum(v) / len(v)) ** 2 for x in v) / (len(v) - 1)
                         if len(v) > 1 else 0.0)
        se = math.sqrt(var(a) / len(a) + var(b) / len(b))
        verdict = ("better" if diff < -2 * se else "worse" if diff > 2 * se
                   else "within 2 standard errors")
        lines.append(f"- {method} with {optimizer}: {diff:+.4f} nats vs uniform "
                     f"(standard error {se:.4f}): {verdict}.")
    return "\n".join(lines)


def sweep_table(sweep: dict[tuple[str, float], list[dict]], lrs: list[float]) -> str:
    methods = list(dict.fromkeys(m for m, _ in sweep))
    head = ["| peak lr | " + " | ".join(f"{m} val loss" for m in methods) + " |",
            "|---|" + "---|" * len(methods)]
    lines = []
    for lr in lrs:
        cells = []
        for m in methods:
            losses = _final(sweep[(m, lr)], "val_loss")
            cells.append(_stats(losses) if losses else "diverged")
        lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    return "\n".join(head + lines)


def plot_sweep(sweep, lrs, path: Path) -> None:
    from train import plots  # pylint: disable=import-outside-toplevel

    plt = plots._pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in dict.fromkeys(m for m, _ in sweep):
        xs, ys = [], []
        for lr in lrs:
            losses = _final(sweep[(m, lr)], "val_loss")
            if losses:
                xs.append(lr)
                ys.append(sum(losses) / len(losses))
        ax.plot(xs, ys, marker="o", label=m)
    ax.set(xscale="log", xlabel="peak learning rate", ylabel="final validation loss",
           title="LR sweep (AdamW)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = "python -m train.results" + (" " + shlex.join(argv if argv is not None
                                                              else sys.argv[1:]))
    runs = Path(args.runs)
    start = time.perf_counter()
    grid: dict[tuple[str, str], list[dict]] = {}
    # Chainable methods first, the sweep next, LARS/LAMB (whole optimizers of their own) last.
    per_optimizer = {"muon": args.muon_methods or args.methods}
    cells = [(o, m) for o in args.optimizers for m in per_optimizer.get(o, args.methods)
             if m not in config_lib.STANDALONE_METHODS
             and (o == "adamw" or m not in config_lib.ADAMW_ONLY_METHODS)]
    cells += [("adamw", m) for m in args.methods
              if m in config_lib.STANDALONE_METHODS and "adamw" in args.optimizers]
    standalone = [c for c in cells if c[1] in config_lib.STANDALONE_METHODS]
    for optimizer, method in [c for c in cells if c not in standalone]:
        grid[(optimizer, method)] = _group(args, runs / "grid" / f"{method}_{optimizer}",
                                           optimizer, method, args.seeds)
    sweep: dict[tuple[str, float], list[dict]] = {}
    preset_lr = config_lib.PRESETS[args.preset]["lr"]
    for method in SWEEP_METHODS:
        for lr in args.sweep_lrs:
            if lr == preset_lr and ("adamw", method) in grid:  # the grid ran this point already
                sweep[(method, lr)] = grid[("adamw", method)][:args.sweep_seeds]
                continue
            sweep[(method, lr)] = _group(args, runs / "sweep" / f"{method}_lr{lr:g}", "adamw",
                                         method, args.sweep_seeds, lr)
    for optimizer, method in standalone:
        grid[(optimizer, method)] = _group(args, runs / "grid" / f"{method}_{optimizer}",
                                           optimizer, method, args.standalone_seeds)
    elapsed = time.perf_counter() - start

    from train import plots  # pylint: disable=import-outside-toplevel

    report = Path(args.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    stem = report.with_suffix("")
    curves = {o: {f"{m}": grid[(o2, m)] for (o2, m) in grid if o2 == o} for o in args.optimizers}
    figures = []
    for optimizer, groups in curves.items():
        fig = Path(f"{stem}_{optimizer}_loss.png")
        plots.plot_losses(groups, fig)
        figures.append(fig)
    sweep_fig = Path(f"{stem}_lr_sweep.png")
    plot_sweep(sweep, args.sweep_lrs, sweep_fig)
    figures.append(sweep_fig)

    everything = [r for rs in [*grid.values(), *sweep.values()] for r in rs]
    unique = {r.get("out_dir", id(r)): r for r in everything}.values()
    run_minutes = sum(r.get("wall_seconds") or 0.0 for r in unique) / 60
    cfg = next(iter(grid.values()))[0]["config"]
    text = [
        f"# Results: preset `{args.preset}`",
        "",
        f"Produced by `{command}` (reruns read finished groups back from `{runs}/`; "
        "`--rerun` starts over). Every number below is what that command measured; nothing is "
        "edited by hand.",
        "",
        f"Setup: {cfg['steps']} steps, batch {cfg['batch_size']} x {cfg['seq_len']} tokens, "
        f"warmup {cfg['warmup_fraction']:.0%} + cosine to {cfg['final_lr_fraction']:g} x peak, "
        f"weight decay {cfg['weight_decay']:g}, clip {cfg['clip']:g}. Final validation loss "
        "is over the whole validation split (nats/token, byte-level tokens, so bits/byte = "
        "loss / ln 2). Grid cells use the preset's peak LR except where `peak lr` says "
        "otherwise (LARS/LAMB have their own, see `train/compare.py`). `tokens/s` is the "
        "training throughput of the machine that ran the command, including any other load "
        "on it: compare it across rows only on a quiet machine.",
        "",
        f"## Methods, {args.seeds} seeds each"
        + (f" ({args.standalone_seeds} for LARS/LAMB)" if standalone else ""),
        "",
        "Sorted by mean final validation loss within each optimizer.",
        "",
        grid_table(grid),
        "",
        "Difference to uniform with the same optimizer (negative = lower loss; computed "
        "from the table's runs, 'better'/'worse' only when the gap exceeds two standard "
        "errors):",
        "",
        versus_uniform(grid),
        "",
        *[f"![{f.stem}]({f.name})" for f in figures[:-1]],
        "",
        f"## LR sweep: uniform vs alpha_hill (AdamW, {args.sweep_seeds} seed(s) per point; "
        f"at the preset's lr {preset_lr:g} the grid's first seed(s))",
        "",
        sweep_table(sweep, args.sweep_lrs),
        "",
        f"![{sweep_fig.stem}]({sweep_fig.name})",
        "",
        f"Sum of the runs' own wall times: {run_minutes:.0f} min (including other load on the "
        f"machine); this invocation took {elapsed / 60:.1f} min (runs read back cost nothing).",
        "",
    ]
    report.write_text("\n".join(text), encoding="utf-8")
    print(f"Wrote {report} and {', '.join(str(f) for f in figures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
