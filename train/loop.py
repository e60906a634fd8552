"""The training loop: data -> model -> optimizer -> steps, evals, metrics, checkpoints.

:func:`train` runs one :class:`~train.config.TrainConfig` and returns a results dict.
Everything it records goes to ``out_dir``:

* ``metrics.jsonl``, one JSON object per line, with a ``kind``:

  - ``train``: ``step`` (updates done), ``loss`` (of the batch of that update,
    before it), ``grad_norm`` (raw), ``lr`` (base schedule), ``tokens_per_sec``;
  - ``eval``: ``step``, ``val_loss``, ``val_ppl``, ``val_bpb`` (``None`` for a
    partial pass or pre-tokenised data), ``val_tokens``;
  - ``alpha`` (alpha_hill, tempbalance; at every recompute): ``step`` = the update
    count at which the alphas were computed (0, interval, ...), ``alpha`` and the
    ``scale`` applied in that update, both ``{param path: value}``;
  - ``scale`` (same methods): the ``scale`` applied in update ``step`` (0-based);
    every update while alpha_hill may still ramp, then every ``log_every`` updates;
  - ``diverged``: ``step`` and ``loss`` when training stopped on a NaN/Inf.

* ``checkpoints/<step>/``: orbax checkpoints of params + optimizer state
  (``state``), the grain iterator position (``data``), the config (``config``) and
  what the data is, by content (``data_fingerprint``, see :mod:`train.fingerprint`).
* ``config.json``: the config, for people.

With ``cfg.mesh`` (e.g. ``"data=2,fsdp=4"``) the same loop runs on a device mesh: the
model is created sharded along its logical annotations, the optimizer state follows the
parameters, every batch is assembled from the processes' local rows, and the jitted step
keeps that layout (see :mod:`train.mesh`). In a multi-process job only process 0 writes
``metrics.jsonl`` and ``config.json``; all processes write their shards of the
checkpoints.

``--resume`` restores the latest checkpoint (refusing one written under a different
config or on other data) and continues the exact trajectory: same parameters, optimizer state, data
position and step count; metrics recorded after that checkpoint are dropped.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

import llr_optax
from models import LLaMa, llama_config
from train import data as data_lib
from train import fingerprint, optimizers, step
from train.config import TrainConfig
from train.mesh import MeshLayout

ALPHA_METHODS = ("alpha_hill", "tempbalance")
_NOT_LOGGED_LABELS = ("norm", "bias")  # their factor is always 1 under alpha methods
# The init_grad measuring batches come from their own shuffle of the training split, so
# measuring consumes nothing from the training iterator (the data order is the same for
# every method).
_INIT_GRAD_SEED_OFFSET = 0x1D17


class DivergedError(RuntimeError):
    """Training produced a NaN/Inf loss (or parameters); the run stopped.

    Attributes:
      step: The update whose loss (or resulting parameters) was not finite.
      last_checkpoint: The latest (good) checkpoint step kept on disk, or ``None``.
    """

    def __init__(self, message: str, step: int, last_checkpoint: int | None):
        super().__init__(message)
        self.step = step
        self.last_checkpoint = last_checkpoint


class ConfigMismatchError(ValueError):
    """A checkpoint was written by a run with a different trajectory-relevant config."""


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------


def data_config(cfg: TrainConfig) -> data_lib.DataConfig:
    """The :class:`train.data.DataConfig` of a run."""
    return data_lib.DataConfig(
        source=cfg.data, tokenizer=cfg.tokenizer, tokenizer_model=cfg.tokenizer_model,
        vocab_size=cfg.vocab_size,
        seq_len=cfg.seq_len, batch_size=cfg.batch_size, val_batch_size=cfg.val_batch_size,
        val_fraction=cfg.val_fraction, seed=cfg.seed)


def build_model(cfg: TrainConfig, vocab_size: int, layout: MeshLayout | None = None) -> LLaMa:
    """The LLaMa of ``cfg.preset`` (plus ``model_overrides``), initialised from ``seed``.

    With a ``layout`` it is created directly sharded on its mesh.
    """
    model_cfg = llama_config(cfg.preset, vocab_size, cfg.seq_len, **cfg.model_overrides)
    if layout is not None:
        return layout.create(lambda: LLaMa(model_cfg, rngs=nnx.Rngs(cfg.seed)))
    return LLaMa(model_cfg, rngs=nnx.Rngs(cfg.seed))


def measure_init_scales(cfg: TrainConfig, model: nnx.Module, data: data_lib.Data,
                        layout: MeshLayout | None = None) -> Any:
    """init_grad factors for ``model``'s params, from a separately seeded data stream."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batches = iter(data_lib.train_dataset(
        data.train_tokens, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
        seed=(cfg.seed + _INIT_GRAD_SEED_OFFSET) % 2**32,
        shard_index=data.shard_index, shard_count=data.shard_count))
    if layout is not None:
        batches = layout.place_batches(batches)
    grad_fn = step.make_grad_fn(graphdef, rest)
    return optimizers.measure_init_grad(cfg, grad_fn, nnx.as_pure(params), batches)


