"""The evidence behind ``docs/results.md``: ``python -m train.results``.

Every cell (base optimizer x method x schedule, :data:`CELLS`, in the order they are run)
gets its own LR grid and then several seeds at its best LR (``train.grid``); the page
compares each method at its own best LR with the tuned uniform baseline of the same
optimizer and schedule, in final loss (± standard error) and in the papers' speed-up
(tokens to reach tuned uniform's final validation loss, ``train.evidence``).

Every run is cached by its configuration (``train.run_cache``), so the command can be
stopped at any time and started again: it reads finished runs back, resumes an
interrupted one from its checkpoint and only trains what is missing. Build the grid up
with ``--cells`` and ``--max-runs``; ``--report-only`` rewrites the page from the cache
without training; a ``--stop-file`` that appears stops it after the run in progress.
The cache stays outside the checkout; what the page reads of each done run is also kept
in a ledger beside the page (``docs/results_runs/``, ``train.run_ledger``), committed with
it, so a fresh clone regenerates the page and resumes the grid without the cache.
Start it more than once on the same cache (more cores, more machines on a shared disk) and
the processes share the work: each trains the first missing run no other one is training.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import shlex
import sys
import time
from pathlib import Path

from train import config as config_lib
from train import grid, report, results_page
from train import multipliers as multipliers_lib
from train.grid import Cell
from train.run_cache import RunBusy, RunCache, RunFailed, RunInterrupted

# Run settings per preset, on top of the preset's own (why: results_page.SETUP_NOTES).
# tiny: 1500 steps of 16 x 128 tokens (3.1 M tokens, 1.13 epochs of the default corpus'
# training split), about 11 min per run alone on 2 CPU cores (measured: 5,600 tok/s,
# ~20 CPU-min per run; two runs side by side share the cores, no faster in total);
# 25 evaluations on a fixed 65,536-token subset of the validation split (the first 8
# batches of 64 x 128): a full pass costs ~20 training steps, 25 of them would add a
# third to every run.
# alpha_hill/tempbalance/alpha_decay keep the tiny preset's proportions (6 recomputes over
# the first 20% of the run, each ramped over half an interval).
RUN_SETTINGS = {
    "tiny": dict(steps=1500, eval_every=60, eval_batches=8, val_batch_size=64, log_every=25,
                 checkpoint_every=250, keep_checkpoints=1, interval=50, ramp_steps=25),
    "20m": dict(steps=2000, eval_every=80, eval_batches=16, val_batch_size=64, log_every=25,
                checkpoint_every=500, keep_checkpoints=1),
    "60m": dict(steps=10000, eval_every=400, eval_batches=16, val_batch_size=64,
                log_every=50, checkpoint_every=1000, keep_checkpoints=1),
    # moe-tiny: a step costs about 3x a tiny one (dense dispatch over 8 experts; measured
    # 1,100 vs 3,300 tokens/s per run with two side by side on 2 cores), so 600 steps
    # (1.2 M tokens, ~19 min per run) keep a run near tiny's; 24 evaluations; alpha_hill at
    # tiny's proportions again (6 recomputes over the first 20%).
    "moe-tiny": dict(steps=600, eval_every=25, eval_batches=8, val_batch_size=64,
                     log_every=25, checkpoint_every=200, keep_checkpoints=1, interval=20,
                     ramp_steps=10),
}
# RLRS as published: 1% warmup (the other methods keep the preset's 10%).
_RLRS = (("warmup_fraction", 0.01),)
# The init-grad paper's Lion (GPT-2): b1 0.95, b2 0.98, weight decay 1.0; our SGD has no
# paper setting for language models: heavy-ball 0.9, L2 1e-4 (its ImageNet value).
_LION = (("b1", 0.95), ("b2", 0.98), ("weight_decay", 1.0))
_SGD = (("b1", 0.9), ("weight_decay", 1e-4))
# Centers of the LR ladders: the preset's AdamW LR (3e-3 on tiny; Muon shares it through
# consistent_rms), LARS/LAMB's own (train/compare.py), Lion 5x lower (the paper's
# AdamW/Lion ratio, 6e-4/1.2e-4), SGD a guess the ladder extends from.
_LARS, _LAMB, _LION_LR, _SGD_LR = 1e-2, 3e-2, 6e-4, 0.5


def searched_cell(center: float, table: dict, settings: dict[str, float]) -> Cell:
    """``relative`` with a table ``python -m train.search`` found (a ``--multipliers`` file):
    RLRS's 1% warmup, the file's weight decay if it has one, a ladder centred on its lr."""
    overrides = (*_RLRS, ("multipliers", table))
    if "weight_decay" in settings:
        overrides += (("weight_decay", settings["weight_decay"]),)
    return Cell("adamw", "relative", variant="searched", overrides=overrides,
                center_lr=settings.get("lr", center))


def cells_for(center: float, family: str = "llama", searched: Cell | None = None
              ) -> list[Cell]:
    """The grid of a model family, in the order it is run (what matters most first);
    ``searched`` (a :func:`searched_cell`) joins it after the paper's ``relative``."""
    extra = [] if searched is None else [searched]
    if family == "moe":   # RLRS's MoE question: its table (Table 4), searched, LLR
        return [Cell("adamw", m, center_lr=center, overrides=_RLRS if m == "relative" else ())
                for m in ("uniform", "relative", "alpha_hill")] + extra
    adamw = [Cell("adamw", m, center_lr=center, overrides=_RLRS if m == "relative" else ())
             for m in ("uniform", "alpha_hill", "relative", "init_grad", "blockwise",
                       "alpha_decay", "tempbalance")]
    # init_grad from the fan-in init its factors are measured at (tuned on its own), and
    # uniform from the same weights: the start's share of a gain and the factors' share.
    # On tiny the model's std 0.02 is 4.4x below 1/sqrt(width), so alpha_hill from those
    # weights asks whether its gain is more than making up for a small init.
    fan_in = (("fan_in_start", True),)
    ablation = [Cell("adamw", "module_constant", fixed_lr_of="adamw/alpha_hill"),
                Cell("adamw", "init_grad", variant="fan_in_init", center_lr=center,
                     overrides=(("init_grad_train_init", "paper"),)),
                Cell("adamw", "uniform", variant="fan_in_init", fixed_lr_of="adamw/uniform",
                     overrides=fan_in),
                Cell("adamw", "alpha_hill", variant="fan_in_init",
                     fixed_lr_of="adamw/alpha_hill", overrides=fan_in)]
    muon = [Cell("muon", m, center_lr=center, overrides=_RLRS if m == "relative" else ())
            for m in ("uniform", "alpha_hill", "relative", "init_grad", "blockwise",
                      "tempbalance")]
    rest = [Cell("adamw", "upper_bound", fixed_lr_of="adamw/alpha_hill"),
            Cell("muon", "upper_bound", fixed_lr_of="muon/alpha_hill"),
            Cell("adamw", "lars", center_lr=_LARS), Cell("adamw", "lamb", center_lr=_LAMB)]
    others = [Cell(o, m, center_lr=lr, overrides=extra) for o, lr, extra in
              (("lion", _LION_LR, _LION), ("sgd", _SGD_LR, _SGD)) for m in ("uniform", "init_grad")]
    wsd = [Cell("adamw", m, "wsd", center_lr=center, overrides=_RLRS if m == "relative" else ())
           for m in ("uniform", "alpha_hill", "blockwise", "relative")]
    return adamw[:4] + extra + ablation + adamw[4:] + muon + rest + others + wsd


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.results",
                                description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(RUN_SETTINGS))
    p.add_argument("--cells", default="*",
                   help="comma-separated cell names or patterns to run, e.g. "
                        "'adamw/uniform,adamw/alpha_hill' or 'muon/*' (default: all; the "
                        "report shows every cell the cache has runs for)")
    p.add_argument("--page-cells", default="*",
                   help="the cells the page covers, as --cells (default: all)")
    p.add_argument("--searched", default=None, metavar="FILE",
                   help="also run relative with this table (a --multipliers file, what "
                        "python -m train.search writes) as the cell adamw/relative/searched: "
                        "its weight decay if it has one, an LR ladder centred on its lr")
    p.add_argument("--seeds", type=int, default=3, help="seeds at each best LR (default 3)")
    p.add_argument("--runs", default="runs/results",
                   help="the run cache (keep it outside a git checkout)")
    p.add_argument("--report", default="docs/results.md", help="the page to write")
    keep = p.add_mutually_exclusive_group()
    keep.add_argument("--ledger", default=None, metavar="DIR",
                      help="where the page's done runs are kept for git (train/run_ledger.py): "
                           "read when the cache lacks a run, added to as runs finish (default: "
                           "beside the page, docs/results.md -> docs/results_runs/)")
    keep.add_argument("--no-ledger", action="store_true",
                      help="keep no ledger: the page can be regenerated only where its run "
                           "cache is")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rewrite the page from the runs in the cache "
                        "and the ledger")
    p.add_argument("--max-runs", type=int, default=None,
                   help="train at most this many runs in this invocation")
    p.add_argument("--stop-file", default=None,
                   help="stop launching runs once this file exists (the run in progress "
                        "finishes)")
    p.add_argument("--list", action="store_true",
                   help="print the cells and their state; train nothing, write no page (done "
                        "runs the cache has and the ledger lacks are copied into it)")
    return p


