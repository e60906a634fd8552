"""The training loop: data -> model -> optimizer -> steps, evals, metrics, checkpoints.

:func:`train` runs one :class:`~train.config.TrainConfig` and returns a results dict.
Everything it records goes to ``out_dir``:

* ``metrics.jsonl``, one JSON object per line (non-finite numbers as ``null``), with
  a ``kind``:

  - ``train``: ``step`` (updates done), ``loss`` (of the batch of that update,
    before it; with accumulation the mean over its micro-batches), ``grad_norm``
    (raw), ``lr`` (base schedule), ``tokens_per_sec``, and ``mfu`` where the peak
    FLOP/s is known (see :mod:`train.reporting`); for a MoE model ``loss`` is the
    training objective ``ce_loss + aux_loss``, logged with its parts ``ce_loss``,
    ``aux_loss`` (weighted router losses), ``router_z_loss``, ``load_balance_loss``
    (unweighted, means over layers), ``expert_load`` (``[layer][expert]`` shares of the
    assignments) and ``expert_imbalance`` (worst layer's largest share x E; 1 = even);
  - ``eval`` (cross-entropy only, also for MoE): ``step``, ``val_loss``, ``val_ppl``,
    ``val_bpb`` (``None`` for a partial pass or pre-tokenised data), ``val_tokens``;
  - ``alpha`` (alpha_hill, tempbalance; at every recompute): ``step`` = the update
    count at which the alphas were computed (0, interval, ...), ``alpha`` and the
    ``scale`` applied in that update, both ``{param path: value}``;
  - ``scale`` (same methods): the ``scale`` applied in update ``step`` (0-based);
    every update while alpha_hill may still ramp, then every ``log_every`` updates;
  - ``diverged``: ``step`` and ``loss`` when training stopped on a NaN/Inf.

* ``checkpoints/<step>/``: verified orbax checkpoints (see :mod:`train.checkpoints`),
  including what the data is, by content (:mod:`train.fingerprint`).
* ``config.json``: the config, for people. ``tensorboard/``, ``profile/``: on request.

The step is dispatched first and the previous step's metrics are read afterwards, so
the host never waits for the device between steps; a NaN loss is caught one step
late, and the parameters are checked for NaN/Inf before every checkpoint, so none
reaches one. SIGTERM/SIGINT finish the current step, save, and stop.

With ``cfg.mesh`` (e.g. ``"data=2,fsdp=4"``) the same loop runs on a device mesh: the
model is created sharded along its logical annotations, the optimizer state follows the
parameters, every batch is assembled from the processes' local rows, and the compiled
step keeps that layout (see :mod:`train.mesh`). In a multi-process job only process 0
writes ``metrics.jsonl`` and ``config.json``; all processes write their shards of the
checkpoints.

``--resume`` restores the latest intact checkpoint (refusing one written under a
different config or on other data, compared by content: see :mod:`train.fingerprint`) and
continues the exact trajectory: same parameters, optimizer state, data position and step
count; metrics recorded after that checkpoint are dropped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import create_model, model_config
from train import data as data_lib
from train import optimizers, rundir, state as state_lib, step
from train.checkpoints import Checkpoints, ConfigMismatchError, _sync
from train.config import TrainConfig
from train.errors import UserError
from train.mesh import MeshLayout
from train.metrics_log import FactorReport, MetricsLog, read_metrics, truncate_metrics
from train.reporting import (ALPHA_METHODS, DivergedError, ProfileWindow, Reporter,
                             TensorBoard, _Diverged)
from train.signals import StopOnSignal

__all__ = ["train", "DivergedError", "ConfigMismatchError", "read_metrics", "data_config",
           "build_model", "measure_init_scales", "evaluate"]

# The init_grad measuring batches come from their own shuffle of the training split, so
# measuring consumes nothing from the training iterator (the data order is the same for
# every method).
_INIT_GRAD_SEED_OFFSET = 0x1D17


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False,
          stop_after: int | None = None, data: data_lib.Data | None = None) -> dict:
    """Trains one run; see the module docstring for what is written to ``out_dir``.

    Args:
      cfg: The run configuration.
      resume: Continue from the latest intact checkpoint in ``cfg.out_dir`` (start
        fresh if there is none).
      overwrite: Delete an existing run in ``cfg.out_dir`` instead of refusing to start.
      stop_after: Stop (with a checkpoint) once this many updates are done (>= 1), e.g.
        to split a run over several jobs; a later ``resume=True`` call continues it.
      data: Already built data for ``data_config(cfg)`` (saves re-reading the corpus
        when several runs share it, as in ``train.compare``).

    A multi-process job must call :func:`train.mesh.initialize_distributed` first (the
    CLI does) and give ``cfg.mesh``.

    Returns:
      ``{"config", "out_dir", "step" (updates done), "final" (the eval record at
      ``cfg.steps``; ``None`` when stopped early), "evals", "train", "alphas",
      "scales", "tokens_per_sec", "wall_seconds", "saved" (the checkpoint step this
      call wrote last, or ``None``), "stopped" (``"SIGTERM"``/``"SIGINT"``/
      ``"preemption"`` when a signal stopped it, else ``None``), "timing" (``steps``,
      ``seconds``, ``host_seconds`` of the timed steps), "flops_per_step"}``.

    Raises:
      DivergedError: The loss (or the parameters) became NaN/Inf; the last good
        checkpoint is kept.
      ConfigMismatchError: ``resume`` with a checkpoint of a different configuration.
      FileExistsError: ``cfg.out_dir`` holds a run and neither ``resume`` nor
        ``overwrite`` is set.
      UserError: An unusable ``out_dir``, no intact checkpoint to resume from, an
        empty validation split, ``--tensorboard`` without tensorboardX.
      FileNotFoundError, ValueError: Bad data path or settings (from the data module),
        a mesh that does not fit the devices or batch size, or several processes
        without a mesh.
    """
    wall_start = time.perf_counter()
    run = _setup(cfg, resume=resume, overwrite=overwrite, data=data)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    count, state, saved, stopped = run.start, run.state, None, None
    rep = run.reporter
    try:
        with StopOnSignal() as signals:
            while count < end:
                run.profile.before_step(count)
                state, metrics = run.step(state, run.next_batch())  # runs on, async
                count += 1
                rep.advanced()
                rep.push(count, metrics)  # reads the PREVIOUS step's metrics
                run.profile.after_step(count, state)
                stopped = signals.requested or (
                    "preemption" if run.ckpt.reached_preemption(count) else None)
                if count % cfg.eval_every == 0 or count == cfg.steps:
                    _evaluate(run, state, count)
                if stopped or count == end or (
                        cfg.checkpoint_every and count % cfg.checkpoint_every == 0):
                    saved = _save(run, state, count)
                if stopped:
                    break
            rep.flush()
    except _Diverged as e:
        raise DivergedError(_diverged_message(e.what, cfg, run.last_saved, run.ckpt),
                            e.step, run.last_saved) from None
    finally:
        run.profile.finish(state if count > run.start else None)
        rep.close()
        run.log.close()
        run.ckpt.close()
    return _results(run, count, saved, stopped, time.perf_counter() - wall_start)


# --------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Run:
    """Everything the loop works with (built by :func:`_setup`)."""

    cfg: TrainConfig
    out: Path
    data: data_lib.Data
    layout: MeshLayout | None
    spec: state_lib.StateSpec
    tx: Any
    state: state_lib.TrainState
    start: int
    train_iter: Any
    ckpt: Checkpoints
    log: MetricsLog
    reporter: Reporter
    profile: ProfileWindow
    factors: FactorReport | None
    last_saved: int | None
    eval_fn: Any = None
    compiled: Any = None
    flops: float | None = None

    def next_batch(self) -> dict:
        """The next update's batch (``accumulate`` micro-batches stacked), placed."""
        n = self.cfg.accumulate
        batch = next(self.train_iter) if n == 1 else state_lib.stack_batches(
            [next(self.train_iter) for _ in range(n)])
        if self.layout is not None:
            batch = self.layout.place_batch(batch, leading=int(n > 1))
        return batch

    def step(self, state: state_lib.TrainState, batch: dict):
        """The compiled step (compiled at the first call, for its shapes)."""
        if self.compiled is None:
            self.compiled, self.flops = state_lib.compile_step(
                self.spec, self.tx, state, batch, accumulate=self.cfg.accumulate,
                extra_metrics=self.factors.pack if self.factors else None,
                layout=self.layout)
            self.reporter.flops = self.flops
            self.reporter.resume_timing()  # compiling is not training time
        return self.compiled(state, batch)


