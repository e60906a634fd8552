"""Checkpoints that are verified when read back, with a fallback to an older one.

Each checkpoint ``checkpoints/<step>/`` (orbax) holds five items:

* ``state``: ``{"params": nested dicts of the model parameters, "opt": the optax state
  as a flat list}``;
* ``data``: the grain iterator's position;
* ``config``: the run's :class:`~train.config.TrainConfig`;
* ``data_fingerprint``: what the data is, by content (:mod:`train.fingerprint`); a
  resume on other data is refused;
* ``checksum``: a fingerprint of every array of ``state`` plus SHA-256 digests of the
  config, the data fingerprint and (single-process runs) the iterator position.

The array fingerprint is computed on the device, from the arrays' bits: per leaf, two
32-bit sums of a mixing hash (murmur3's finaliser) of each element's bits and its
index. Integer sums wrap exactly and do not depend on the summation order, so the
fingerprint is the same under every mesh layout and a checkpoint written on one
layout verifies on another. One flipped bit changes its element's hash, and so the
sum (unless another change cancels it exactly: about 2**-64 for random damage).

Restoring (:meth:`Checkpoints.restore_latest`) tries the newest checkpoint first; one
that cannot be read (a truncated chunk, a missing ``_METADATA``, a missing item) or
whose fingerprint differs is named in one line, moved to ``damaged_checkpoints/`` (so
that the step can be written again), and the next older one is tried.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from train import data as data_lib
from train import fingerprint
from train.config import TrainConfig
from train.errors import UserError
from train.state import StateSpec, TrainState

FINGERPRINT = "fmix32-sum-x2-v1"
DAMAGED_DIR = "damaged_checkpoints"


class ConfigMismatchError(UserError):
    """A checkpoint was written by a run with a different trajectory-relevant config."""


class DamagedCheckpoint(Exception):
    """A checkpoint that cannot be read back, or not as it was written."""


# --------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------


def _fmix32(h: jax.Array) -> jax.Array:
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _bits(x: jax.Array) -> jax.Array:
    """The elements' bit patterns as uint32 (wider types fold their halves)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size == 8:
        halves = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
        return halves[..., 0] ^ _fmix32(halves[..., 1])
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    bits = _bits(x)
    index = jax.lax.iota(jnp.uint32, bits.size).reshape(bits.shape)  # row-major position
    lanes = [jnp.sum(_fmix32(bits ^ _fmix32(index * jnp.uint32(0x9E3779B9) + jnp.uint32(s))),
                     dtype=jnp.uint32) for s in (0x1234567, 0x7654321)]
    return jnp.stack(lanes)


@jax.jit
def fingerprint_and_finite(tree: dict) -> tuple[list[jax.Array], jax.Array]:
    """Per-leaf fingerprints of ``tree`` and whether its ``params`` are all finite."""
    prints = [_leaf_fingerprint(x) for x in jax.tree.leaves(tree)]
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                                for x in jax.tree.leaves(tree["params"])]))
    return prints, finite