class Grid:
    """The cells of one preset over one run cache: configs, plans and results."""

    def __init__(self, preset: str, cache: RunCache, seeds: int, page_cells: str = "*",
                 searched: tuple[dict, dict[str, float]] | None = None):
        self.preset, self.cache, self.seeds = preset, cache, seeds
        self.base = {**RUN_SETTINGS[preset], "progress": False,
                     "compilation_cache_dir": str(Path(cache.root) / "xla_cache")}
        center = config_lib.PRESETS[preset]["lr"]
        self.family = config_lib.model_family(preset)
        self.cells = cells_for(center, self.family,
                               None if searched is None else searched_cell(center, *searched))
        self.page_cells = _selected(self.cells, page_cells)
        self._factors: dict[str, float] | None = None

    def config(self, cell: Cell, lr: float, seed: int) -> config_lib.TrainConfig:
        values = {**self.base, **dict(cell.overrides), "method": cell.method,
                  "optimizer": cell.optimizer, "schedule": cell.schedule, "lr": lr,
                  "seed": seed}
        if cell.method == "module_constant":
            values["module_factors"] = self.ablation_factors() or {"other": 1.0}
        return config_lib.from_preset(self.preset, **values)

    def _lookup(self, cell: Cell):
        def lookup(lr: float, seed: int) -> float | None:
            record = self.cache.lookup(self.config(cell, lr, seed))
            if record is None:
                return None
            return record.final_loss if record.final_loss is not None else float("inf")
        return lookup

    def plan(self, cell: Cell) -> grid.CellPlan:
        fixed = None
        if cell.fixed_lr_of:
            other = self.plan(self.cell(cell.fixed_lr_of))
            # The best LR is settled by the ladder alone (the seeds at it do not move it);
            # module_constant also needs alpha_hill's factors, measured on all its seeds.
            ready = (other.best_lr is not None if cell.method != "module_constant"
                     else other.complete and self.ablation_factors() is not None)
            fixed = other.best_lr if ready else None
        return grid.plan(cell, self._lookup(cell), seeds=self.seeds, fixed_lr=fixed)

    def cell(self, name: str) -> Cell:
        return next(c for c in self.cells if c.name == name)

    def result(self, cell: Cell) -> report.CellResult:
        plan = self.plan(cell)
        runs = {}
        for lr, _ in plan.ladder:
            for seed in ([0] if lr != plan.best_lr else list(plan.seeds) or [0]):
                record = self.cache.lookup(self.config(cell, lr, seed))
                if record is not None:
                    runs[(lr, seed)] = record
        return report.CellResult(plan, runs)

    def ablation_factors(self) -> dict[str, float] | None:
        """alpha_hill's (AdamW) base-LR-weighted mean factor per module type, from its
        seeds at its best LR; ``None`` until they are all done."""
        if self._factors is not None:   # final once alpha_hill is complete
            return self._factors
        alpha = self.cell("adamw/alpha_hill")
        plan = grid.plan(alpha, self._lookup(alpha), seeds=self.seeds)
        if not plan.complete:
            return None
        runs = [self.cache.lookup(self.config(alpha, plan.best_lr, s)) for s in plan.seeds]
        runs = [r for r in runs if r is not None and r.final_loss is not None]
        if not runs:
            return None
        self._factors = results_page.ablation_factors(runs, self.config(alpha, plan.best_lr, 0))
        return self._factors


