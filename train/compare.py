"""Compare methods: ``python -m train.compare --preset tiny --out runs/compare``.

Runs every (optimizer, method, seed) one after the other in this process (the data
is read once per seed and the evaluation step compiles once), then writes

* ``results.md``: a markdown table (also printed): final validation loss mean ± std
  over seeds, perplexity, bits per byte, training throughput;
* ``results.json``: the raw results of every run;
* ``val_loss.png``: validation and training loss curves per method;
* ``alpha_hill_layers.png``: per-matrix alpha and LR factor of the first alpha_hill run.

Each run keeps its own metrics and checkpoints under ``out/<method>_<optimizer>_seed<k>``.
The defaults (tiny preset, five methods, AdamW, one seed, 300 steps) take about six
minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from train import config as config_lib

DEFAULT_METHODS = ("uniform", "alpha_hill", "tempbalance", "relative", "init_grad")
# LARS and LAMB normalise each layer's step by its weight norm: the relative change per
# step is ~lr, much smaller than AdamW's at the same lr when weights are small (std 0.02
# here), so they get their own peak LR, the best of {1e-2, 3e-2, 1e-1} on the tiny preset
# (300 steps; AdamW's best of {1e-3, 3e-3, 1e-2} was 3e-3, the preset's lr).
DEFAULT_METHOD_LR = {"lars": 1e-2, "lamb": 3e-2}


def _parse_list(text: str, choices: tuple[str, ...], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in choices]
    if unknown or not items:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {unknown or text!r}; choose from: {', '.join(choices)}")
    return items


def _parse_method_lr(text: str) -> dict[str, float]:
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        method, _, value = item.partition("=")
        if method not in config_lib.METHODS or not value:
            raise argparse.ArgumentTypeError(f"expected METHOD=LR pairs, got {item!r}")
        out[method] = float(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m train.compare`` argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m train.compare",
        description="Train several layer-wise LR methods on the same data and compare them.")
    p.add_argument("--preset", default="tiny", choices=list(config_lib.PRESETS),
                   help="model size and run settings (default: tiny)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   type=lambda s: _parse_list(s, config_lib.METHODS, "method"),
                   help=f"comma-separated, from {', '.join(config_lib.METHODS)} "
                        f"(default: {','.join(DEFAULT_METHODS)})")
    p.add_argument("--optimizers", default="adamw",
                   type=lambda s: _parse_list(s, config_lib.OPTIMIZERS, "optimizer"),
                   help="comma-separated base optimizers: adamw,muon (default: adamw)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per run (default: 1)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds are first-seed, first-seed + 1, ... (default: 0)")
    p.add_argument("--out", default="runs/compare", help="output directory")
    p.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    p.add_argument("--lr", type=float, default=None, help="override the preset's lr")
    p.add_argument("--method-lr", type=_parse_method_lr, default={},
                   help="per-method peak LR, e.g. lamb=0.03,lars=0.01 (defaults: "
                        + ",".join(f"{k}={v}" for k, v in DEFAULT_METHOD_LR.items()) + ")")
    p.add_argument("--eval-every", type=int, default=None,
                   help="override the preset's eval interval")
    p.add_argument("--data", default=None, help="data source (default: the preset's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run_configs(args: argparse.Namespace) -> tuple[list[config_lib.TrainConfig], list[str]]:
    """The configs to run, and notes on skipped combinations."""
    overrides = {k: v for k, v in (("steps", args.steps), ("eval_every", args.eval_every),
                                   ("data", args.data)) if v is not None}
    method_lr = {**DEFAULT_METHOD_LR, **args.method_lr}
    configs, notes = [], []
    for optimizer in args.optimizers:
        for method in args.methods:
            if method in config_lib.ADAMW_ONLY_METHODS and optimizer != "adamw":
                why = ("is its own optimizer (run once, under adamw)"
                       if method in config_lib.STANDALONE_METHODS else "is AdamW-only")
                notes.append(f"{method} with {optimizer} skipped: {method} {why}")
                continue
            lr = method_lr.get(method, args.lr)
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                extra = dict(overrides, lr=lr) if lr is not None else overrides
                configs.append(config_lib.from_preset(
                    args.preset, method=method, optimizer=optimizer, seed=seed,
                    out_dir=str(Path(args.out) / f"{method}_{optimizer}_seed{seed}"),
                    progress=not args.no_progress, **extra))
    return configs, notes


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def results_table(groups: dict[str, list[dict]]) -> str:
    """Markdown table: one row per (method, optimizer), statistics over seeds."""
    lines = ["| method | optimizer | peak lr | val loss (mean ± std) | perplexity | bits/byte "
             "| tokens/s | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for results in groups.values():
        cfg = results[0]["config"]
        done = [r for r in results if r.get("final")]
        failed = [r for r in results if not r.get("final")]
        if done:
            mean, std = _mean_std([r["final"]["val_loss"] for r in done])
            bpbs = [r["final"]["val_bpb"] for r in done if r["final"]["val_bpb"] is not None]
            tps = [r["tokens_per_sec"] for r in done if r["tokens_per_sec"]]
            cells = [f"{mean:.4f} ± {std:.4f}", f"{math.exp(mean):.2f}",
                     f"{sum(bpbs) / len(bpbs):.4f}" if bpbs else "n/a",
                     f"{sum(tps) / len(tps):,.0f}" if tps else "n/a"]
        else:
            cells = ["diverged", "", "", ""]
        seeds = f"{len(done)}" + (f" ({len(failed)} diverged)" if failed else "")
        lines.append(f"| {cfg['method']} | {cfg['optimizer']} | {cfg['lr']:g} | "
                     + " | ".join(cells) + f" | {seeds} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Runs the comparison; returns the exit status (1 if any run diverged)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    if args.first_seed < 0:
        parser.error("--first-seed must be >= 0")
    try:
        configs, notes = run_configs(args)
    except ValueError as e:
        parser.error(str(e))

    # JAX and the model are imported only once the arguments are known to be good.
    from train import loop, plots  # pylint: disable=import-outside-toplevel
    from train import data as data_lib  # pylint: disable=import-outside-toplevel

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    datasets: dict = {}
    groups: dict[str, list[dict]] = {}
    for i, cfg in enumerate(configs, start=1):
        print(f"[{i}/{len(configs)}] {cfg.method} / {cfg.optimizer} / seed {cfg.seed} "
              f"(lr {cfg.lr:g}, {cfg.steps} steps)", flush=True)
        dcfg = loop.data_config(cfg)
        if dcfg not in datasets:
            datasets[dcfg] = data_lib.build_data(dcfg)
        try:
            result = loop.train(cfg, overwrite=True, data=datasets[dcfg])
        except loop.DivergedError as e:
            print(f"  {e}", flush=True)
            result = {"config": cfg.to_dict(), "final": None, "evals": [], "train": [],
                      "diverged_at": e.step, "tokens_per_sec": None}
        groups.setdefault(f"{cfg.method}/{cfg.optimizer}", []).append(result)
    elapsed = time.perf_counter() - start

    first = next(iter(datasets.values()))
    table = results_table(groups)
    header = (f"# Comparison: preset {args.preset}, {configs[0].steps} steps, "
              f"batch {configs[0].batch_size} x {configs[0].seq_len} tokens, "
              f"{args.seeds} seed(s)\n\n{first.summary()}\n\n")
    footer = "".join(f"\n- {n}" for n in notes)
    footer += f"\n\nTotal wall time: {elapsed / 60:.1f} min.\n"
    (out / "results.md").write_text(header + table + "\n" + footer, encoding="utf-8")
    (out / "results.json").write_text(json.dumps(groups, indent=1), encoding="utf-8")
    print("\n" + table + footer)

    plots.plot_losses(groups, out / "val_loss.png")
    alpha_runs = [r for k, rs in groups.items() if k.startswith("alpha_hill/") for r in rs
                  if r.get("alphas")]
    if alpha_runs:
        plots.plot_alpha_layers(alpha_runs[0], out / "alpha_hill_layers.png")
    print(f"Wrote {out / 'results.md'}, {out / 'val_loss.png'}"
          + (f", {out / 'alpha_hill_layers.png'}" if alpha_runs else ""))
    return 1 if any(not r.get("final") for rs in groups.values() for r in rs) else 0


if __name__ == "__main__":
    sys.exit(main())
