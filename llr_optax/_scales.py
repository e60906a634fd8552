"""What every method shares: applying a scale tree, reading it back, validating arguments.

Each LR transformation's state is a NamedTuple with a `scales` field (a `_per_leaf.PerLeaf`):
the per-leaf (or per-matrix, broadcastable) learning-rate factors that the most recent `update`
applied. `current_scales` finds those states anywhere inside an optax chain (or an
`nnx.Optimizer`'s state) and multiplies them, so a trainer can log the effective layer-wise LR
without knowing how it was built; `last_alphas` and `current_weight_decays` read the
alpha-driven states the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llr_optax import _per_leaf

# Registered by each transformation module: the NamedTuple state types that carry `scales`
# (LR factors), and those that carry `alphas` without being LR factors (AlphaDecay).
SCALE_STATE_TYPES: list[type] = []
ALPHA_STATE_TYPES: list[type] = []


def register_scale_state(cls: type) -> type:
  """Class decorator: marks a NamedTuple state type as carrying a `scales` field."""
  SCALE_STATE_TYPES.append(cls)
  return cls


def register_alpha_state(cls: type) -> type:
  """Class decorator: marks a NamedTuple state type carrying `alphas` (but no LR `scales`)."""
  ALPHA_STATE_TYPES.append(cls)
  return cls


def apply_scales(updates: Any, scales: _per_leaf.PerLeaf) -> Any:
  """Multiplies each update leaf by its (broadcastable) factor, keeping the update's dtype."""
  leaves, treedef = jax.tree.flatten(updates)
  factors = scales.leaves()
  if len(leaves) != len(factors):
    raise ValueError(
        f"the updates have {len(leaves)} leaves but the factors were made for {len(factors)}; "
        "was the state initialised for another model?")
  return jax.tree.unflatten(treedef, [(u * s).astype(u.dtype) for u, s in zip(leaves, factors)])


def _unwrap(x: Any) -> Any:
  # nnx.Optimizer wraps each state array in a Variable; read its value without importing flax.
  if hasattr(x, "get_value"):
    return x.get_value()
  return getattr(x, "value", x)


def _scale_states(opt_state: Any, types: tuple[type, ...] | None = None) -> list[Any]:
  types = tuple(SCALE_STATE_TYPES) if types is None else types
  nodes = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, types))
  return [n for n in nodes if isinstance(n, types)]


def _is_variable(x: Any) -> bool:
  return hasattr(x, "get_value") or (hasattr(x, "value") and not isinstance(x, jax.Array))


def _values(field: Any) -> Any:
  """A state field read as a params-shaped tree, without NNX variables: the state's arrays may
  be wrapped (`nnx.Optimizer`), and the layout's treedef holds the params' own `nnx.Param`s."""
  field = jax.tree.map(_unwrap, field, is_leaf=_is_variable)
  if isinstance(field, _per_leaf.PerLeaf):
    field = jax.tree.map(_unwrap, field.tree(), is_leaf=_is_variable)
  return field


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
  """The per-matrix alphas of the last recompute (NaN: not computed or no finite alpha).

  Of the first `scale_by_alpha_hill` (or, without one, `add_decayed_weights_by_alpha_hill`)
  state found. Leaves that take no part (embedding, head, norms, small matrices) are NaN.
  Shapes are as in `current_scales`.
  """
  found = [s for s in _scale_states(opt_state, tuple(SCALE_STATE_TYPES + ALPHA_STATE_TYPES))
           if hasattr(s, "alphas")]
  if not found:
    raise ValueError("no scale_by_alpha_hill or add_decayed_weights_by_alpha_hill state found "
                     "in this optimizer state")
  return _values(found[0].alphas)


def current_weight_decays(opt_state: Any) -> Any:
  """The weight decay coefficients that the last update of `add_decayed_weights_by_alpha_hill`
  applied, as a tree shaped like the params (per matrix for matrix leaves)."""
  found = [s for s in _scale_states(opt_state, tuple(ALPHA_STATE_TYPES)) if hasattr(s, "decays")]
  if not found:
    raise ValueError("no add_decayed_weights_by_alpha_hill state found in this optimizer state")
  return _values(found[0].decays)


# --- eager validation ---------------------------------------------------------------------------
# Numeric hyperparameters are ArrayLike (Python and NumPy scalars, 0-d arrays): under
# `optax.inject_hyperparams` they arrive as jax arrays, and inside a jitted init/update as
# tracers. Concrete values are checked here, eagerly; traced ones are passed through unchecked.

def is_traced(value: Any) -> bool:
  return isinstance(value, jax.core.Tracer)


def _scalar(name: str, value: Any, kinds: str, what: str) -> np.ndarray:
  if isinstance(value, bool) or value is None:
    raise ValueError(f"{name} must be {what}, got {value!r}")
  try:
    arr = np.asarray(value)
  except Exception as e:  # e.g. a string or a tree
    raise ValueError(f"{name} must be {what}, got {value!r}") from e
  if arr.shape != () or arr.dtype.kind not in kinds:
    raise ValueError(f"{name} must be {what}, got {value!r}")
  return arr


def check_positive(name: str, value: Any) -> Any:
  if is_traced(value):
    return value
  arr = _scalar(name, value, "iuf", "a positive finite number")
  if not (np.isfinite(arr) and arr > 0):
    raise ValueError(f"{name} must be a positive finite number, got {value!r}")
  return float(arr)


def check_int(name: str, value: Any, minimum: int, static: bool = False) -> Any:
  """An integer >= minimum. `static`: it decides shapes or Python control flow at trace time, so
  a traced value (e.g. from `inject_hyperparams` without `static_args`) is an error."""
  if is_traced(value):
    if static:
      raise ValueError(f"{name} must be a concrete Python int (it is used at trace time); with "
                       f"optax.inject_hyperparams pass static_args=({name!r},)")
    return value
  arr = _scalar(name, value, "iu", f"an integer >= {minimum}")
  if arr < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(arr)


def check_fraction(name: str, value: Any) -> Any:
  if is_traced(value):
    return value
  arr = _scalar(name, value, "iuf", "a number in (0, 1]")
  if not 0.0 < arr <= 1.0:
    raise ValueError(f"{name} must be in (0, 1], got {value!r}")
  return float(arr)


def check_scale_mapping(name: str, mapping: Mapping[str, float]) -> dict[str, Any]:
  if not isinstance(mapping, Mapping):
    raise ValueError(f"{name} must be a mapping label -> factor, got {mapping!r}")
  return {k: check_positive(f"{name}[{k!r}]", v) for k, v in mapping.items()}