def evaluate(model: nnx.Module, data: data_lib.Data, max_batches: int | None = None,
             layout: MeshLayout | None = None) -> dict:
    """Validation loss, perplexity and bits per byte (full pass unless ``max_batches``).

    With a ``layout`` the batches are placed on its mesh (every process passes over its
    shard of the split; the sums are global).
    """
    total, count, n = jnp.zeros([]), jnp.zeros([]), 0
    batches = data.val_batches()
    if layout is not None:
        batches = layout.place_batches(batches)
    for n, batch in enumerate(batches, start=1):
        s, c = step.eval_step(model, batch)
        total, count = total + s, count + c  # stays on device: one sync per pass
        if max_batches is not None and n >= max_batches:
            break
    total, count = float(total), float(count)
    if count == 0:
        raise ValueError("The validation split is empty: increase val_fraction")
    full = max_batches is None or n >= data.num_val_batches
    loss = total / count
    bpb = data.bits_per_byte(total) if (full and data.val_bytes) else None
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_bpb": bpb,
            "val_tokens": int(count)}


def _sync(name: str) -> None:
    """Waits for all processes (no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

        multihost_utils.sync_global_devices(f"train:{name}")


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _path(path: tuple) -> str:
    s = jax.tree_util.keystr(path, simple=True, separator="/")
    return s[: -len("/value")] if s.endswith("/value") else s


def _per_leaf(tree: Any) -> dict[str, Any]:
    """``{param path: float or list}`` for every leaf except norms and biases."""
    labels = jax.tree.leaves(llr_optax.label_params(tree))
    out = {}
    for (path, leaf), label in zip(jax.tree_util.tree_flatten_with_path(tree)[0], labels):
        if label in _NOT_LOGGED_LABELS:
            continue
        v = np.asarray(leaf, np.float64).ravel()
        v = [None if not np.isfinite(x) else float(x) for x in v]
        out[_path(path)] = v[0] if len(v) == 1 else v
    return out


def _recompute_due(cfg: TrainConfig, count: int) -> bool:
    """Whether update ``count`` (0-based) recomputes alphas, as in scale_by_alpha_hill."""
    if cfg.method not in ALPHA_METHODS or count % cfg.interval:
        return False
    return cfg.method == "tempbalance" or count < math.ceil(cfg.active_fraction * cfg.steps)


def _ramping(cfg: TrainConfig, count: int) -> bool:
    """Whether alpha_hill's factors may still move at update ``count`` (log every step)."""
    if cfg.method != "alpha_hill":
        return False
    ramp = cfg.interval // 2 if cfg.ramp_steps is None else cfg.ramp_steps
    return count <= math.ceil(cfg.active_fraction * cfg.steps) + ramp


# --------------------------------------------------------------------------------------
# Metrics file
# --------------------------------------------------------------------------------------