def _selected(cells: list[Cell], patterns: str) -> list[Cell]:
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    return [c for c in cells if any(fnmatch.fnmatchcase(c.name, p) for p in wanted)]


def _next_run(g: Grid, cells: list[Cell], said: set[str]) -> tuple[Cell, float, int] | str:
    """The first run the cells miss that no other process is training, in cell order; else
    ``"busy"`` (what is left, or a cell it waits for, is being trained elsewhere) or
    ``"done"`` (nothing left to run here now)."""
    busy = False
    for cell in cells:
        p = g.plan(cell)
        if p.waiting_for or not p.missing:
            best = "-" if p.best_lr is None else f"{p.best_lr:.3g}"
            state = (f"= {cell.name}: " + (f"waits for {p.waiting_for}" if p.waiting_for
                                           else f"complete (best lr {best})"))
            if state not in said:   # each state once: "waits" and later "complete" both show
                said.add(state)
                print(state, flush=True)
            if p.waiting_for:   # worth waiting for if another process trains that cell
                other = g.cell(p.waiting_for)
                busy |= any(g.cache.busy(g.config(other, lr, seed))
                            for lr, seed in g.plan(other).missing)
            continue   # (a cell it waits for, if selected, is one of the others)
        for lr, seed in p.missing:
            if not g.cache.busy(g.config(cell, lr, seed)):
                phase = "LR grid" if p.best_lr is None else f"seeds at best lr {p.best_lr:.3g}"
                ladder = ", ".join(f"{x:.3g}:{'-' if l is None else f'{l:.4f}'}"
                                   for x, l in p.ladder)
                print(f"> {cell.name}: lr {lr:.4g} seed {seed} ({phase}; ladder {ladder})",
                      flush=True)
                return cell, lr, seed
        busy = True
    return "busy" if busy else "done"


