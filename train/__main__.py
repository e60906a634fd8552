"""Command line: ``python -m train --preset tiny --method alpha_hill --out runs/x``.

A preset fixes the model size and run settings that suit it; every other flag
overrides one setting. Argument errors exit with status 2, a diverged run (NaN/Inf
loss) with status 1 after keeping its last good checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from train import config as config_lib

# (flag, TrainConfig field, type, help). Only flags given on the command line override
# the preset, so each default shown in --help is the tiny preset's value.
_FLAGS: tuple[tuple[str, str, Any, str], ...] = (
    ("--lr", "lr", float, "peak learning rate of the base schedule"),
    ("--steps", "steps", int, "total optimizer steps"),
    ("--batch-size", "batch_size", int, "training sequences per step"),
    ("--seq-len", "seq_len", int, "tokens per sequence"),
    ("--seed", "seed", int, "model-init and data-shuffle seed"),
    ("--warmup-fraction", "warmup_fraction", float, "linear warmup, fraction of steps"),
    ("--final-lr-fraction", "final_lr_fraction", float, "cosine ends at this fraction of lr"),
    ("--weight-decay", "weight_decay", float, "decoupled weight decay"),
    ("--clip", "clip", float, "global gradient-norm clip (0: off)"),
    ("--b1", "b1", float, "Adam beta1 / momentum"),
    ("--b2", "b2", float, "Adam beta2"),
    ("--data", "data", str, "'default' (offline corpus), a corpus prepared by python -m "
                            "train.prepare, or a .txt/.jsonl/.parquet/.npy file or a "
                            "directory of them"),
    ("--tokenizer", "tokenizer", str, "byte or sentencepiece (trained on the training split)"),
    ("--tokenizer-model", "tokenizer_model", str, "a pretrained SentencePiece .model or "
                                                  "Hugging Face tokenizer.json"),
    ("--vocab-size", "vocab_size", int, "sentencepiece vocabulary size; with "
                                        "--tokenizer-model or a prepared corpus, the model's "
                                        "vocabulary (>= the tokenizer's: padding)"),
    ("--val-fraction", "val_fraction", float, "fraction of documents for validation (a "
                                              "prepared corpus keeps its own split)"),
    ("--eval-every", "eval_every", int, "evaluate every N steps (and at the end)"),
    ("--eval-batches", "eval_batches", int, "validation batches per eval (default: all)"),
    ("--val-batch-size", "val_batch_size", int, "validation batch size"),
    ("--log-every", "log_every", int, "log the training loss every N steps"),
    ("--checkpoint-every", "checkpoint_every", int, "checkpoint every N steps (0: end only)"),
    ("--keep-checkpoints", "keep_checkpoints", int, "checkpoints kept on disk"),
    ("--s-min", "s_min", float, "alpha_hill: smallest LR factor"),
    ("--s-max", "s_max", float, "alpha_hill: largest LR factor (embedding, head; "
                                "upper_bound's multiplier)"),
    ("--interval", "interval", int, "alpha_hill/tempbalance: steps between recomputes"),
    ("--ramp-steps", "ramp_steps", int, "alpha_hill: soft-switch length"),
    ("--active-fraction", "active_fraction", float, "alpha_hill: recompute during this "
                                                    "fraction of the run"),
    ("--min-eigenvalues", "min_eigenvalues", int, "alpha methods: smaller matrices keep 1"),
    ("--init-grad-batches", "init_grad_batches", int, "init_grad: minibatches measured"),
    ("--mesh", "mesh", str, "train on a device mesh, e.g. 'data=2,fsdp=4': comma-separated "
                            "sizes of the axes data (replicas), fsdp (params and optimizer "
                            "state split along the model width, batch split too) and tensor "
                            "(heads/MLP/vocab split), multiplying to the number of devices "
                            "of all processes; --batch-size is per process and the global "
                            "batch must divide over data x fsdp; may change on --resume"),
)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m train`` argument parser."""
    tiny = config_lib.from_preset("tiny")
    parser = argparse.ArgumentParser(
        prog="python -m train",
        usage="%(prog)s [--preset P] [--method M] [--optimizer O] [--out DIR] [--resume] "
              "[settings ...]",
        description="Train a LLaMa language model with a layer-wise learning-rate method.",
        epilog="Example: python -m train --preset tiny --method alpha_hill --steps 300 "
               "--out runs/alpha_hill\n",
    )
    parser.add_argument("--preset", default="tiny", choices=list(config_lib.PRESETS),
                        help="model size and matching run settings (default: tiny)")
    parser.add_argument("--method", default="uniform", choices=config_lib.METHODS,
                        help="layer-wise LR method (default: uniform)")
    parser.add_argument("--optimizer", default="adamw", choices=config_lib.OPTIMIZERS,
                        help="base optimizer (default: adamw; lars and lamb are their own "
                             "optimizer and need the default)")
    parser.add_argument("--out", default=None,
                        help="output directory (default: runs/<preset>_<method>_<optimizer>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in --out")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing run in --out")
    parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                        help="stop (with a checkpoint) after N steps; resume later")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--distributed", action="store_true",
                        help="multi-process job: call jax.distributed.initialize(), which "
                             "detects SLURM/Open MPI/Kubernetes/Cloud TPU (also done, without "
                             "this flag, when JAX_COORDINATOR_ADDRESS is set, with "
                             "JAX_NUM_PROCESSES and JAX_PROCESS_ID); each process reads its "
                             "own data shard; needs --mesh")
    group = parser.add_argument_group(
        "settings", "each overrides the preset's value (shown for --preset tiny)")
    for flag, field, kind, help_text in _FLAGS:
        shown = getattr(tiny, field)
        group.add_argument(flag, type=kind, default=None, dest=field, metavar=field.upper(),
                           help=f"{help_text} (tiny: {shown if shown != '' else 'unset'})")
    return parser


def config_from_args(args: argparse.Namespace) -> config_lib.TrainConfig:
    """The ``TrainConfig`` described by parsed arguments (preset + overrides)."""
    overrides = {field: getattr(args, field) for _, field, _, _ in _FLAGS
                 if getattr(args, field) is not None}
    out = args.out or f"runs/{args.preset}_{args.method}_{args.optimizer}"
    return config_lib.from_preset(args.preset, method=args.method, optimizer=args.optimizer,
                                  out_dir=out, progress=not args.no_progress, **overrides)


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    if cfg.data != "default" and not Path(cfg.data).exists():
        parser.error(f"--data {cfg.data!r} does not exist")

    # pylint: disable=import-outside-toplevel  (JAX is slow to import)
    from train import loop
    from train import mesh as mesh_lib

    try:
        # Before anything asks JAX for its devices (the data shard does).
        mesh_lib.initialize_distributed(force=args.distributed)
    except (RuntimeError, ValueError) as e:
        print(f"error: jax.distributed.initialize() failed: {e}", file=sys.stderr)
        return 2
    try:
        results = loop.train(cfg, resume=args.resume, overwrite=args.overwrite,
                             stop_after=args.stop_after)
    except loop.DivergedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    final = results["final"]
    if final is not None:
        bpb = f", bits/byte {final['val_bpb']:.4f}" if final["val_bpb"] is not None else ""
        print(f"step {results['step']}: val loss {final['val_loss']:.4f}, "
              f"perplexity {final['val_ppl']:.2f}{bpb}; metrics in {results['out_dir']}")
    else:
        print(f"stopped at step {results['step']} (checkpoint saved in {results['out_dir']}); "
              "continue with --resume")
    return 0


if __name__ == "__main__":
    sys.exit(main())
