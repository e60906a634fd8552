"""Layer-wise learning rates from the gradient magnitude at initialization.

On a copy of the model initialised fan-in style (`fan_in_init`), the mean absolute gradient of
every leaf is accumulated over T minibatches with the weights held fixed:
`G_l = sum_t mean|g_l,t|`. Leaves with small gradients at init get large LRs: `u_l = 1/sqrt(G_l)`,
normalised so the parameter-count-weighted mean is 1. The scales stay fixed for the whole run.
Formulas: docs/methods.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llr_optax import _labels, _matrix_axes, _per_leaf, _scales


@_scales.register_scale_state
class ScaleByInitGradState(NamedTuple):
  """State of `scale_by_init_grad`.

  Attributes:
    scales: the static per-leaf factors (a `_per_leaf.PerLeaf`: one float32 vector;
      `current_scales` reads it as a params-shaped tree).
  """
  scales: _per_leaf.PerLeaf


def init_grad_scales(grads: Sequence[Any]) -> Any:
  """Per-leaf LR factors from gradients at initialization (docs/methods.md).

  Args:
    grads: gradient pytrees of T >= 1 minibatches, all with the same structure, taken at the same
      (fan-in initialised) weights.

  Returns:
    A pytree of float32 scalars `s_l = u_l / (sum_l N_l u_l / sum_l N_l)` with
    `u_l = 1 / sqrt(sum_t mean|g_l,t|)`: the parameter-count-weighted mean is 1.

  Raises:
    ValueError: `grads` is empty, the trees differ, or a leaf's gradient is zero or not finite
      on every batch (no LR can be derived for it; the message names the leaf).

  Example:
    >>> import jax.numpy as jnp, llr_optax
    >>> g = {"a": jnp.full((3,), 4.0), "b": jnp.full((1,), 1.0)}
    >>> s = llr_optax.init_grad_scales([g])          # u = (1/2, 1), weighted mean 5/8
    >>> round(float(s["a"]), 6), round(float(s["b"]), 6)
    (0.8, 1.6)

  References:
    "Initializing the Layer-wise Learning Rate", anonymous ICLR 2025 submission,
    https://openreview.net/forum?id=ATCanNIk1H
  """
  if isinstance(grads, Mapping) or not isinstance(grads, Sequence):
    raise ValueError("grads must be a list of gradient pytrees (one per minibatch), got a "
                     f"{type(grads).__name__}; for a single batch pass [grads]")
  grads = list(grads)
  if not grads:
    raise ValueError("grads must hold at least one gradient pytree (T >= 1 minibatches)")
  treedef = jax.tree.structure(grads[0])
  if treedef.num_leaves == 0:
    raise ValueError("grads[0] has no leaves: no LR factor can be derived")
  for t, g in enumerate(grads[1:], start=1):
    if jax.tree.structure(g) != treedef:
      raise ValueError(f"grads[{t}] has a different tree structure from grads[0]")
  # Accumulate on the host in float64: T small reductions, and exact enough to normalise to 1.
  # |g| is the modulus for complex gradients (never only their real part).
  total = [np.zeros((), np.float64) for _ in range(treedef.num_leaves)]
  for g in grads:
    for i, leaf in enumerate(jax.tree.leaves(g)):
      total[i] = total[i] + float(jnp.mean(jnp.abs(jnp.asarray(leaf)).astype(jnp.float32)))
  paths = [_labels.path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(grads[0])[0]]
  for path, g_sum in zip(paths, total):
    if not (np.isfinite(g_sum) and g_sum > 0):
      raise ValueError(f"leaf {path!r} has a zero or non-finite gradient at init "
                       f"(sum of mean |g| = {float(g_sum)}); no LR can be derived for it")
  sizes = np.array([np.size(x) for x in jax.tree.leaves(grads[0])], np.float64)
  u = np.array([1.0 / np.sqrt(g_sum) for g_sum in total])
  s = u / (np.sum(sizes * u) / np.sum(sizes))
  return jax.tree.unflatten(treedef, [jnp.asarray(v, jnp.float32) for v in s])


_FAN_IN_RULES = ("kernels", "paper")


def fan_in_init(params: Any, key: jax.Array, labels: Any = None, matrix_axes: Any = None, *,
                rule: str = "paper", tied_embedding: bool | None = None) -> Any:
  """A copy of `params` initialised fan-in style, for measuring `init_grad_scales`.

  Both rules draw matrix leaves (kernels, the output head, stacked experts) from
  `N(0, 1 / fan_in)` with fan_in the product of the reduction axes (rows of a `x @ W` kernel),
  and set norm scales to 1 and biases to 0. They differ on embeddings:

  * `"paper"` (the default; the init-grad paper's Algorithm 1 and its GPT-2 setting): position
    embeddings are treated as biases (0); a weight-tied embedding/head gets std `(1 + sqrt(1 / f_in)) / 2`,
    f_in being the embedding's last axis (the feature width, which is the fan-in of the head
    `h @ E^T`): the paper's middle ground between a unit-variance input and a fan-in head. An
    untied embedding gets std 1 (the unit-variance half; the paper's models are all tied, so
    this case is our extension), an untied head the fan-in init like every matrix. Leaves
    labelled "other" keep their values.
  * `"kernels"` (a departure, v0.1's rule): token and position embeddings, like leaves labelled
    "other", keep their values (e.g. a 0.02 init), which gives them the *smallest* factors.

  Args:
    params: the parameter pytree.
    key: a JAX PRNG key.
    labels: label tree, callable params -> label tree, or None for `label_params(params)`.
    matrix_axes: see `scale_by_alpha_hill`.
    rule: `"paper"` or `"kernels"`, see above.
    tied_embedding: `"paper"` only: whether the embedding is also the output head. None infers
      it: tied if some leaf is labelled "embed" and none "head".

  Raises:
    ValueError: an unknown `rule`, or a `labels`/`matrix_axes` tree of another structure.

  Example:
    >>> import jax, jax.numpy as jnp, llr_optax
    >>> p = {"q_proj": jnp.zeros((256, 64)), "input_norm": jnp.zeros((64,))}
    >>> q = llr_optax.fan_in_init(p, jax.random.key(0))
    >>> round(float(q["q_proj"].std() * 16), 1), float(q["input_norm"][0])
    (1.0, 1.0)
  """
  if rule not in _FAN_IN_RULES:
    raise ValueError(f"rule must be one of {_FAN_IN_RULES}, got {rule!r}")
  label_tree = _labels.resolve_labels(labels, params)
  axes_tree = _matrix_axes.resolve_matrix_axes(matrix_axes, params, label_tree)
  leaves, treedef = jax.tree.flatten(params)
  label_list = treedef.flatten_up_to(label_tree)
  axes_list = treedef.flatten_up_to(axes_tree)
  if tied_embedding is None:
    tied_embedding = "embed" in label_list and "head" not in label_list
  keys = jax.random.split(key, len(leaves))
  # Dividing by 1/std (not multiplying by std) keeps "kernels" bit-identical to earlier versions.
  normal = lambda k, x, inv_std: (jax.random.normal(k, x.shape, jnp.float32) / inv_std).astype(
      x.dtype)
  out = []
  for x, label, axes, k in zip(leaves, label_list, axes_list, keys):
    if label == "norm":
      out.append(jnp.ones_like(x))
    elif label == "bias" or (rule == "paper" and label == "pos_embed"):
      out.append(jnp.zeros_like(x))
    elif rule == "paper" and label == "embed" and getattr(x, "ndim", 0) >= 1:
      std = (1.0 + np.sqrt(1.0 / x.shape[-1])) / 2.0 if tied_embedding else 1.0
      out.append(normal(k, x, 1.0 / std))
    elif axes is not None and label not in ("embed", "pos_embed", "other"):
      fan_in = _matrix_axes.matrix_shape(x.shape, axes)[1]
      out.append(normal(k, x, np.sqrt(fan_in)))
    else:
      out.append(x)
  return jax.tree.unflatten(treedef, out)


def scale_by_init_grad(scales: Any) -> optax.GradientTransformation:
  """Static layer-wise LR factors (e.g. from `init_grad_scales`), chained after the optimizer.

  Args:
    scales: a pytree with the params' structure of positive finite factors (scalars, or arrays
      broadcastable against their leaf).

  Returns:
    An `optax.GradientTransformation` whose state `ScaleByInitGradState` holds the factors.

  Raises:
    ValueError: a factor is negative, zero or not finite (the message names the leaf).

  Example:
    >>> import jax.numpy as jnp, optax, llr_optax
    >>> tx = optax.chain(optax.sgd(1.0), llr_optax.scale_by_init_grad({"w": 0.5}))
    >>> params = {"w": jnp.ones(2)}
    >>> updates, _ = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
    >>> updates["w"]
    Array([-0.5, -0.5], dtype=float32)

  References:
    "Initializing the Layer-wise Learning Rate", anonymous ICLR 2025 submission,
    https://openreview.net/forum?id=ATCanNIk1H
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(scales)
  if not flat:
    raise ValueError("scales must hold at least one factor")
  for path, v in flat:
    arr = np.asarray(v)
    if arr.dtype.kind not in "iuf" or not (np.all(np.isfinite(arr)) and np.all(arr > 0)):
      raise ValueError(f"scales[{_labels.path_to_str(path)!r}] must be positive finite real "
                       f"numbers, got {arr}")

  def per_leaf(params) -> _per_leaf.PerLeaf:
    if params is None:  # `tx.init(None)`: the factors' own structure
      params = scales
    leaves, treedef = jax.tree.flatten(params)
    if not leaves:  # `optax.tree.map_params`' placeholder
      return _per_leaf.PerLeaf.from_leaves([], _per_leaf.Layout(treedef, []))
    mine = jax.tree.leaves(_labels.align_to(scales, params, "scales"))
    for x, s in zip(leaves, mine):
      if np.ndim(s) > np.ndim(x) or np.broadcast_shapes(np.shape(s), np.shape(x)) != np.shape(x):
        raise ValueError(f"a factor of shape {np.shape(s)} cannot scale a leaf of shape "
                         f"{np.shape(x)}")
    layout = _per_leaf.Layout(treedef, [np.shape(s) for s in mine])
    return _per_leaf.PerLeaf.from_leaves([np.asarray(s, np.float32) for s in mine], layout)

  def init_fn(params):
    # A fresh device array per init: a donated state must not take the factory's own copy.
    return ScaleByInitGradState(scales=per_leaf(params))

  def update_fn(updates, state, params=None):
    del params
    return _scales.apply_scales(updates, state.scales), state

  return optax.GradientTransformation(init_fn, update_fn)
