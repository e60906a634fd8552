"""Command line: ``python -m train --preset tiny --method alpha_hill --out runs/x``.

A preset fixes the model size and run settings that suit it; ``--config FILE`` (JSON or
YAML) overrides the preset, and every flag overrides both. Exit statuses: see
:data:`EXIT_CODES` (printed by ``--help``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from train import config as config_lib
from train import multipliers as multipliers_lib

EXIT_CODES = """exit status:
  0    finished (or stopped at --stop-after, with a checkpoint)
  1    diverged: NaN/Inf loss or parameters; the last good checkpoint is kept
       (Python also exits with 1 on an unexpected crash, with a traceback)
  2    bad input, one line on stderr: a flag, --config file, --out, data, a resume
       under a different config, no intact checkpoint to resume from
  3    stopped by SIGTERM or SIGINT after saving a checkpoint; continue with --resume
  130  interrupted before training started, or a second Ctrl-C while saving
       (nothing saved by this invocation)"""
EXIT_DIVERGED, EXIT_USER_ERROR, EXIT_SIGNAL, EXIT_INTERRUPTED = 1, 2, 3, 130


def _optional(kind):
    """``kind``, or ``None`` for 'none' (fields whose default is 'unset')."""
    def parse(text: str):
        return None if text.strip().lower() == "none" else kind(text)
    parse.__name__ = kind.__name__
    return parse


def _factors_file(path: str) -> dict:
    """``--module-factors FILE``: a JSON object module type -> LR factor."""
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise argparse.ArgumentTypeError(f"{path!r} is not a readable JSON file ({e})") from None
    if not isinstance(values, dict):
        raise argparse.ArgumentTypeError(
            f"{path!r} must hold a JSON object module type -> factor, e.g. {{\"mlp\": 2.0}}")
    return values


_factors_file.__name__ = "module factors file"

# (flag, TrainConfig field, type, help). Only flags given on the command line override
# the preset (and --config), so each default shown in --help is the tiny preset's value.
_FLAGS: tuple[tuple[str, str, Any, str], ...] = (
    ("--lr", "lr", float, "peak learning rate of the base schedule"),
    ("--steps", "steps", int, "total optimizer updates"),
    ("--batch-size", "batch_size", int, "training sequences per micro-batch (per process)"),
    ("--accumulate", "accumulate", int, "micro-batches averaged per update (gradient "
                                        "accumulation, optax.MultiSteps)"),
    ("--seq-len", "seq_len", int, "tokens per sequence"),
    ("--dtype", "dtype", str, "computation dtype, float32 or bfloat16 (params and "
                              "optimizer state stay float32)"),
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
    ("--tokenizer-model", "tokenizer_model", _optional(str), "a pretrained SentencePiece .model "
                                                             "or Hugging Face tokenizer.json"),
    ("--vocab-size", "vocab_size", _optional(int), "sentencepiece vocabulary size; with "
                                                   "--tokenizer-model or a prepared corpus, the "
                                                   "model's vocabulary (>= the tokenizer's: "
                                                   "padding)"),
    ("--val-fraction", "val_fraction", float, "fraction of documents for validation (a "
                                              "prepared corpus keeps its own split)"),
    ("--eval-every", "eval_every", int, "evaluate every N steps (and at the end)"),
    ("--eval-batches", "eval_batches", _optional(int),
     "validation batches per eval ('none': all)"),
    ("--val-batch-size", "val_batch_size", _optional(int),
     "validation batch size ('none': --batch-size)"),
    ("--log-every", "log_every", int, "log the training loss every N steps"),
    ("--checkpoint-every", "checkpoint_every", int, "checkpoint every N steps (0: end only)"),
    ("--keep-checkpoints", "keep_checkpoints", int, "checkpoints kept on disk"),
    ("--s-min", "s_min", float, "alpha_hill: smallest LR factor"),
    ("--s-max", "s_max", float, "alpha_hill: largest LR factor (embedding, head; "
                                "upper_bound's multiplier)"),
    ("--interval", "interval", int, "alpha_hill/tempbalance: steps between recomputes"),
    ("--ramp-steps", "ramp_steps", _optional(int), "alpha_hill: soft-switch length "
                                                   "('none': interval // 2)"),
    ("--active-fraction", "active_fraction", float, "alpha_hill: recompute during this "
                                                    "fraction of the run"),
    ("--min-eigenvalues", "min_eigenvalues", int, "alpha methods: smaller matrices keep 1"),
    ("--spread", "spread", int, "alpha methods: spread each recompute over N steps (flat "
                                "step time; 1: all at once)"),
    ("--init-grad-batches", "init_grad_batches", int, "init_grad: minibatches measured"),
    ("--init-grad-train-init", "init_grad_train_init", str,
     "init_grad: train from 'model' (the model's own init, as every other method: the "
     "paper's comparison; the default) or 'paper' (the fan-in initialisation the factors "
     "are measured at, llr_optax.fan_in_init(rule='paper'))"),
    ("--mesh", "mesh", str, "train on a device mesh, e.g. 'data=2,fsdp=4': comma-separated "
                            "sizes of the axes data (replicas), fsdp (params and optimizer "
                            "state split along the model width, batch split too) and tensor "
                            "(heads/MLP/vocab split), multiplying to the number of devices "
                            "of all processes; --batch-size is per process and the global "
                            "batch must divide over data x fsdp; may change on --resume"),
    ("--profile", "profile", str, "START:N: a jax.profiler trace of updates START+1 .. "
                                  "START+N into OUT/profile"),
    ("--compilation-cache-dir", "compilation_cache_dir", str,
     "persistent XLA compilation cache directory (a rerun of the same shapes skips "
     "compiling)"),
    ("--peak-tflops", "peak_tflops", _optional(float),
     "peak dense TFLOP/s of one device, for the MFU (default: known GPUs/TPUs, bf16 data "
     "sheet figures; none on CPU)"),
    ("--schedule", "schedule", str, "base LR schedule: cosine (warmup, cosine to "
                                    "final-lr-fraction x lr) or wsd (warmup, stable, then "
                                    "linear decay to final-lr-fraction x lr)"),
    ("--decay-fraction", "decay_fraction", float, "wsd: the decay takes this fraction of "
                                                  "the steps"),
    ("--module-factors", "module_factors", _factors_file,
     "module_constant: JSON file of constant LR factors per module type or group, e.g. "
     "{\"mlp\": 2.0, \"embed\": 5.0} (others keep 1)"),
)
# Model shape overrides (model_overrides): (flag, model config field, type, help).
_MODEL_FLAGS: tuple[tuple[str, str, Any, str], ...] = (
    ("--num-layers", "num_layers", int, "decoder blocks"),
    ("--hidden", "hidden", int, "model width"),
    ("--intermediate", "intermediate", int, "MLP hidden width (MoE: of each expert)"),
    ("--num-heads", "num_heads", int, "attention (query) heads"),
    ("--num-kv-heads", "num_kv_heads", int, "key/value heads (grouped-query attention; "
                                            "must divide --num-heads; LLaMa, MoE)"),
    ("--rope-theta", "rope_theta", float, "RoPE base frequency (LLaMa, MoE)"),
    ("--norm-eps", "norm_eps", float, "RMSNorm (GPT-2: LayerNorm) epsilon"),
    ("--num-experts", "num_experts", int, "MoE: experts per layer"),
    ("--top-k", "top_k", int, "MoE: experts each token is routed to"),
    ("--router-z-loss-weight", "router_z_loss_weight", float,
     "MoE: weight of the router z-loss in the training loss"),
    ("--load-balance-loss-weight", "load_balance_loss_weight", float,
     "MoE: weight of the load-balancing loss in the training loss"),
)
# Boolean settings (--x / --no-x).
_SWITCHES: tuple[tuple[str, str, str], ...] = (
    ("--fan-in-start", "fan_in_start",
     "every method but init_grad: train from the fan-in initialisation that "
     "--init-grad-train-init paper starts init_grad from (the same weights for the same "
     "seed), not the model's own"),
)
# Boolean model overrides (--x / --no-x).
_MODEL_SWITCHES: tuple[tuple[str, str, str], ...] = (
    ("--tie-embeddings", "tie_embeddings", "output head reuses the token embedding"),
    ("--normalize-top-k", "normalize_top_k", "MoE: renormalise the chosen experts' "
                                             "probabilities (needs --top-k >= 2)"),
    ("--use-bias", "use_bias", "GPT-2: biases on linear maps and LayerNorms"),
)


class _Parser(argparse.ArgumentParser):
    """Argument errors as ONE line (argparse prints the usage first), status 2."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"error: {' '.join(message.split())} "
                                   f"(see {self.prog} --help)\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows the tiny preset's model shape next to each model flag. The model presets
    live with the model (importing it imports JAX), so they are read only when help is
    printed."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.dest in config_lib.MODEL_OVERRIDE_FIELDS:
            # pylint: disable=import-outside-toplevel
            from models.presets import GPT2_PRESETS, MOE_PRESETS, PRESETS
            from models.gpt2 import GPT2Config
            from models.moe import MoeConfig

            # The smallest preset of the first family that has the field.
            for name, cls, table in (("tiny", MoeConfig, PRESETS),
                                     ("moe-tiny", MoeConfig, MOE_PRESETS),
                                     ("gpt-tiny", GPT2Config, GPT2_PRESETS)):
                if action.dest in config_lib.FAMILY_OVERRIDE_FIELDS[
                        config_lib.model_family(name)]:
                    shape = {f.name: f.default for f in dataclasses.fields(cls)}
                    shape.update(table[name])
                    shape["num_kv_heads"] = shape.get("num_kv_heads") or shape["num_heads"]
                    text += f" ({name}: {shape.get(action.dest)})"
                    break
        return text


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m train`` argument parser."""
    tiny = config_lib.from_preset("tiny")
    parser = _Parser(
        prog="python -m train", formatter_class=_HelpFormatter,
        usage="%(prog)s [--preset P] [--method M] [--optimizer O] [--config FILE] [--out DIR] "
              "[--resume] [settings ...]",
        description="Train a language model (LLaMa, MoE LLaMa or GPT-2) with a layer-wise "
                    "learning-rate method.",
        epilog="Example: python -m train --preset tiny --method alpha_hill --steps 300 "
               "--out runs/alpha_hill\n\n" + EXIT_CODES,
    )
    parser.add_argument("--preset", default=None, choices=list(config_lib.PRESETS),
                        help="model and matching run settings (default: tiny): dense LLaMa "
                             "tiny ... 1b, MoE LLaMa moe-tiny, moe-8x34m, GPT-2 gpt-tiny, "
                             "gpt-nano, gpt2-124m")
    parser.add_argument("--method", default=None, choices=config_lib.METHODS,
                        help="layer-wise LR method (default: uniform)")
    parser.add_argument("--optimizer", default=None, choices=config_lib.OPTIMIZERS,
                        help="base optimizer (default: adamw; lars and lamb are their own "
                             "optimizer and need the default)")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="settings file, JSON or YAML (pyyaml): TrainConfig field names, "
                             "e.g. {\"preset\": \"20m\", \"lr\": 0.001, \"model_overrides\": "
                             "{\"num_layers\": 2}}; it overrides the preset, flags override it")
    parser.add_argument("--multipliers", default=None, metavar="FILE", dest="multipliers_file",
                        help="--method relative: a JSON table {\"multipliers\": {label or "
                             "group: [start, end]}, \"final_fraction\": f} used instead of the "
                             "paper's (MoE presets: its Table 4, final fraction 0.04; dense: "
                             "Table 5, 0.06), e.g. what python -m train.search writes; its "
                             "optional \"lr\" and \"weight_decay\" apply unless given as "
                             "flags or in --config")
    parser.add_argument("--out", default=None, dest="out_dir",
                        help="output directory (default: runs/<preset>_<method>_<optimizer>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest intact checkpoint in --out")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing run in --out")
    parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                        help="stop (with a checkpoint) after N >= 1 steps; resume later")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on a terminal (default: on; plain log lines "
                             "when output is not a terminal or with --no-progress)")
    parser.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                        help="also write TensorBoard events to OUT/tensorboard (needs "
                             "tensorboardX: pip install -e '.[tensorboard]')")
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
        group.add_argument(flag, type=kind, default=argparse.SUPPRESS, dest=field,
                           metavar=field.upper(),
                           help=f"{help_text} (tiny: {shown if shown != '' else 'unset'})")
    for flag, field, help_text in _SWITCHES:
        group.add_argument(flag, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, dest=field,
                           help=f"{help_text} (tiny: {getattr(tiny, field)})")
    model = parser.add_argument_group(
        "model", "override the preset's model shape (model_overrides; each flag shows the "
                 "value of the smallest preset of a family that has it)")
    for flag, field, kind, help_text in _MODEL_FLAGS:
        model.add_argument(flag, type=kind, default=argparse.SUPPRESS, dest=field,
                           metavar=field.upper(), help=help_text)
    for flag, field, help_text in _MODEL_SWITCHES:
        model.add_argument(flag, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, dest=field, help=help_text)
    return parser


def load_config_file(path: str) -> dict[str, Any]:
    """The settings of a ``--config`` file: a mapping of ``TrainConfig`` field names.

    The CLI's per-invocation options (``--resume``, ``--overwrite``, ``--stop-after``,
    ``--distributed``) are not settings and cannot be given in the file.

    ``.json`` files are read with the standard library; ``.yaml``/``.yml`` need the
    optional ``pyyaml``. The mapping may name a ``preset`` (its values are the base
    the file's other keys override) and ``model_overrides`` (a mapping).

    Raises:
      ValueError: Unreadable file, bad syntax, not a mapping, an unknown key, or YAML
        without pyyaml; every message is one line naming the file.
    """
    suffix = path.rsplit(".", 1)[-1].lower() if "." in path else ""
    if suffix not in ("json", "yaml", "yml"):
        raise ValueError(f"--config {path!r}: expected a .json, .yaml or .yml file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--config {path!r} cannot be read: {e}") from None
    if suffix == "json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {path!r} is not valid JSON: {e}") from None
    else:
        try:
            import yaml  # pylint: disable=import-outside-toplevel
        except ImportError:
            raise ValueError(f"--config {path!r}: reading YAML needs pyyaml "
                             "(pip install pyyaml), or give the settings as JSON") from None
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"--config {path!r} is not valid YAML: "
                             f"{' '.join(str(e).split())}") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path!r} must hold a mapping of settings, got "
                         f"{type(values).__name__}")
    known = {f.name for f in dataclasses.fields(config_lib.TrainConfig)}
    unknown = sorted(str(k) for k in values if k not in known)
    if unknown:
        raise ValueError(f"--config {path!r}: unknown setting(s) {', '.join(unknown)}; "
                         "keys are TrainConfig field names (see python -m train --help)")
    return values


def config_from_args(args: argparse.Namespace) -> config_lib.TrainConfig:
    """The ``TrainConfig`` described by parsed arguments: preset < --config < flags.

    Raises:
      ValueError: A bad --config file or an invalid resulting config.
    """
    values = load_config_file(args.config) if args.config else {}
    for name in ("preset", "method", "optimizer", "out_dir", "progress", "tensorboard"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    # Absent flags are absent from args (SUPPRESS), so "--ramp-steps none" can set None.
    given = vars(args)
    values.update({field: given[field] for _, field, _, _ in _FLAGS if field in given})
    values.update({field: given[field] for _, field, _ in _SWITCHES if field in given})
    method = values.get("method", "uniform")
    for field, its_method in config_lib.METHOD_ONLY_FIELDS.items():
        # TrainConfig accepts such a field for any method (cached runs of other methods
        # carry it), but a flag that would change nothing is a mistake worth a line.
        if field in given and method != its_method:
            raise ValueError(f"--{field.replace('_', '-')} applies to --method {its_method} "
                             f"only, not {method!r}")
    model = {field: given[field] for field in config_lib.MODEL_OVERRIDE_FIELDS
             if field in given}
    if model:
        overrides = values.get("model_overrides") or {}
        if not isinstance(overrides, dict):
            raise ValueError(f"model_overrides must be a mapping, got {overrides!r}")
        values["model_overrides"] = {**overrides, **model}
    if args.multipliers_file:
        table, settings = multipliers_lib.load_multipliers_file(args.multipliers_file)
        values["multipliers"] = table
        for name, value in settings.items():
            values.setdefault(name, value)  # flags and --config win
    preset = values.pop("preset", "tiny")
    if preset not in config_lib.PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; expected one of: "
                         f"{', '.join(config_lib.PRESETS)}")
    values.setdefault("method", "uniform")
    values.setdefault("optimizer", "adamw")
    values.setdefault("out_dir", f"runs/{preset}_{values['method']}_{values['optimizer']}")
    return config_lib.from_preset(preset, **values)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except (TypeError, ValueError) as e:
        parser.error(_one_line(e))
    if args.stop_after is not None and args.stop_after < 1:
        parser.error(f"--stop-after must be >= 1, got {args.stop_after}")
    if cfg.data != "default" and not Path(cfg.data).exists():
        parser.error(f"--data {cfg.data!r} does not exist")

    try:
        return _run(cfg, args)
    except KeyboardInterrupt:
        print("interrupted; no checkpoint was written by this invocation", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(cfg: config_lib.TrainConfig, args: argparse.Namespace) -> int:
    # pylint: disable=import-outside-toplevel  (JAX is slow to import)
    from train import loop
    from train import mesh as mesh_lib

    try:
        # Before anything asks JAX for its devices (the data shard does).
        mesh_lib.initialize_distributed(force=args.distributed)
    except (RuntimeError, ValueError) as e:
        print(f"error: jax.distributed.initialize() failed: {_one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        results = loop.train(cfg, resume=args.resume, overwrite=args.overwrite,
                             stop_after=args.stop_after)
    except loop.DivergedError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_DIVERGED
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # UserError is a ValueError
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    final, step = results["final"], results["step"]
    if final is not None:
        bpb = f", bits/byte {final['val_bpb']:.4f}" if final["val_bpb"] is not None else ""
        print(f"step {step}: val loss {final['val_loss']:.4f}, "
              f"perplexity {final['val_ppl']:.2f}{bpb}; metrics in {results['out_dir']}")
    elif results["saved"] is None:
        print(f"nothing to do: the run in {results['out_dir']} is already at step {step} "
              f"(--stop-after {args.stop_after}); no checkpoint written")
    else:
        why = f"on {results['stopped']}" if results["stopped"] else "at --stop-after"
        print(f"stopped at step {step}; continue with --resume ({why}; checkpoint saved "
              f"in {results['out_dir']})", flush=True)
    return EXIT_SIGNAL if results["stopped"] else 0


if __name__ == "__main__":
    sys.exit(main())