class MetricsLog:
    """Appends JSON records to ``path`` (flushed per record, so a crash loses nothing).

    ``enabled=False`` writes nothing (the processes other than 0 of a multi-process job).
    """

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self._f = None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._f = path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a ``metrics.jsonl`` file (empty if it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _truncate_metrics(path: Path, step: int) -> None:
    """Drops records written after checkpoint ``step`` (they will be recomputed)."""
    def keep(r):
        # alpha/scale records use the 0-based update count, the others updates done.
        return r["step"] < step if r["kind"] in ("alpha", "scale") else r["step"] <= step
    records = [r for r in read_metrics(path) if keep(r)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


def _checkpoint_manager(out_dir: Path, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager((out_dir / "checkpoints").absolute(), options=options)


def _train_state(model: nnx.Module, optimizer: nnx.Optimizer) -> dict:
    # Pure nested dicts of arrays: orbax never sees NNX objects.
    return {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
            "opt": nnx.to_pure_dict(nnx.state(optimizer))}


def _save(mngr, count, model, optimizer, train_iter, cfg, data) -> None:
    mngr.save(count, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_train_state(model, optimizer)),
        data=data_lib.save_iterator_args(train_iter),
        config=ocp.args.JsonSave(cfg.to_dict()),
        data_fingerprint=ocp.args.JsonSave(data.fingerprint)))


def _check_saved_data(mngr, count: int, data: data_lib.Data) -> None:
    """Refuses a checkpoint trained on other data (corpus or tokenizer, by content)."""
    if not (Path(mngr.directory) / str(count) / "data_fingerprint").exists():
        print(f"warning: checkpoint {count} in {mngr.directory} records no data fingerprint "
              "(an older version wrote it): cannot check that it was trained on this data")
        return
    saved = mngr.restore(
        count, args=ocp.args.Composite(data_fingerprint=ocp.args.JsonRestore())).data_fingerprint
    change = fingerprint.data_change(saved, data.fingerprint)
    if change is not None:
        raise ConfigMismatchError(
            f"Cannot resume from step {count} in {mngr.directory}: the checkpoint was "
            f"trained on other data: {change}. Resume with the same --data and tokenizer, "
            "or start a new run with another --out.")


def _check_saved_config(mngr, count: int, cfg: TrainConfig) -> None:
    saved = mngr.restore(count, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
    try:
        diff = cfg.trajectory_diff(TrainConfig.from_dict(saved))
    except (TypeError, ValueError) as e:
        raise ConfigMismatchError(
            f"Cannot resume from step {count} in {mngr.directory}: its config is not "
            f"readable by this version ({e})") from e
    if diff:
        lines = "\n".join(f"  {k}: checkpoint has {b!r}, this run has {a!r}"
                          for k, (a, b) in sorted(diff.items()))
        raise ConfigMismatchError(
            f"Cannot resume from step {count} in {mngr.directory}: the checkpoint was "
            f"written with a different configuration:\n{lines}\n"
            "Resume with the same settings, or start a new run with another --out.")


def _restore(mngr, count, model, optimizer, train_iter) -> None:
    target = _train_state(model, optimizer)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = mngr.restore(count, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        data=data_lib.restore_iterator_args(train_iter)))
    for obj, pure, wrt in ((model, restored.state["params"], nnx.Param),
                           (optimizer, restored.state["opt"], ...)):
        state = nnx.state(obj, wrt)
        nnx.replace_by_pure_dict(state, pure)
        nnx.update(obj, state)


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


def _progress(cfg: TrainConfig, initial: int, enabled: bool = True):
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

    return tqdm(total=cfg.steps, initial=initial, disable=not (cfg.progress and enabled),
                unit="step",
                desc=f"{cfg.method}/{cfg.optimizer} seed {cfg.seed}", dynamic_ncols=True,
                leave=True)


def _diverged_message(what: str, cfg: TrainConfig, last_saved: int | None,
                      ckpt_dir: Path) -> str:
    kept = (f"the last good checkpoint (step {last_saved}) is kept in {str(ckpt_dir)!r}"
            if last_saved is not None else "no checkpoint had been saved yet")
    return (f"Training diverged: {what} ({cfg.method}/{cfg.optimizer}, lr={cfg.lr:g}). "
            f"Stopped; {kept}. Try a smaller --lr.")


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    data: data_lib.Data | None = None,
) -> dict:
    """Trains one run; see the module docstring for what is written to ``out_dir``.

    Args:
      cfg: The run configuration.
      resume: Continue from the latest checkpoint in ``cfg.out_dir`` (start fresh if
        there is none).
      overwrite: Delete an existing run in ``cfg.out_dir`` instead of refusing to start.
      stop_after: Stop (with a checkpoint) once this many updates are done, e.g. to
        split a run over several jobs; a later ``resume=True`` call continues it.
      data: Already built data for ``data_config(cfg)`` (saves re-reading the corpus
        when several runs share it, as in ``train.compare``).

    A multi-process job must call :func:`train.mesh.initialize_distributed` first (the
    CLI does) and give ``cfg.mesh``.

    Returns:
      ``{"config", "out_dir", "step", "final" (the eval record at ``cfg.steps``; ``None``
      when stopped early), "evals", "train",
      "alphas", "scales", "tokens_per_sec", "wall_seconds"}``.

    Raises:
      DivergedError: The loss (or the parameters) became NaN/Inf; the last good
        checkpoint is kept.
      ConfigMismatchError: ``resume`` with a checkpoint of a different configuration.
      FileExistsError: ``cfg.out_dir`` holds a run and neither ``resume`` nor
        ``overwrite`` is set.
      FileNotFoundError, ValueError: Bad data path or settings (from the data module),
        a mesh that does not fit the devices or batch size, or several processes
        without a mesh.
    """
    wall_start = time.perf_counter()
    # Checked before the (slow) data build: a layout that cannot work fails at once.
    layout = MeshLayout.from_config(cfg) if cfg.mesh else None
    if layout is None and jax.process_count() > 1:
        raise ValueError(
            f"{jax.process_count()} processes need a device mesh spanning them: pass "
            f"--mesh (e.g. data={jax.device_count()})")
    primary = jax.process_index() == 0  # the one process that writes metrics
    out = Path(cfg.out_dir)
    metrics_path = out / "metrics.jsonl"
    ckpt_dir = out / "checkpoints"
    has_run = metrics_path.exists() or (ckpt_dir.exists() and any(ckpt_dir.iterdir()))
    if has_run and not resume:
        if not overwrite:
            raise FileExistsError(
                f"{str(out)!r} already holds a run; pass --resume to continue it, "
                "--overwrite to replace it, or choose another --out")
        if primary:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            metrics_path.unlink(missing_ok=True)
        _sync("overwrite")

    if data is None:
        data = data_lib.build_data(data_config(cfg))
    elif data.config != data_config(cfg):
        raise ValueError("data= was built for a different data configuration")
    model = build_model(cfg, data.vocab_size, layout)
    init_scales = (measure_init_scales(cfg, model, data, layout)
                   if cfg.method == "init_grad" else None)
    tx = optimizers.build_optimizer(cfg, init_scales=init_scales)
    if layout is None:
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

        def train_step(batch):
            return step.train_step(model, optimizer, batch)
    else:
        optimizer = layout.create_optimizer(model, tx)  # moments follow the params' layout
        train_step = layout.train_step(model, optimizer)
    train_iter = data.train_iter()
    schedule = optimizers.base_schedule(cfg)

    mngr = _checkpoint_manager(out, cfg.keep_checkpoints)
    count = 0
    latest = mngr.latest_step() if resume else None
    if latest is not None:
        _check_saved_config(mngr, latest, cfg)
        _check_saved_data(mngr, latest, data)
        _restore(mngr, latest, model, optimizer, train_iter)
        count = int(latest)
    elif resume:
        print(f"No checkpoint in {str(ckpt_dir)!r}: starting from step 0.")
    if resume and primary:
        _truncate_metrics(metrics_path, count)
    if primary:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    log = MetricsLog(metrics_path, enabled=primary)
    last_saved = latest
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    tokens_per_step = cfg.batch_size * cfg.seq_len * data.shard_count
    timed_steps, timed_seconds = 0, 0.0  # whole run, without the compiling first step
    window_steps, window_seconds = 0, 0.0  # since the last train record
    bar = _progress(cfg, count, enabled=primary)
    compiled = False  # the first step of a process compiles: not training throughput
    try:
        while count < end:
            t0 = time.perf_counter()
            batch = next(train_iter)
            if layout is not None:
                batch = layout.place_batch(batch)
            metrics = train_step(batch)
            loss = float(metrics["loss"])  # one sync per step: a NaN never reaches a checkpoint
            seconds = time.perf_counter() - t0
            if compiled:
                timed_steps, timed_seconds = timed_steps + 1, timed_seconds + seconds
            compiled = True
            window_steps, window_seconds = window_steps + 1, window_seconds + seconds
            c, count = count, count + 1
            bar.update(1)
            if not math.isfinite(loss):
                log.write({"kind": "diverged", "step": count, "loss": str(loss)})
                raise DivergedError(_diverged_message(
                    f"the loss is {loss} at step {count}", cfg, last_saved, ckpt_dir),
                    count, last_saved)

            if _recompute_due(cfg, c):
                log.write({"kind": "alpha", "step": c,
                           "alpha": _per_leaf(llr_optax.last_alphas(optimizer.opt_state)),
                           "scale": _per_leaf(llr_optax.current_scales(optimizer.opt_state))})
            log_now = count % cfg.log_every == 0 or count == end
            if cfg.method in ALPHA_METHODS and (log_now or _ramping(cfg, c)):
                log.write({"kind": "scale", "step": c,
                           "scale": _per_leaf(llr_optax.current_scales(optimizer.opt_state))})
            if log_now:
                tps = tokens_per_step * window_steps / max(window_seconds, 1e-9)
                log.write({"kind": "train", "step": count, "loss": loss,
                           "grad_norm": float(metrics["grad_norm"]), "lr": float(schedule(c)),
                           "tokens_per_sec": tps})
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
                window_steps, window_seconds = 0, 0.0
            if count % cfg.eval_every == 0 or count == cfg.steps:
                record = {"kind": "eval", "step": count,
                          **evaluate(model, data, cfg.eval_batches, layout)}
                log.write(record)
                bpb = f", bpb {record['val_bpb']:.4f}" if record["val_bpb"] else ""
                if primary:
                    bar.write(f"step {count}: val loss {record['val_loss']:.4f}, "
                              f"ppl {record['val_ppl']:.2f}{bpb}")
            if (cfg.checkpoint_every and count % cfg.checkpoint_every == 0) or count == end:
                if not bool(_all_finite(nnx.state(model, nnx.Param))):
                    log.write({"kind": "diverged", "step": count, "loss": "non-finite params"})
                    raise DivergedError(_diverged_message(
                        f"the parameters are not finite after step {count}", cfg, last_saved,
                        ckpt_dir), count, last_saved)
                _save(mngr, count, model, optimizer, train_iter, cfg, data)
                last_saved = count
    finally:
        bar.close()
        log.close()
        mngr.wait_until_finished()
        mngr.close()

    records = read_metrics(metrics_path)
    evals = [r for r in records if r["kind"] == "eval"]
    finished = count == cfg.steps and evals and evals[-1]["step"] == count
    return {
        "config": cfg.to_dict(),
        "out_dir": str(out),
        "step": count,
        "final": evals[-1] if finished else None,
        "evals": evals,
        "train": [r for r in records if r["kind"] == "train"],
        "alphas": [r for r in records if r["kind"] == "alpha"],
        "scales": [r for r in records if r["kind"] == "scale"],
        "tokens_per_sec": tokens_per_step * timed_steps / timed_seconds if timed_seconds else None,
        "wall_seconds": time.perf_counter() - wall_start,
    }
