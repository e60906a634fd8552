"""What every method shares: applying a scale tree, reading it back, validating arguments.

Each transformation's state is a NamedTuple with a `scales` field: the per-leaf (or per-matrix,
broadcastable) learning-rate factors that the most recent `update` applied. `current_scales`
finds those states anywhere inside an optax chain (or an `nnx.Optimizer`'s state) and multiplies
them, so a trainer can log the effective layer-wise LR without knowing how it was built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

# Registered by each transformation module: the NamedTuple state types that carry `scales`.
SCALE_STATE_TYPES: list[type] = []


def register_scale_state(cls: type) -> type:
  """Class decorator: marks a NamedTuple state type as carrying a `scales` tree."""
  SCALE_STATE_TYPES.append(cls)
  return cls


def apply_scales(updates: Any, scales: Any) -> Any:
  """Multiplies each update leaf by its (broadcastable) scale, keeping the update's dtype."""
  try:
    return jax.tree.map(lambda u, s: (u * s).astype(u.dtype), updates, scales)
  except ValueError as e:
    raise ValueError(
        "the scale tree does not match the updates' tree structure; were the scales computed "
        f"for another model? ({e})") from e


def _unwrap(x: Any) -> Any:
  # nnx.Optimizer wraps each state array in a Variable; read its value without importing flax.
  if hasattr(x, "get_value"):
    return x.get_value()
  return getattr(x, "value", x)


def _scale_states(opt_state: Any) -> list[Any]:
  types = tuple(SCALE_STATE_TYPES)
  nodes = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, types))
  return [n for n in nodes if isinstance(n, types)]


def _values(tree: Any) -> Any:
  is_var = lambda x: hasattr(x, "get_value") or (hasattr(x, "value") and not isinstance(x, jax.Array))
  return jax.tree.map(_unwrap, tree, is_leaf=is_var)


def current_scales(opt_state: Any) -> Any:
  """The layer-wise LR factors that the last update applied, as a tree shaped like the params.

  Works on the state of any optax chain (or `nnx.Optimizer.opt_state`) that contains one or more
  of `scale_by_alpha_hill`, `relative_schedule`, `scale_by_init_grad`; with several, their
  factors multiply (as they do on the updates). Each leaf is a scalar, or for matrix leaves of
  `scale_by_alpha_hill` an array with the leaf's shape where the matrix axes are 1 (one factor per
  stacked matrix). Before the first update, the factors that the first update would start from.

  Example:
    >>> import jax.numpy as jnp, optax, llr_optax
    >>> params = {"w": jnp.ones((2, 2))}
    >>> tx = optax.chain(optax.sgd(0.1), llr_optax.scale_by_init_grad({"w": 2.0}))
    >>> llr_optax.current_scales(tx.init(params))
    {'w': Array(2., dtype=float32)}
  """
  states = _scale_states(opt_state)
  if not states:
    raise ValueError("no llr_optax transformation found in this optimizer state; "
                     "current_scales needs a state built by scale_by_alpha_hill, "
                     "relative_schedule or scale_by_init_grad.")
  total = _values(states[0].scales)
  for st in states[1:]:
    total = jax.tree.map(jnp.multiply, total, _values(st.scales))
  return total


def last_alphas(opt_state: Any) -> Any:
  """The per-matrix alphas of the last recompute of `scale_by_alpha_hill` (NaN: not computed).

  Leaves that take no part (embedding, head, norms, small matrices) and matrices without a finite
  alpha are NaN. Shapes are as in `current_scales`.
  """
  found = [s for s in _scale_states(opt_state) if hasattr(s, "alphas")]
  if not found:
    raise ValueError("no scale_by_alpha_hill state found in this optimizer state")
  return _values(found[0].alphas)


# --- eager validation -------------------------------------------------------------------------

def check_positive(name: str, value: float) -> float:
  if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
    raise ValueError(f"{name} must be a positive finite number, got {value!r}")
  return float(value)


def check_int(name: str, value: Any, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return value


def check_fraction(name: str, value: float) -> float:
  if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
    raise ValueError(f"{name} must be in (0, 1], got {value!r}")
  return float(value)


def check_scale_mapping(name: str, mapping: Mapping[str, float]) -> dict[str, float]:
  return {k: check_positive(f"{name}[{k!r}]", v) for k, v in mapping.items()}
