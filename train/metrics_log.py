"""``metrics.jsonl``: one JSON object per line, written as training goes.

Records have a ``kind`` (see :mod:`train.loop` for the fields of each). Every record is
valid JSON: a non-finite number (a NaN ``grad_norm``, say) is written as ``null``.
A crash can leave a half-written last line; :func:`read_metrics` skips it, and a resume
rewrites the file without it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

import llr_optax

_NOT_LOGGED_LABELS = ("norm", "bias")  # their factor is always 1 under alpha methods


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


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
            self._f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a ``metrics.jsonl`` file (empty if it does not exist).

    A last line that is not complete JSON (the run was killed while writing it) is
    skipped.

    Raises:
      ValueError: A line before the last is not valid JSON (the file was edited or
        damaged); the message names the file and line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):
                break  # half-written by a killed run
            raise ValueError(f"{str(path)!r} line {number} is not valid JSON ({e})") from None
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """Drops records written after checkpoint ``step`` (they will be recomputed)."""
    def keep(r):
        # alpha/scale records use the 0-based update count, the others updates done.
        return r["step"] < step if r["kind"] in ("alpha", "scale") else r["step"] <= step
    records = [r for r in read_metrics(path) if keep(r)]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(json_safe(r), allow_nan=False) + "\n"
                           for r in records), encoding="utf-8")
    tmp.replace(path)  # atomic: a kill during the rewrite keeps the old file


def _path(path: tuple) -> str:
    s = jax.tree_util.keystr(path, simple=True, separator="/")
    return s[: -len("/value")] if s.endswith("/value") else s


class FactorReport:
    """The layer-wise factors (and alphas) of an optimizer state, packed for transfer.

    Inside the jitted step :meth:`pack` concatenates the per-leaf values into one
    vector per kind (one small device-to-host copy, read with the loss one step
    later); :meth:`unpack` turns it back into ``{param path: float or list}`` for
    every leaf except norms and biases.

    Args:
      opt_state: The optax state (arrays or ``ShapeDtypeStruct``s).
      alphas: Also report ``llr_optax.last_alphas`` (alpha_hill, tempbalance).
    """

    def __init__(self, opt_state: Any, alphas: bool):
        self.alphas = alphas
        scales = jax.eval_shape(llr_optax.current_scales, opt_state)
        labels = jax.tree.leaves(llr_optax.label_params(scales))
        self.names, self.sizes, self.keep = [], [], []
        for (path, leaf), label in zip(jax.tree_util.tree_flatten_with_path(scales)[0],
                                       labels):
            self.sizes.append(int(np.prod(leaf.shape, dtype=np.int64)))
            self.names.append(_path(path))
            self.keep.append(label not in _NOT_LOGGED_LABELS)

    def pack(self, opt_state: Any) -> dict:
        """``{"scales": vector[, "alphas": vector]}`` (traceable)."""
        import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

        def flat(tree):
            return jnp.concatenate([jnp.ravel(x).astype(jnp.float32)
                                    for x in jax.tree.leaves(tree)])

        out = {"scales": flat(llr_optax.current_scales(opt_state))}
        if self.alphas:
            out["alphas"] = flat(llr_optax.last_alphas(opt_state))
        return out

    def unpack(self, vector: np.ndarray) -> dict[str, Any]:
        """``{param path: float or list}`` (``None`` for a non-finite value)."""
        out, start = {}, 0
        for name, size, keep in zip(self.names, self.sizes, self.keep):
            values = np.asarray(vector[start:start + size], np.float64)
            start += size
            if keep:
                v = [float(x) if np.isfinite(x) else None for x in values]
                out[name] = v[0] if size == 1 else v
        return out