def _setup(cfg: TrainConfig, *, resume: bool, overwrite: bool,
           data: data_lib.Data | None) -> _Run:
    # Checked before the (slow) data build: a layout or directory that cannot work
    # fails at once.
    layout = MeshLayout.from_config(cfg) if cfg.mesh else None
    if layout is None and jax.process_count() > 1:
        raise ValueError(
            f"{jax.process_count()} processes need a device mesh spanning them: pass "
            f"--mesh (e.g. data={jax.device_count()})")
    primary = jax.process_index() == 0  # the one process that writes metrics
    out = Path(cfg.out_dir)
    rundir.check_out_dir(out, resume=resume, overwrite=overwrite)
    if cfg.compilation_cache_dir:
        _use_compilation_cache(cfg.compilation_cache_dir)
    if overwrite and not resume and primary:
        rundir.clear_run(out)
    _sync("overwrite")

    if data is None:
        data = data_lib.build_data(data_config(cfg))
    elif data.config != data_config(cfg):
        raise ValueError("data= was built for a different data configuration")
    if data.num_val_batches == 0:
        raise UserError(f"the validation split is empty (val_fraction={cfg.val_fraction}); "
                        "use a --val-fraction that leaves it at least one token")
    model = build_model(cfg, data.vocab_size, layout)
    init_scales = None
    if cfg.method == "init_grad":
        init_scales, measured_at = measure_init_scales(cfg, model, data, layout,
                                                       return_params=True)
        if cfg.init_grad_train_init == "paper":  # train from where the factors were measured
            nnx.update(model, _placed_like(measured_at, nnx.state(model, nnx.Param)))
    elif cfg.fan_in_start:   # init_grad's "paper" start, without its factors
        params = nnx.state(model, nnx.Param)
        nnx.update(model, _placed_like(optimizers.fan_in_params(cfg, nnx.as_pure(params)),
                                       params))
    tx = optimizers.build_optimizer(cfg, init_scales=init_scales)
    spec, state = state_lib.init_state(model, tx, layout)
    del model  # the state lists own the arrays from here on

    ckpt = Checkpoints(out, cfg.keep_checkpoints, primary)
    start, train_iter = 0, None
    if resume:
        restored = ckpt.restore_latest(cfg, spec, state, data.train_iter, data.fingerprint)
        if restored is None:
            print(f"No checkpoint in {str(ckpt.directory)!r}: starting from step 0.")
        else:
            start, state, train_iter = restored
        if primary:
            truncate_metrics(out / "metrics.jsonl", start)
    train_iter = train_iter or data.train_iter()
    if primary:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    log = MetricsLog(out / "metrics.jsonl", enabled=primary)
    factors = (FactorReport(spec.opt_state(state.opt), alphas=True)
               if cfg.method in ALPHA_METHODS else None)
    schedule = optimizers.base_schedule(cfg)
    lrs = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(cfg.steps)))
    reporter = Reporter(
        cfg, log, start=start,
        tokens_per_step=cfg.batch_size * cfg.seq_len * cfg.accumulate * data.shard_count,
        flops_per_step=None, lrs=lrs, factors=factors, primary=primary,
        tensorboard=TensorBoard(out, start) if cfg.tensorboard and primary else None)
    reporter.say(data.summary())  # which tokens this run trains on, in its log
    return _Run(cfg=cfg, out=out, data=data, layout=layout, spec=spec, tx=tx, state=state,
                start=start, train_iter=train_iter, ckpt=ckpt, log=log, reporter=reporter,
                profile=ProfileWindow(cfg, out, primary), factors=factors,
                last_saved=start if resume and start else None,
                eval_fn=state_lib.make_eval(spec))


