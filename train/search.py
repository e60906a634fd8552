"""``python -m train.search``: RLRS's local search (its Algorithm 2) for relative-LR
multipliers on a small model, and their transfer to a larger one.

    python -m train.search --preset moe-tiny --budget 40 --transfer-to moe-8x34m

Searches the base LR and every module's start and end multiplier of ``--method relative``
(optionally the weight decay), starting from the paper's table for the preset's family
(MoE: Table 4; dense: Table 5), by :func:`train.local_search.local_search`: each
coordinate in turn multiplied by 1/5, 2/3, 1, 3/2, 5, the best final validation loss kept.

Every training run is cached by its configuration in ``OUT/runs`` by
:class:`train.run_cache.RunCache` (as ``python -m train.results``: one child process
``python -m train`` per run, a folder per config key). Rerunning the same command reads
finished runs back and resumes an interrupted one from its checkpoint, so an
interrupted search continues at no cost and takes the same path.

Writes to ``OUT`` (default ``runs/search/<preset>``):

* ``search.md``: the setup, the path taken (one row per coordinate step), the found
  table beside the start, reference runs (uniform, the paper's table) and the transfer;
* ``multipliers.json``: the found table in the format ``python -m train --method
  relative --multipliers FILE`` reads (with the found ``lr``);
* ``search_loss.png``: the loss per coordinate step; ``search.json``: everything, raw.

``--transfer-to PRESET`` then trains uniform, the paper's table and the found table on
that preset (at ITS learning rate, as RLRS's Algorithm 1: the base LR is tuned per model,
the relative multipliers are transferred) and reports them side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from train import config as config_lib
from train import local_search as search_lib
from train import multipliers as multipliers_lib
from train import search_report as report
from train.config import TrainConfig
from train.run_cache import (DIVERGED, Launcher, RunCache, RunFailed, RunInterrupted,
                             subprocess_launcher)

# Exit statuses, as python -m train's: 1 a run failed, 2 bad arguments, 3 stopped by a
# signal (rerun to resume), 130 Ctrl-C.
EXIT_RUN_FAILED, EXIT_SIGNAL, EXIT_INTERRUPTED = 1, 3, 130
# Settings the search itself decides (not allowed in --set).
_CONTROLLED = frozenset({"method", "multipliers", "out_dir", "preset"})


# ------------------------------------------------------------------ points <-> configs


def paper_table(preset: str) -> tuple[dict[str, tuple[float, float]], float]:
    """The paper's ``(multipliers, final_fraction)`` for the preset's family, as
    ``python -m train --method relative`` uses it (``train.optimizers.relative_table``)."""
    from train import optimizers  # pylint: disable=import-outside-toplevel  (JAX)

    return optimizers.relative_table(config_lib.from_preset(preset, method="relative"))


def start_point(table: dict, lr: float, weight_decay: float | None = None) -> dict[str, float]:
    """``{"lr", ["weight_decay",] "<module>.start", "<module>.end", ...}``."""
    point = {"lr": lr}
    if weight_decay is not None:
        point["weight_decay"] = weight_decay
    for module, (start, end) in table.items():
        point[f"{module}.start"], point[f"{module}.end"] = start, end
    return {k: search_lib.rounded(float(v)) for k, v in point.items()}


def modules_of(point: dict[str, float]) -> list[str]:
    return [k[: -len(".start")] for k in point if k.endswith(".start")]


def config_at(base: TrainConfig, point: dict[str, float], final_fraction: float) -> TrainConfig:
    """The ``relative`` run of a search point."""
    table = {m: [point[f"{m}.start"], point[f"{m}.end"]] for m in modules_of(point)}
    changes: dict[str, Any] = dict(
        method="relative", lr=point["lr"],
        multipliers={"multipliers": table, "final_fraction": final_fraction})
    if "weight_decay" in point:
        changes["weight_decay"] = point["weight_decay"]
    return base.replace(**changes)


class CachedObjective:
    """``config -> final validation loss`` through a :class:`train.run_cache.RunCache`:
    a done run is read back, any other trained (an interrupted one resumes from its
    checkpoint); a diverged run is ``math.inf``.

    Attributes:
      cache: The run cache.
      ran: Runs trained by this object (this invocation).
      read_back: Runs answered from the cache.
    """

    def __init__(self, cache: RunCache):
        self.cache = cache
        self.ran = self.read_back = 0

    def __call__(self, cfg: TrainConfig) -> float:
        record = self.cache.lookup(cfg)
        if record is None:
            record = self.cache.run(cfg)
            self.ran += 1
        else:
            self.read_back += 1
        if record.status == DIVERGED:
            return math.inf
        if record.final_loss is None:
            raise RunFailed(f"{record.directory.name}: finished without an evaluation at "
                            f"its last step ({record.config['steps']})")
        return record.final_loss


# ---------------------------------------------------------------------------- the CLI


def _setting(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def base_config(preset: str, settings: list[tuple[str, Any]], **fixed: Any) -> TrainConfig:
    """The preset's run with ``--set`` settings (model fields go to model_overrides).

    Raises:
      ValueError: An unknown or search-controlled setting, or an invalid config.
    """
    fields = {f for f in TrainConfig.__dataclass_fields__}
    values: dict[str, Any] = {"progress": False, **fixed}
    model: dict[str, Any] = {}
    for key, value in settings:
        if key in _CONTROLLED:
            raise ValueError(f"--set {key}: the search decides {key}")
        if key in config_lib.MODEL_OVERRIDE_FIELDS:
            model[key] = value
        elif key in fields:
            values[key] = value
        else:
            raise ValueError(f"--set {key}: not a TrainConfig or model field (see "
                             "python -m train --help)")
    if model:
        values["model_overrides"] = model
    return config_lib.from_preset(preset, **values)


class _Parser(argparse.ArgumentParser):
    """Argument errors as ONE line, exit status 2 (as python -m train)."""

    def error(self, message: str):
        self.exit(2, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m train.search", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="RLRS local search (Algorithm 2) of the relative-LR multipliers on a "
                    "small model; --transfer-to tries the result on a larger one.",
        epilog="Runs are cached per config in OUT/runs: rerun the same command to resume. "
               "Example: python -m train.search --preset moe-tiny --steps 150 --budget 30 "
               "--coordinates lr,embed.start,expert.start,expert.end --transfer-to moe-tiny "
               "--transfer-set hidden=256. Exit status: 0 done, 1 a run failed (its log "
               "is named), 2 bad arguments, 3 a run was stopped by a signal (rerun to "
               "resume), 130 Ctrl-C.")
    p.add_argument("--preset", default="moe-tiny", choices=list(config_lib.PRESETS),
                   help="model searched on (default: moe-tiny; dense presets work too)")
    p.add_argument("--optimizer", default="adamw", choices=config_lib.OPTIMIZERS)
    p.add_argument("--start", default="paper", metavar="paper|uniform|FILE",
                   help="start table: the paper's for the preset's family (default), all "
                        "multipliers 1 on the same modules, or a --multipliers file (its "
                        "lr too)")
    p.add_argument("--coordinates", default=None,
                   help="comma-separated coordinates to search, in order (default: lr, "
                        "then MODULE.start, MODULE.end for every module of the table)")
    p.add_argument("--search-weight-decay", action="store_true",
                   help="also search the weight decay (a coordinate after lr)")
    p.add_argument("--budget", type=int, default=60,
                   help="at most this many distinct runs, the start included (default 60)")
    p.add_argument("--max-passes", type=int, default=None, help="stop after N passes")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: preset's)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run (default 0)")
    p.add_argument("--data", default=None, help="data source (default: the preset's)")
    p.add_argument("--set", type=_setting, action="append", default=[], metavar="KEY=VALUE",
                   help="any other TrainConfig or model field for the search runs, e.g. "
                        "--set hidden=64 --set eval_batches=8 (repeatable)")
    p.add_argument("--out", default=None, help="output folder (default: runs/search/PRESET)")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the uniform reference run on the search model")
    p.add_argument("--transfer-to", default=None, choices=list(config_lib.PRESETS),
                   metavar="PRESET", help="then train uniform, the paper's table and the "
                                          "found one on PRESET and compare")
    p.add_argument("--transfer-steps", type=int, default=None,
                   help="steps of the transfer runs (default: the target preset's)")
    p.add_argument("--transfer-lr", type=float, default=None,
                   help="base LR of the transfer runs (default: the target preset's)")
    p.add_argument("--transfer-seeds", type=int, default=1,
                   help="seeds per transferred table (default 1)")
    p.add_argument("--transfer-set", type=_setting, action="append", default=[],
                   metavar="KEY=VALUE", help="settings of the transfer runs, as --set")
    return p


def _start(args, base: TrainConfig) -> tuple[TrainConfig, dict[str, float], float]:
    """``(base, start point, final fraction)``: the start table of ``--start`` (a file's
    ``lr`` and ``weight_decay`` become the base run's)."""
    table, fraction = paper_table(args.preset)
    if args.start == "uniform":
        table = {m: (1.0, 1.0) for m in table}
    elif args.start != "paper":
        loaded, settings = multipliers_lib.load_multipliers_file(args.start, "--start")
        table = {k: tuple(v) for k, v in loaded["multipliers"].items()}
        fraction = loaded["final_fraction"]
        base = base.replace(**settings)
    wd = base.weight_decay if args.search_weight_decay else None
    return base, start_point(table, base.lr, wd), fraction


def _given(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def main(argv: list[str] | None = None, launcher: Launcher = subprocess_launcher) -> int:
    """Runs the search CLI; returns the exit status.

    Args:
      argv: The arguments (default: ``sys.argv[1:]``).
      launcher: How the run cache trains a run (tests pass a fake one; see
        :class:`train.run_cache.RunCache`).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.out or f"runs/search/{args.preset}")
    # One XLA compilation cache for every run: the search runs all share one shape.
    shared = _given(seed=args.seed, optimizer=args.optimizer, data=args.data,
                    compilation_cache_dir=str(out / "runs" / "xla_cache"))
    try:
        for name in ("budget", "transfer_seeds"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got "
                                 f"{getattr(args, name)}")
        base = base_config(args.preset, args.set, **shared, **_given(steps=args.steps))
        if not any(k == "log_every" for k, _ in args.set):
            base = base.replace(log_every=max(base.steps // 4, 1))
        base, point, fraction = _start(args, base)
        coords = ([c.strip() for c in args.coordinates.split(",") if c.strip()]
                  if args.coordinates else list(point))
        unknown = [c for c in coords if c not in point]
        if unknown:
            raise ValueError(f"--coordinates: unknown {', '.join(unknown)}; this search has "
                             f"{', '.join(point)}")
        config_at(base, point, fraction)  # validates the start table
        transfer_base = None
        if args.transfer_to:
            if (config_lib.model_family(args.preset) == "moe") != (
                    config_lib.model_family(args.transfer_to) == "moe"):
                raise ValueError(
                    f"--transfer-to {args.transfer_to}: the table found on {args.preset} "
                    f"names the modules {', '.join(modules_of(point))}; transfer between "
                    "MoE presets or between dense ones (LLaMa, GPT-2)")
            transfer_base = base_config(args.transfer_to, args.transfer_set, **shared,
                                        **_given(steps=args.transfer_steps,
                                                 lr=args.transfer_lr))
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    command = "python -m train.search " + shlex.join(sys.argv[1:] if argv is None else argv)
    objective = CachedObjective(RunCache(out / "runs", launcher))
    try:
        return _search(args, command, out, objective, base, point, fraction, coords,
                       transfer_base)
    except (KeyboardInterrupt, RunInterrupted) as e:
        print(f"interrupted ({' '.join(str(e).split()) or 'Ctrl-C'}): {objective.ran} run(s) "
              f"trained in this invocation; rerun the same command to resume (finished runs "
              f"are kept in {out / 'runs'})", file=sys.stderr)
        return EXIT_SIGNAL if isinstance(e, RunInterrupted) else EXIT_INTERRUPTED
    except RunFailed as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_RUN_FAILED


def _search(args, command, out, objective, base, point, fraction, coords, transfer_base) -> int:
    started = time.perf_counter()
    budget = args.budget

    def progress(trial: search_lib.Trial, best_loss: float, best: dict) -> None:
        what = ("start" if not trial.coordinate else
                f"pass {trial.pass_}, {trial.coordinate} x"
                f"{search_lib.FACTOR_NAMES.get(trial.factor, trial.factor)} = "
                f"{report.fmt_value(trial.point[trial.coordinate])}")
        print(f"== search run {trial.run}/{budget} ({what}): val loss "
              f"{report.fmt_loss(trial.loss)}; best so far {report.fmt_loss(best_loss)} "
              f"({', '.join(f'{k}={report.fmt_value(v)}' for k, v in best.items())})",
              flush=True)

    def before(run: int, pass_: int, coordinate: str, factor: float, candidate: dict) -> None:
        what = "start" if not coordinate else f"pass {pass_}, {coordinate} = " \
            f"{report.fmt_value(candidate[coordinate])}"
        print(f"== search run {run}/{budget}: {what}", flush=True)

    result = search_lib.local_search(
        point, lambda p: objective(config_at(base, p, fraction)), coordinates=coords,
        budget=budget, max_passes=args.max_passes, on_trial=progress, before_trial=before)
    modules = modules_of(point)
    out.mkdir(parents=True, exist_ok=True)
    found = report.multipliers_file(result.best, modules, fraction)
    report.write_json(out / "multipliers.json", found)
    report.write_json(out / "search.json", {"command": command, **report.result_json(result)})
    report.plot_path(result, out / "search_loss.png")

    references = []
    if not args.no_reference:
        uniform = objective(base.replace(method="uniform", lr=result.start["lr"]))
        references.append((f"uniform, lr {report.fmt_value(result.start['lr'])}", [uniform]))
    references += [(f"relative, start table (lr {report.fmt_value(result.start['lr'])})",
                    [result.start_loss]),
                   (f"relative, found table (lr {report.fmt_value(result.best['lr'])})",
                    [result.best_loss])]
    transfer = _transfer(args, objective, transfer_base, found) if transfer_base else None
    text = _markdown(args, command, base, result, modules, references, transfer, objective,
                     time.perf_counter() - started)
    (out / "search.md").write_text(text, encoding="utf-8")
    print(f"search {result.stopped} after {result.evaluations} runs; best val loss "
          f"{report.fmt_loss(result.best_loss)} (start {report.fmt_loss(result.start_loss)}). "
          f"Wrote {out / 'search.md'}, {out / 'multipliers.json'}, {out / 'search_loss.png'}")
    return 0


def _transfer(args, objective: CachedObjective, target: TrainConfig, found: dict) -> list:
    table = {"multipliers": found["multipliers"], "final_fraction": found["final_fraction"]}
    rows = []
    for name, changes in (("uniform", dict(method="uniform")),
                          ("relative, paper table", dict(method="relative")),
                          ("relative, found table", dict(method="relative",
                                                         multipliers=table))):
        losses = []
        for seed in range(args.seed, args.seed + args.transfer_seeds):
            print(f"== transfer to {args.transfer_to}: {name}, seed {seed}", flush=True)
            losses.append(objective(target.replace(seed=seed, **changes)))
        rows.append((name, losses))
    return target, rows


def _markdown(args, command, base, result, modules, references, transfer, objective,
              seconds) -> str:
    shape = ", ".join(f"{k}={v}" for k, v in base.model_overrides.items()) or "as the preset"
    lines = [
        f"# Local search on `{args.preset}`", "",
        f"Produced by `{command}`.", "",
        f"Search runs: `{args.preset}` (model: {shape}), `relative` with {base.optimizer}, "
        f"{base.steps} steps of {base.batch_size} x {base.seq_len} tokens, seed {base.seed}; "
        "objective: final validation loss"
        + (f" (first {base.eval_batches} batches)" if base.eval_batches else
           " (whole split)") + ".",
        f"Stopped: {result.stopped} after {result.evaluations} distinct runs (budget "
        f"{args.budget}); this invocation trained {objective.ran} and read "
        f"{objective.read_back} back from the cache in {seconds / 60:.1f} min.", "",
        "## Result", "", report.table_markdown(result.start, result.best, modules), "",
        report.transfer_table(references), "",
        "One seed per point: differences of a few 0.01 nats are within seed noise on "
        "models this small; a found table is the best of the points tried, not a "
        "measured improvement.", "",
        "## Path", "", report.path_table(result), "", "![loss per step](search_loss.png)", "",
    ]
    if transfer:
        target, rows = transfer
        shape = (", ".join(f"{k}={v}" for k, v in target.model_overrides.items())
                 or "as the preset")
        lines += [f"## Transfer to `{args.transfer_to}`", "",
                  f"Model: {shape}; {target.steps} steps of {target.batch_size} x "
                  f"{target.seq_len} tokens; base LR {target.lr:g} for all three (RLRS "
                  "Algorithm 1: the base LR is the target's own, only the relative "
                  f"multipliers transfer); {args.transfer_seeds} seed(s) each.", "",
                  report.transfer_table(rows), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
