"""Run configuration: :class:`TrainConfig`, its validation and (de)serialisation.

The presets' run settings live in :mod:`train.run_presets` (``PRESETS``, re-exported
here; :func:`from_preset`), relative-LR tables in :mod:`train.multipliers`.

A :class:`TrainConfig` fully determines a training trajectory (model, data order,
optimizer, schedule); it is saved with every checkpoint so that ``--resume`` can
refuse a checkpoint written by a different configuration.

This module imports nothing heavy (no JAX), so the CLI can print ``--help`` and
reject bad arguments instantly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from train.multipliers import check_multipliers
from train.option_text import parse_mesh, parse_profile
from train.run_presets import PRESETS

METHODS = (
    "uniform", "alpha_hill", "init_grad", "relative", "lars", "lamb", "tempbalance",
    "upper_bound", "blockwise", "alpha_decay", "module_constant",
)
# Lion and SGD (with momentum) as in the init-grad paper: every chainable method runs on them.
OPTIMIZERS = ("adamw", "muon", "lion", "sgd")
# Base LR schedules (``--schedule``): warmup + cosine, or warmup-stable-decay (see
# train/optimizers.py: the decay is linear over the last ``decay_fraction`` of the steps).
SCHEDULES = ("cosine", "wsd")
# LARS and LAMB are complete optimizers (their own momentum and trust ratio), not a
# scale chained after AdamW or Muon.
STANDALONE_METHODS = ("lars", "lamb")
# AlphaDecay replaces AdamW's weight decay: AdamW only, as in its paper.
ADAMW_ONLY_METHODS = STANDALONE_METHODS + ("alpha_decay",)
# Kept in sync with ``models.ALL_PRESETS`` (checked by the tests); listed here so the CLI
# does not import JAX just to validate ``--preset``. Dense LLaMa, MoE LLaMa, GPT-2.
MODEL_PRESETS = ("tiny", "20m", "60m", "130m", "350m", "1b", "moe-tiny", "moe-8x34m",
                 "gpt-tiny", "gpt-nano", "gpt2-124m")

# Computation dtypes of the model (``--dtype``); parameters and optimizer state stay
# float32 either way.
DTYPES = ("float32", "bfloat16")
# Model config fields a run may override (``model_overrides``, the model flags of the
# CLI), per model family (``model_family``). ``vocab_size`` and ``max_seq_len`` come from
# the data and ``seq_len``; the computation dtype is the ``dtype`` field.
LLAMA_OVERRIDE_FIELDS = ("hidden", "intermediate", "num_heads", "num_kv_heads", "num_layers",
                         "rope_theta", "norm_eps", "tie_embeddings")
MOE_OVERRIDE_FIELDS = LLAMA_OVERRIDE_FIELDS + (
    "num_experts", "top_k", "normalize_top_k", "router_z_loss_weight",
    "load_balance_loss_weight")
GPT2_OVERRIDE_FIELDS = ("hidden", "intermediate", "num_heads", "num_layers", "norm_eps",
                        "use_bias", "tie_embeddings")
FAMILY_OVERRIDE_FIELDS = {"llama": LLAMA_OVERRIDE_FIELDS, "moe": MOE_OVERRIDE_FIELDS,
                          "gpt2": GPT2_OVERRIDE_FIELDS}
MODEL_OVERRIDE_FIELDS = tuple(dict.fromkeys(MOE_OVERRIDE_FIELDS + GPT2_OVERRIDE_FIELDS))
# Where init_grad trains from (``init_grad_train_init``): "model" = the model's own
# initialisation (the default), "paper" = the fan-in initialisation its factors were measured
# at (``llr_optax.fan_in_init(rule="paper")``, Algorithm 1's measuring point). The paper
# trains baseline and layer-wise runs from one shared init (GPT-2's std 0.02 for its
# language models), so "model" is its comparison; "paper" was our default until the grid
# showed uniform gains as much from that start alone (docs/results.md).
INIT_GRAD_TRAIN_INITS = ("model", "paper")

# Fields that do not change the trajectory: they may differ when resuming.
# tokenizer_model may move: the data fingerprint stored with every checkpoint checks the
# tokenizer file's content (train/fingerprint.py).
RESUMABLE_FIELDS = frozenset(
    {"out_dir", "log_every", "eval_every", "eval_batches", "val_batch_size",
     "checkpoint_every", "keep_checkpoints", "progress", "mesh", "tensorboard", "profile",
     "compilation_cache_dir", "peak_tflops", "tokenizer_model"}
)
# Fields that act on one method only: for any other method their value changes nothing,
# so a checkpoint may be resumed (and a cached run found) whatever they hold there.
METHOD_ONLY_FIELDS = {"init_grad_train_init": "init_grad"}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run depends on.

    Attributes:
      preset: Model, one of ``MODEL_PRESETS`` (``models.ALL_PRESETS``: dense LLaMa,
        MoE LLaMa ``moe-*``, GPT-2 ``gpt*``).
      method: Layer-wise LR method, one of ``METHODS``.
      optimizer: Base optimizer, ``"adamw"`` or ``"muon"`` (Muon on hidden matrices,
        AdamW on embedding, head and norms).
      lr: Peak learning rate of the base schedule.
      steps: Total optimizer steps (the cosine reaches its end here).
      batch_size: Training sequences per step.
      seq_len: Tokens per sequence.
      warmup_fraction: Linear warmup over this fraction of ``steps``.
      final_lr_fraction: The cosine ends at ``final_lr_fraction * lr``
        (``relative`` uses the paper's own fraction instead, see optimizers.py).
      weight_decay: Decoupled weight decay (AdamW, Muon, LAMB; L2 for LARS).
      clip: Global gradient-norm clip (0 disables it).
      b1: Adam first-moment decay (also LARS momentum).
      b2: Adam second-moment decay.
      eval_every: Evaluate every this many steps (and always at the end).
      eval_batches: Validation batches per evaluation; ``None`` = the whole split.
      val_batch_size: Validation batch size; ``None`` = ``batch_size``.
      seed: Model-init and data-shuffle seed.
      data: ``"default"`` (offline corpus), a prepared corpus directory
        (``python -m train.prepare``) or a path, see ``train.data.DataConfig``.
      tokenizer: ``"byte"`` or ``"sentencepiece"`` (trained on the training split).
      tokenizer_model: A pretrained tokenizer file (SentencePiece ``.model`` or Hugging
        Face ``tokenizer.json``) instead of ``tokenizer``; ``None``: none.
      vocab_size: SentencePiece vocabulary size (``None``: tokenizer default).
      val_fraction: Fraction of documents held out for validation.
      out_dir: Where metrics, checkpoints and the config go.
      checkpoint_every: Save every this many steps (and at the end); 0 = only at the end.
      keep_checkpoints: How many recent checkpoints to keep.
      log_every: Log the training loss every this many steps.
      s_min: alpha_hill: LR factor of the most heavy-tailed matrix.
      s_max: alpha_hill: LR factor of the least heavy-tailed matrix, embedding and
        head; ``upper_bound`` trains uniformly at ``s_max * lr``.
      interval: alpha_hill/tempbalance: steps between alpha recomputes.
      ramp_steps: alpha_hill: soft-switch length (``None``: ``interval // 2``).
      active_fraction: alpha_hill: recompute during this fraction of the run.
      min_eigenvalues: alpha_hill/tempbalance: smaller matrices keep factor 1.
      spread: alpha_hill/tempbalance: spread each recompute over this many steps, one
        slice of the matrices per step (``scale_by_alpha_hill(spread=...)``; 1 = all at
        once, as the paper), for a flat step time.
      init_grad_batches: init_grad: minibatches ``T`` the gradient is averaged over.
      init_grad_train_init: init_grad: train from the model's own initialisation,
        ``"model"`` (the default, as every other method; the paper trains its baseline and
        layer-wise runs from one shared init, GPT-2's for language models), or from the
        initialisation the factors were measured at, ``"paper"``
        (``llr_optax.fan_in_init(rule="paper")``).
      fan_in_start: every method but init_grad: train from the fan-in initialisation
        init_grad's ``"paper"`` start uses (the same weights for the same seed), not the
        model's own. The control that tells a gain of that start from the factors'.
      multipliers: relative: the module table instead of the paper's, as read from a
        ``--multipliers`` file: ``{"multipliers": {label or group: [start, end]},
        "final_fraction": f}`` (see :func:`train.multipliers.check_multipliers`); ``None``: the paper's
        table for the preset's family (MoE: ``MOE_MULTIPLIERS``, 0.04; dense:
        ``DENSE_MULTIPLIERS``, 0.06). The content, not a path, so a resume under another
        table is refused.
      model_overrides: Model config fields that replace the preset's (e.g.
        ``{"num_layers": 2}``); keys from the preset family's fields
        (``FAMILY_OVERRIDE_FIELDS``), JSON scalars only.
      dtype: Computation dtype of the model, ``"float32"`` or ``"bfloat16"``
        (activations and matmuls; parameters, gradients and optimizer state stay
        float32, the loss is taken on float32 logits).
      accumulate: Gradient accumulation: each optimizer update averages the gradients
        of this many batches of ``batch_size`` (``optax.MultiSteps``); ``steps`` counts
        updates, so a run reads ``steps * accumulate`` batches.
      progress: Show a tqdm progress bar (on a terminal; plain log lines otherwise).
      mesh: Device mesh layout, e.g. ``"data=2,fsdp=4"`` (axes from ``option_text.MESH_AXES``,
        the sizes multiply to the number of devices; missing axes have size 1), or
        ``""`` for the plain single-device step. The layout changes where numbers
        live, not which numbers are computed, so it may differ on resume.
      tensorboard: Also write TensorBoard event files to ``out_dir/tensorboard``
        (needs the optional ``tensorboardX`` package).
      profile: ``"START:N"``: a ``jax.profiler`` trace of updates START+1 ... START+N
        into ``out_dir/profile``; ``""`` for none.
      compilation_cache_dir: A persistent XLA compilation cache directory (shared by
        runs; a second run of the same shapes skips compiling); ``""`` for none.
      peak_tflops: Peak dense TFLOP/s of ONE device, for the MFU column; ``None``
        takes it from a table of known accelerators (``train.reporting``), and no MFU
        is reported for devices not in it (e.g. CPUs).
      schedule: Base LR schedule, ``"cosine"`` (warmup, cosine to
        ``final_lr_fraction * lr``) or ``"wsd"`` (warmup, stable at ``lr``, then linear
        down to ``final_lr_fraction * lr`` over the last ``decay_fraction`` of the steps).
      decay_fraction: ``wsd``: fraction of the steps the decay takes.
      module_factors: ``module_constant``: a constant LR factor per module type, label or
        group (``{"mlp": 2.0, "embed": 5.0}``; labels not covered keep 1), e.g. the mean
        factors an alpha_hill run applied (``python -m train.results``' ablation).
    """

    preset: str = "tiny"
    method: str = "uniform"
    optimizer: str = "adamw"
    lr: float = 3e-3
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    warmup_fraction: float = 0.1
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    eval_every: int = 100
    eval_batches: int | None = None
    val_batch_size: int | None = None
    seed: int = 0
    data: str = "default"
    tokenizer: str = "byte"
    tokenizer_model: str | None = None
    vocab_size: int | None = None
    val_fraction: float = 0.05
    out_dir: str = "runs/default"
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    s_min: float = 1.0
    s_max: float = 5.0
    interval: int = 100
    ramp_steps: int | None = None
    active_fraction: float = 0.2
    min_eigenvalues: int = 8
    spread: int = 1
    init_grad_batches: int = 10
    init_grad_train_init: str = "model"
    fan_in_start: bool = False
    multipliers: Mapping[str, Any] | None = None
    model_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    dtype: str = "float32"
    accumulate: int = 1
    progress: bool = True
    mesh: str = ""
    tensorboard: bool = False
    profile: str = ""
    compilation_cache_dir: str = ""
    peak_tflops: float | None = None
    schedule: str = "cosine"
    decay_fraction: float = 0.2
    module_factors: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        _check_choice("preset", self.preset, MODEL_PRESETS)
        _check_choice("method", self.method, METHODS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("dtype", self.dtype, DTYPES)
        check_combination(self.method, self.optimizer)
        for name in ("steps", "batch_size", "seq_len", "eval_every", "log_every",
                     "interval", "min_eigenvalues", "init_grad_batches",
                     "keep_checkpoints", "accumulate", "spread"):
            _check_int(name, getattr(self, name), 1)
        if self.spread > self.interval:
            raise ValueError(f"spread must be <= interval ({self.interval}), got {self.spread}")
        _check_int("checkpoint_every", self.checkpoint_every, 0)
        _check_int("seed", self.seed, 0)
        for name in ("eval_batches", "val_batch_size", "vocab_size"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        if self.ramp_steps is not None:
            _check_int("ramp_steps", self.ramp_steps, 0)
        for name in ("lr", "s_min", "s_max", "final_lr_fraction"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        for name in ("weight_decay", "clip"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.s_min > self.s_max:
            raise ValueError(f"s_min must be <= s_max, got {self.s_min} > {self.s_max}")
        for name in ("warmup_fraction", "b1", "b2", "val_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)!r}")
        if not 0.0 < self.active_fraction <= 1.0:
            raise ValueError(f"active_fraction must lie in (0, 1], got {self.active_fraction!r}")
        if not isinstance(self.model_overrides, Mapping):
            raise ValueError(f"model_overrides must be a mapping, got {self.model_overrides!r}")
        family = model_family(self.preset)
        for key, value in dict(self.model_overrides).items():
            if key not in FAMILY_OVERRIDE_FIELDS[family]:
                raise ValueError(
                    f"model_overrides: unknown model field {key!r} for the {family} preset "
                    f"{self.preset!r}; expected one of: "
                    f"{', '.join(FAMILY_OVERRIDE_FIELDS[family])}")
            if not isinstance(value, (int, float, str, bool)):
                raise ValueError(
                    f"model_overrides[{key!r}] must be a JSON scalar, got {value!r}")
        if self.tokenizer_model is not None and not isinstance(self.tokenizer_model, str):
            raise ValueError(f"tokenizer_model must be a path, got {self.tokenizer_model!r}")
        for name in ("mesh", "profile", "compilation_cache_dir"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        parse_mesh(self.mesh)
        parse_profile(self.profile)
        if self.peak_tflops is not None and not (
                isinstance(self.peak_tflops, (int, float)) and not isinstance(
                    self.peak_tflops, bool)
                and math.isfinite(self.peak_tflops) and self.peak_tflops > 0):
            raise ValueError(
                f"peak_tflops must be a positive finite number, got {self.peak_tflops!r}")
        for name in ("progress", "tensorboard", "fan_in_start"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _check_choice("init_grad_train_init", self.init_grad_train_init,
                      INIT_GRAD_TRAIN_INITS)
        if self.fan_in_start and self.method == "init_grad":
            raise ValueError("fan_in_start is for the other methods: init_grad chooses its "
                             "start with init_grad_train_init (--init-grad-train-init)")
        if self.multipliers is not None:
            if self.method != "relative":
                raise ValueError("multipliers (--multipliers) apply to --method relative "
                                 f"only, not {self.method!r}")
            object.__setattr__(self, "multipliers",
                               check_multipliers(self.multipliers, "multipliers"))
        _check_schedule(self)
        # A plain dict keeps to_dict/from_dict symmetric (and JSON-friendly).
        object.__setattr__(self, "model_overrides", dict(self.model_overrides))
        object.__setattr__(self, "module_factors", dict(self.module_factors))

    @property
    def warmup_steps(self) -> int:
        """Linear-warmup length in steps (always < ``steps``)."""
        return min(int(round(self.warmup_fraction * self.steps)), self.steps - 1)

    @property
    def decay_steps(self) -> int:
        """``wsd``: length of the final decay in steps (at least 1)."""
        return max(1, int(round(self.decay_fraction * self.steps)))

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of all fields."""
        out = dataclasses.asdict(self)
        out["model_overrides"] = dict(self.model_overrides)
        out["module_factors"] = dict(self.module_factors)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Rebuilds a config from :meth:`to_dict` output.

        Raises:
          ValueError: An unknown field (e.g. a checkpoint from another version).
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown TrainConfig field(s): {unknown}")
        return cls(**dict(values))

    def trajectory_diff(self, other: TrainConfig) -> dict[str, tuple[Any, Any]]:
        """Fields (other than ``RESUMABLE_FIELDS``) where ``self`` and ``other`` differ.

        A field of ``METHOD_ONLY_FIELDS`` counts only when ``self`` runs its method (a
        checkpoint of another method, written before that field's default moved, still
        resumes).

        Returns:
          ``{field: (self's value, other's value)}``; empty when a checkpoint written
          under ``other`` may be resumed under ``self``.
        """
        a, b = self.to_dict(), other.to_dict()
        ignored = RESUMABLE_FIELDS | {field for field, method in METHOD_ONLY_FIELDS.items()
                                      if self.method != method}
        return {k: (a[k], b[k]) for k in a if k not in ignored and a[k] != b[k]}


def check_combination(method: str, optimizer: str) -> None:
    """Raises a ``ValueError`` for a method that cannot run on ``optimizer``."""
    if method == "alpha_decay" and optimizer != "adamw":
        raise ValueError(
            "--method alpha_decay is AdamW with a per-matrix weight decay "
            "(llr_optax.adamw_alpha_decay); use --optimizer adamw.")
    if method in STANDALONE_METHODS and optimizer != "adamw":
        raise ValueError(
            f"--method {method} is its own base optimizer (optax.{method}); it cannot be "
            f"combined with --optimizer {optimizer}. Use --optimizer adamw (ignored for "
            f"{method}).")


def model_family(preset: str) -> str:
    """``"moe"``, ``"gpt2"`` or ``"llama"``: the model family of a preset name (as in
    ``models.presets``: ``moe-*`` MoE LLaMa, ``gpt*`` GPT-2, the rest dense LLaMa)."""
    if preset.startswith("moe-"):
        return "moe"
    return "gpt2" if preset.startswith("gpt") else "llama"


def _check_schedule(cfg: TrainConfig) -> None:
    """``schedule``, ``decay_fraction`` and ``module_factors`` (one-line errors)."""
    _check_choice("schedule", cfg.schedule, SCHEDULES)
    if not (isinstance(cfg.decay_fraction, (int, float)) and 0.0 < cfg.decay_fraction <= 1.0):
        raise ValueError(f"decay_fraction must lie in (0, 1], got {cfg.decay_fraction!r}")
    if cfg.schedule == "wsd" and cfg.warmup_steps > cfg.steps - cfg.decay_steps:
        raise ValueError(
            f"--schedule wsd: the warmup ({cfg.warmup_steps} steps) must end before the decay "
            f"(the last {cfg.decay_steps} of {cfg.steps} steps) starts; lower "
            "--warmup-fraction or --decay-fraction")
    if not isinstance(cfg.module_factors, Mapping):
        raise ValueError(f"module_factors must be a mapping, got {cfg.module_factors!r}")
    for key, value in dict(cfg.module_factors).items():
        if not (isinstance(key, str) and isinstance(value, (int, float))
                and not isinstance(value, bool) and math.isfinite(value) and value > 0):
            raise ValueError(f"module_factors: expected module type -> positive number, got "
                             f"{key!r}: {value!r}")
    if cfg.method == "module_constant" and not cfg.module_factors:
        raise ValueError("--method module_constant needs --module-factors FILE (a JSON "
                         "object: module type -> LR factor, e.g. {\"mlp\": 2.0})")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; expected one of: {', '.join(choices)}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def from_preset(name: str, **overrides: Any) -> TrainConfig:
    """The config of CLI preset ``name``, with ``overrides`` on top.

    Raises:
      ValueError: ``name`` is not a preset, or the result is invalid.
    """
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; expected one of: {', '.join(PRESETS)}")
    return TrainConfig(**{**PRESETS[name], **overrides})