def _list_cells(g: Grid) -> int:
    width = max(len(cell.name) for cell in g.cells)
    try:
        for cell in g.cells:
            p = g.plan(cell)
            state = "complete" if p.complete else report.missing_lines([p])[0].split(": ", 1)[1]
            print(f"{cell.name:{width}s}  {state}", flush=True)
    except BrokenPipeError:   # `--list | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # quiet exit flush
    return 0


def build(g: Grid, cells: list[Cell], args: argparse.Namespace,
          poll_seconds: float = 60.0) -> str:
    """Trains what ``cells`` miss, in order, leaving alone the runs other processes sharing
    the cache are training (and waiting for them when nothing else is left); returns why
    it stopped."""
    started, said, waiting = 0, set(), False
    while True:
        if args.stop_file and Path(args.stop_file).exists():
            return f"stop file {args.stop_file} exists"
        if args.max_runs is not None and started >= args.max_runs:
            return f"--max-runs {args.max_runs} reached"
        picked = _next_run(g, cells, said)
        if picked == "done":
            waits = [f"{c.name} waits for {p.waiting_for}" for c in cells
                     if (p := g.plan(c)).waiting_for]
            return ("every selected cell is complete" if not waits else
                    f"nothing left to run: {'; '.join(waits)}, which no process is "
                    "training (add it to --cells)")
        if picked == "busy":
            if not waiting:
                print("waiting: what is left is being trained by another process", flush=True)
            waiting = True
            time.sleep(poll_seconds)
            continue
        waiting = False
        cell, lr, seed = picked
        try:
            record = g.cache.run(g.config(cell, lr, seed))
        except RunBusy:   # another process took it between the check and the lock
            continue
        started += 1
        final = record.final_loss
        print(f"  {record.status}"
              + (f": final val loss {final:.4f}" if final is not None else "")
              + f" in {record.wall_seconds / 60:.1f} min "
              f"(CPU {record.cpu_seconds / 60:.1f} min)", flush=True)


def ledger_beside(report: Path) -> Path:
    """The default ledger of a page: ``<page stem>_runs/`` in its folder."""
    return report.with_name(f"{report.stem}_runs")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    searched = None
    if args.searched:
        try:
            searched = multipliers_lib.load_multipliers_file(args.searched, "--searched")
        except ValueError as e:
            parser.error(str(e))
    if args.ledger == "":
        parser.error("--ledger needs a folder (use --no-ledger to keep none)")
    ledger = None if args.no_ledger else args.ledger or str(ledger_beside(Path(args.report)))
    g = Grid(args.preset, RunCache(args.runs, ledger=ledger), args.seeds, args.page_cells,
             searched)
    cells = _selected(g.cells, args.cells)
    for flag, chosen in (("--cells", cells), ("--page-cells", g.page_cells)):
        if not chosen:
            parser.error(f"{flag} matches none of: " + ", ".join(c.name for c in g.cells))
    if args.list:
        return _list_cells(g)
    try:   # before any training, so a bad --report cannot lose a long build
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"--report {args.report}: cannot create its folder ({e.strerror})")
    why = "--report-only"
    if not args.report_only:
        try:
            why = build(g, cells, args)
        except RunInterrupted as e:
            print(f"interrupted: {e}", file=sys.stderr)
            why = "interrupted"
        except RunFailed as e:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted; the run in progress resumes next time", file=sys.stderr)
            return 130
    print(f"stopped: {why}; writing {args.report}", flush=True)
    # The page names the command that builds ALL of it (not this invocation's selection).
    defaults = build_parser().parse_args([])
    command = ["python", "-m", "train.results"] + [
        item for flag, value in (("--preset", args.preset), ("--runs", args.runs),
                                 ("--report", args.report), ("--seeds", str(args.seeds)),
                                 ("--page-cells", args.page_cells),
                                 ("--ledger", args.ledger),
                                 ("--searched", args.searched))
        if value is not None and value != str(getattr(defaults, flag[2:].replace("-", "_")))
        for item in (flag, value)] + (["--no-ledger"] if args.no_ledger else [])
    results_page.write(g, Path(args.report), shlex.join(command), time.strftime("%Y-%m-%d"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