def _leaf_names(tree: dict) -> list[str]:
    return [jax.tree_util.keystr(p, simple=True, separator="/")
            for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _hex(prints: list) -> list[str]:
    return [f"{int(a):08x}{int(b):08x}" for a, b in np.asarray(jax.device_get(prints))]


def _sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------------------
# The manager
# --------------------------------------------------------------------------------------


def state_tree(spec: StateSpec, state: TrainState) -> dict:
    """What the ``state`` item holds (the parameters keep their readable nesting)."""
    return {"params": spec.pure_params(state.params), "opt": list(state.opt)}


class Checkpoints:
    """The checkpoints of one run directory.

    Args:
      out_dir: The run directory (checkpoints go to ``out_dir/checkpoints``).
      keep: How many recent checkpoints orbax keeps.
      primary: Whether this process moves damaged checkpoints aside (process 0).
    """

    def __init__(self, out_dir: Path, keep: int, primary: bool = True):
        self.out_dir = Path(out_dir)
        self.directory = (self.out_dir / "checkpoints").absolute()
        self.keep = keep
        self.primary = primary
        self.mngr = self._manager()

    def _manager(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True)
        return ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(int(s) for s in self.mngr.all_steps())

    def reached_preemption(self, step: int) -> bool:
        """Whether all processes of a multi-process job agreed to stop here (SIGTERM
        through JAX's preemption service; orbax's preemption support)."""
        return jax.process_count() > 1 and self.mngr.reached_preemption(step)

    def save(self, step: int, spec: StateSpec, state: TrainState, train_iter: Any,
             cfg: TrainConfig, data_fingerprint: dict) -> bool:
        """Saves after checking that the parameters are finite.

        ``data_fingerprint`` (:mod:`train.fingerprint`) records what the data is, by
        content, so that a resume on other data is refused.

        Returns:
          ``False`` (and saves nothing) when some parameter is NaN/Inf.
        """
        tree = state_tree(spec, state)
        prints, finite = fingerprint_and_finite(tree)
        if not bool(finite):
            return False
        checksum = {"algorithm": FINGERPRINT, "leaves": dict(zip(_leaf_names(tree),
                                                                 _hex(prints))),
                    "config_sha256": _sha256(cfg.to_dict()),
                    "data_fingerprint_sha256": _sha256(data_fingerprint)}
        if jax.process_count() == 1:
            checksum["data_sha256"] = _sha256(train_iter.get_state())
        self.mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(tree),
            data=data_lib.save_iterator_args(train_iter),
            config=ocp.args.JsonSave(cfg.to_dict()),
            data_fingerprint=ocp.args.JsonSave(data_fingerprint),
            checksum=ocp.args.JsonSave(checksum)))
        return True

    def restore_latest(self, cfg: TrainConfig, spec: StateSpec, template: TrainState,
                       new_iter: Callable[[], Any], data_fingerprint: dict,
                       ) -> tuple[int, TrainState, Any] | None:
        """The newest intact checkpoint, falling back over damaged ones.

        Args:
          cfg: This run's config (a checkpoint of another trajectory is refused).
          spec: The state's trees.
          template: A state with the shapes, dtypes and shardings to restore into.
          new_iter: Makes a fresh training iterator to restore the position into.
          data_fingerprint: This run's data (a checkpoint of other data is refused).

        Returns:
          ``(step, state, iterator)``, or ``None`` when there is no checkpoint.

        Raises:
          ConfigMismatchError: The newest readable config differs from ``cfg``, or its
            data from this run's.
          UserError: There are checkpoints but none is intact.
        """
        steps = self.steps()
        damaged = []
        for step in reversed(steps):
            try:
                state, it = self._restore_verified(step, cfg, spec, template, new_iter,
                                                   data_fingerprint)
            except DamagedCheckpoint as e:
                damaged.append(step)
                moved = self._quarantine(step)
                print(f"warning: checkpoint {step} in {str(self.directory)!r} is damaged "
                      f"({e}); moved it to {moved!r}"
                      + (" and falling back to the previous one" if step != steps[0]
                         else ""), file=sys.stderr, flush=True)
                continue
            return step, state, it
        if damaged:
            raise UserError(
                f"no intact checkpoint in {str(self.directory)!r}: step(s) "
                f"{', '.join(map(str, damaged))} are damaged (moved to "
                f"{str(self.out_dir / DAMAGED_DIR)!r}); start over with --overwrite")
        return None

    def _restore_verified(self, step, cfg, spec, template, new_iter, data_fingerprint):
        try:
            saved = self.mngr.restore(step, args=ocp.args.Composite(
                config=ocp.args.JsonRestore())).config
        except Exception as e:  # pylint: disable=broad-except  (any read failure)
            raise DamagedCheckpoint(f"config unreadable: {_one_line(e)}") from None
        check_config(saved, cfg, step, self.directory)
        saved_data = self._saved_fingerprint(step)
        change = fingerprint.data_change(saved_data, data_fingerprint)
        if change is not None:
            raise ConfigMismatchError(
                f"Cannot resume from step {step} in {str(self.directory)!r}: it was trained "
                f"on other data: {change}. Resume with the same --data and tokenizer, or "
                "start a new run with another --out")
        it = new_iter()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_tree(spec, template))
        try:
            restored = self.mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                data=data_lib.restore_iterator_args(it),
                checksum=ocp.args.JsonRestore()))
        except Exception as e:  # pylint: disable=broad-except  (any read failure)
            raise DamagedCheckpoint(f"unreadable: {_one_line(e)}") from None
        checksum = restored.checksum
        if not isinstance(checksum, dict) or checksum.get("algorithm") != FINGERPRINT:
            raise DamagedCheckpoint("no checksum of the kind this version writes")
        if checksum.get("config_sha256") != _sha256(saved):
            raise DamagedCheckpoint("the config does not match its checksum")
        if checksum.get("data_fingerprint_sha256") != _sha256(saved_data):
            raise DamagedCheckpoint("the data fingerprint does not match its checksum")
        if "data_sha256" in checksum and jax.process_count() == 1 and (
                checksum["data_sha256"] != _sha256(it.get_state())):
            raise DamagedCheckpoint("the data position does not match its checksum")
        tree = restored.state
        prints, _ = fingerprint_and_finite(tree)
        expected = checksum.get("leaves", {})
        names = _leaf_names(tree)
        if sorted(expected) != sorted(names):
            raise DamagedCheckpoint("its checksum lists other arrays than it holds")
        for name, value in zip(names, _hex(prints)):
            if expected[name] != value:
                raise DamagedCheckpoint(f"{_readable(name, spec)} does not match its checksum")
        state = TrainState(jax.tree.leaves(tree["params"]), list(tree["opt"]))
        return state, it

    def _saved_fingerprint(self, step: int) -> dict:
        try:
            return self.mngr.restore(step, args=ocp.args.Composite(
                data_fingerprint=ocp.args.JsonRestore())).data_fingerprint
        except Exception as e:  # pylint: disable=broad-except  (any read failure)
            raise DamagedCheckpoint(f"data fingerprint unreadable: {_one_line(e)}") from None

    def _quarantine(self, step: int) -> str:
        dest = self.out_dir / DAMAGED_DIR / str(step)
        n = 1
        while dest.exists():
            n += 1
            dest = self.out_dir / DAMAGED_DIR / f"{step}.{n}"
        if self.primary:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(dest))
        _sync("quarantine")
        self.mngr.close()
        self.mngr = self._manager()
        return str(dest)

    def wait(self) -> None:
        """Blocks until the last save is on disk."""
        self.mngr.wait_until_finished()

    def close(self) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()