def _use_compilation_cache(directory: str) -> None:
    """A persistent XLA compilation cache (every program, however quick to compile).

    JAX opens its cache directory once per process; a different directory asked for
    later in the same process (a second ``train`` call) reopens it there.
    """
    from jax.experimental.compilation_cache import compilation_cache as cc  # pylint: disable=import-outside-toplevel

    path = str(Path(directory).absolute())
    Path(path).mkdir(parents=True, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != path:
        cc.reset_cache()
        jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


# --------------------------------------------------------------------------------------
# What the loop calls
# --------------------------------------------------------------------------------------


def _evaluate(run: _Run, state: state_lib.TrainState, count: int) -> None:
    run.reporter.pause()  # reads the pending metrics: a NaN is reported first
    record = {"kind": "eval", "step": count,
              **evaluate_params(run.eval_fn, state.params, run.data, run.cfg.eval_batches,
                                run.layout)}
    run.reporter.eval_record(record)
    run.reporter.resume_timing()


def _save(run: _Run, state: state_lib.TrainState, count: int) -> int:
    run.reporter.pause()  # a NaN loss of the last step stops the run before saving
    if not run.ckpt.save(count, run.spec, state, run.train_iter, run.cfg, run.data.fingerprint):
        run.log.write({"kind": "diverged", "step": count, "loss": "non-finite params"})
        raise _Diverged(f"the parameters are not finite after step {count}", count)
    run.last_saved = count
    run.reporter.resume_timing()
    return count


def _diverged_message(what: str, cfg: TrainConfig, last_saved: int | None,
                      ckpt: Checkpoints) -> str:
    kept = (f"the last good checkpoint (step {last_saved}) is kept in "
            f"{str(ckpt.directory)!r}" if last_saved is not None
            else "no checkpoint had been saved yet")
    return (f"Training diverged: {what} ({cfg.method}/{cfg.optimizer}, lr={cfg.lr:g}). "
            f"Stopped; {kept}. Try a smaller --lr.")


def _results(run: _Run, count: int, saved: int | None, stopped: str | None,
             wall_seconds: float) -> dict:
    records = read_metrics(run.out / "metrics.jsonl")
    evals = [r for r in records if r["kind"] == "eval"]
    finished = count == run.cfg.steps and evals and evals[-1]["step"] == count
    timing = run.reporter.timing()
    tokens = run.reporter.tokens_per_step * timing["steps"]
    return {
        "config": run.cfg.to_dict(),
        "out_dir": str(run.out),
        "step": count,
        "final": evals[-1] if finished else None,
        "evals": evals,
        "train": [r for r in records if r["kind"] == "train"],
        "alphas": [r for r in records if r["kind"] == "alpha"],
        "scales": [r for r in records if r["kind"] == "scale"],
        "tokens_per_sec": tokens / timing["seconds"] if timing["seconds"] else None,
        "wall_seconds": wall_seconds,
        "saved": saved,
        "stopped": stopped,
        "timing": timing,
        "flops_per_step": run.flops,
    }


# --------------------------------------------------------------------------------------
# Building blocks (also used by tests, benchmarks and notebooks)
# --------------------------------------------------------------------------------------


def data_config(cfg: TrainConfig) -> data_lib.DataConfig:
    """The :class:`train.data.DataConfig` of a run."""
    return data_lib.DataConfig(
        source=cfg.data, tokenizer=cfg.tokenizer, tokenizer_model=cfg.tokenizer_model,
        vocab_size=cfg.vocab_size,
        seq_len=cfg.seq_len, batch_size=cfg.batch_size, val_batch_size=cfg.val_batch_size,
        val_fraction=cfg.val_fraction, seed=cfg.seed)


def build_model(cfg: TrainConfig, vocab_size: int,
                layout: MeshLayout | None = None) -> nnx.Module:
    """The model of ``cfg.preset`` (LLaMa, MoE LLaMa or GPT-2, plus ``model_overrides``
    and ``dtype``; ``models.model_config`` / ``models.create_model``), initialised from
    ``seed``; parameters are float32 whatever the computation dtype. Its context length
    (GPT-2's position table) is ``seq_len``.

    With a ``layout`` it is created directly sharded on its mesh.
    """
    model_cfg = model_config(cfg.preset, vocab_size, cfg.seq_len, dtype=jnp.dtype(cfg.dtype),
                             param_dtype=jnp.float32, **cfg.model_overrides)
    if layout is not None:
        return layout.create(lambda: create_model(model_cfg, rngs=nnx.Rngs(cfg.seed)))
    return create_model(model_cfg, rngs=nnx.Rngs(cfg.seed))


def _placed_like(new: Any, old: Any) -> Any:
    """``new``'s arrays on the devices (and in the layout) of ``old``'s."""
    return jax.tree.map(lambda n, o: jax.device_put(n, o.sharding)
                        if hasattr(o, "sharding") else n, new, nnx.as_pure(old))


def measure_init_scales(cfg: TrainConfig, model: nnx.Module, data: data_lib.Data,
                        layout: MeshLayout | None = None, *, return_params: bool = False
                        ) -> Any:
    """init_grad factors for ``model``'s params, from a separately seeded data stream.

    With ``return_params``: ``(factors, params)``, the fan-in initialised parameters
    (pure pytree) the gradients were measured at (``cfg.init_grad_train_init ==
    "paper"`` trains from them).
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batches = iter(data_lib.train_dataset(
        data.train_tokens, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
        seed=(cfg.seed + _INIT_GRAD_SEED_OFFSET) % 2**32,
        shard_index=data.shard_index, shard_count=data.shard_count))
    if layout is not None:
        batches = layout.place_batches(batches)
    grad_fn = step.make_grad_fn(graphdef, rest)
    scales, measured_at = optimizers.measure_init_grad(cfg, grad_fn, nnx.as_pure(params),
                                                       batches, return_params=True)
    return (scales, measured_at) if return_params else scales


def evaluate(model: nnx.Module, data: data_lib.Data, max_batches: int | None = None,
             layout: MeshLayout | None = None) -> dict:
    """Validation loss, perplexity and bits per byte of a model object (full pass unless
    ``max_batches``); see :func:`evaluate_params`."""
    return evaluate_params(lambda _, batch: step.eval_step(model, batch), None, data,
                           max_batches, layout)


def evaluate_params(eval_fn: Any, params: Any, data: data_lib.Data,
                    max_batches: int | None = None, layout: MeshLayout | None = None) -> dict:
    """Validation loss, perplexity and bits per byte (full pass unless ``max_batches``).

    Args:
      eval_fn: ``(params, batch) -> (summed loss, scored tokens)``.
      params: What ``eval_fn`` takes as parameters.
      data: The data (its validation split).
      max_batches: Stop after this many batches.
      layout: Place the batches on its mesh (every process passes over its shard of
        the split; the sums are global).
    """
    total, count, n = jnp.zeros([]), jnp.zeros([]), 0
    batches = data.val_batches()
    if layout is not None:
        batches = layout.place_batches(batches)
    for n, batch in enumerate(batches, start=1):
        s, c = eval_fn(params, batch)
        total, count = total + s, count + c  # stays on device: one sync per pass
        if max_batches is not None and n >= max_batches:
            break
    total, count = float(total), float(count)
    if count == 0:
        raise UserError("The validation split is empty: increase val_fraction")
    full = max_batches is None or n >= data.num_val_batches
    loss = total / count
    bpb = data.bits_per_byte(total) if (full and data.val_bytes) else None
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_bpb": bpb,
            "val_tokens": int(count)}