def check_config(saved: Any, cfg: TrainConfig, step: int, directory: Path) -> None:
    """Raises :class:`ConfigMismatchError` unless ``saved`` may be resumed under ``cfg``."""
    try:
        diff = cfg.trajectory_diff(TrainConfig.from_dict(saved))
    except (TypeError, ValueError) as e:
        raise ConfigMismatchError(
            f"Cannot resume from step {step} in {str(directory)!r}: its config is not "
            f"readable by this version ({_one_line(e)})") from None
    if diff:
        items = "; ".join(f"{k}: checkpoint has {b!r}, this run has {a!r}"
                          for k, (a, b) in sorted(diff.items()))
        raise ConfigMismatchError(
            f"Cannot resume from step {step} in {str(directory)!r}: it was written with a "
            f"different configuration ({items}); resume with the same settings, or start "
            "a new run with another --out")


def _readable(name: str, spec: StateSpec) -> str:
    """``opt/<i>`` -> the optax path of the i-th optimizer-state leaf."""
    if not name.startswith("opt/"):
        return name
    index = int(name.split("/")[1])
    abstract = spec.opt_state(list(range(spec.opt_def.num_leaves)))
    paths = [jax.tree_util.keystr(p, simple=True, separator="/")
             for p, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]]
    return f"optimizer state {paths[index]}" if index < len(paths) else name


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    # TensorStore appends a dump of its internals; the first sentence says what failed.
    text = text.split(" See full TensorStore details")[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _sync(name: str) -> None:
    """Waits for all processes (no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

        multihost_utils.sync_global_devices(f"train:{name}")
