"""`scale_by_alpha_hill`: heavy-tail guided layer-wise learning rates (LLR).

Every `interval` steps (inside the jitted update, behind one `lax.cond`) the PL_Alpha_Hill of
every weight matrix is re-estimated; alphas are mapped linearly onto `[s_min, s_max]` (larger
alpha = less heavy-tailed = less trained = larger LR); the applied factors then ramp linearly from
their current values to the new targets over `ramp_steps` steps ("soft switch"). Embedding and
output head are pinned at `s_max`. After `active_fraction * total_steps` steps no recompute
happens; the last targets are kept. See SPEC.md section 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llr_optax import _labels, _matrix_axes, _scales, _sharded, _spectral

MAPPING_SCOPES = ("global", "label")

# Paper text defaults (Section 4) and the authors' released 130M configuration.
PAPER = dict(s_min=1.0, s_max=5.0, interval=100, ramp_steps=50, active_fraction=0.2)
RELEASED_130M = dict(s_min=1.0, s_max=3.0, interval=40, ramp_steps=20, active_fraction=0.2,
                     min_eigenvalues=50)


@_scales.register_scale_state
class ScaleByAlphaHillState(NamedTuple):
  """State of `scale_by_alpha_hill`; every field is an array (jit- and orbax-friendly).

  Attributes:
    count: number of updates applied so far (int32).
    scales: the factors the last update applied (per leaf; per matrix for matrix leaves).
    ramp_from: the factors when the current ramp started.
    targets: where the current ramp ends (the last mapped alphas).
    ramp_start: the step of the last recompute (int32).
    alphas: the alphas of the last recompute (NaN where not computed or not finite).
  """
  count: jax.Array
  scales: Any
  ramp_from: Any
  targets: Any
  ramp_start: jax.Array
  alphas: Any


class _Plan(NamedTuple):
  """Static (trace-time) view of the params: which leaves are fixed, which take part."""
  shapes: list[tuple[int, ...]]       # per-matrix shape of each leaf's factor
  fixed: list[float | None]           # pinned factor (embedding/head), else None
  axes: list[Any]                     # MatrixAxes of participating leaves, else None
  labels: list[str]
  treedef: Any


def _pinned_by_label(fixed_scales: Mapping[str, float], labels) -> dict[str, float]:
  """`fixed_scales` keyed by single label: a group name (e.g. "attn") pins all its labels."""
  owner = _labels.expand_label_keys(list(fixed_scales), "fixed_scales", _labels.labels_in(labels))
  return {label: fixed_scales[key] for label, key in owner.items()}


def _plan(params, labels, matrix_axes, fixed_scales, min_eigenvalues) -> _Plan:
  label_tree = _labels.resolve_labels(labels, params)
  axes_tree = _matrix_axes.resolve_matrix_axes(matrix_axes, params, label_tree)
  leaves, treedef = jax.tree.flatten(params)
  label_list = treedef.flatten_up_to(label_tree)
  axes_list = treedef.flatten_up_to(axes_tree)
  shapes, fixed, take_part = [], [], []
  for x, label, axes in zip(leaves, label_list, axes_list):
    shapes.append(_matrix_axes.per_matrix_shape(x.shape, axes))
    fixed.append(fixed_scales.get(label))
    big_enough = axes is not None and min(_matrix_axes.matrix_shape(x.shape, axes)[1:]) >= min_eigenvalues
    take_part.append(axes if (big_enough and label not in fixed_scales) else None)
  return _Plan(shapes, fixed, take_part, label_list, treedef)


def _initial_scales(plan: _Plan) -> Any:
  leaves = [jnp.full(shape, 1.0 if f is None else f, jnp.float32)
            for shape, f in zip(plan.shapes, plan.fixed)]
  return jax.tree.unflatten(plan.treedef, leaves)


def _compute_alphas(params, plan: _Plan, estimator: str, tiny: float, mesh=None) -> list[jax.Array]:
  """Per-leaf alpha arrays (NaN for leaves that do not take part)."""
  leaves = plan.treedef.flatten_up_to(params)
  members = [i for i, a in enumerate(plan.axes) if a is not None]
  stacks = [_matrix_axes.to_matrices(leaves[i], plan.axes[i]) for i in members]
  alphas = [jnp.full(shape, jnp.nan, jnp.float32) for shape in plan.shapes]
  for i, a in zip(members, _sharded.grouped_matrix_alphas(stacks, estimator, tiny, mesh)):
    alphas[i] = a.reshape(plan.shapes[i])
  return alphas


def _map_to_scales(alphas, previous, plan: _Plan, s_min, s_max, scope) -> list[jax.Array]:
  """Linear map of alphas onto [s_min, s_max]; non-finite alphas keep their previous factor."""
  members = [i for i, a in enumerate(plan.axes) if a is not None]
  groups = ({"all": members} if scope == "global"
            else {l: [i for i in members if plan.labels[i] == l] for l in set(plan.labels)})
  out = list(previous)
  for idx in groups.values():
    if not idx:
      continue
    flat = jnp.concatenate([alphas[i].reshape(-1) for i in idx])
    lo, hi = jnp.nanmin(flat), jnp.nanmax(flat)
    span = hi - lo
    for i in idx:
      a = alphas[i]
      # Equal min and max (one matrix, or identical alphas): every matrix gets s_max, like
      # np.interp returning its right endpoint; no division by zero.
      frac = jnp.where(span > 0, (a - lo) / jnp.where(span > 0, span, 1.0), 1.0)
      out[i] = jnp.where(jnp.isfinite(a), s_min + (s_max - s_min) * frac, previous[i])
  return out


def scale_by_alpha_hill(
    s_min: float = 1.0,
    s_max: float = 5.0,
    interval: int = 100,
    ramp_steps: int | None = None,
    total_steps: int | None = None,
    active_fraction: float = 0.2,
    labels: Any = None,
    *,
    matrix_axes: Any = None,
    min_eigenvalues: int = 8,
    fixed_scales: Mapping[str, float] | None = None,
    mapping_scope: str = "global",
    estimator: str = "auto",
    tiny: float = _spectral.TINY_EIGENVALUE,
    mesh: Any = None,
) -> optax.GradientTransformation:
  """Heavy-tail guided layer-wise learning rates (LLR), chained after the base optimizer.

  Multiplies each weight matrix's update by a factor in `[s_min, s_max]` mapped linearly from its
  PL_Alpha_Hill (larger alpha, i.e. a less heavy-tailed ESD, gets a larger LR). Embeddings
  (token and position) and head are pinned at `s_max`; norms, biases and matrices with fewer
  than `min_eigenvalues` eigenvalues keep factor 1. Alphas are recomputed at step 0 and then
  every `interval` steps while `step < active_fraction * total_steps`; after a recompute the
  factors ramp linearly from their current values to the new targets over `ramp_steps` steps
  (at the recompute step itself the old factors still apply). At step 0 there is no old value:
  the run starts directly at the first targets, so it is layer-wise from its first update.

  Place it AFTER the whole base optimizer (scaling before Adam or Muon is undone by their
  normalisation). `update` needs `params`.

  Args:
    s_min: factor of the most heavy-tailed (smallest alpha) matrix.
    s_max: factor of the least heavy-tailed matrix, and of embedding and head.
    interval: steps between recomputes.
    ramp_steps: length of the soft switch; default `interval // 2`; 0 is a hard switch.
    total_steps: training length, for the active phase; None means recompute for ever.
    active_fraction: recomputes happen while `step < active_fraction * total_steps`.
    labels: label tree, callable params -> label tree, or None for `label_params(params)`.
    matrix_axes: `MatrixAxes` tree/callable/single value saying which axes form the matrix of a
      leaf (others are stacked matrices, each with its own alpha and factor). Default: the last
      two axes of every leaf of rank >= 2 that is not labelled norm/bias.
    min_eigenvalues: matrices with fewer eigenvalues (min(m, n)) take no part (factor 1);
      the authors use 50.
    fixed_scales: label or group ("attn", "mlp") -> pinned factor (a label wins over its group);
      default `{"embed": s_max, "pos_embed": s_max, "head": s_max}`. Pinned leaves take no
      part in alpha_min/alpha_max.
    mapping_scope: "global" (min/max over all participating matrices, the paper's default) or
      "label" (per module type).
    estimator: eigenvalue solver, see `esd`.
    tiny: eigenvalues below this are left out of the fit, see `hill_alpha`.
    mesh: device mesh to spread the recompute over: each device forms partial Gram matrices
      from its shard of the weights and solves its share of them (no weight or Gram stack is
      all-gathered). None (default) uses the context mesh (`jax.set_mesh`) if one with 2+
      devices is set, else solves locally; a `Mesh`/`AbstractMesh` uses that one; False always
      solves locally.

  Returns:
    An `optax.GradientTransformation` whose state is a `ScaleByAlphaHillState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, llr_optax
    >>> params = {"embed": jnp.ones((16, 8)),
    ...           "q_proj": jax.random.normal(jax.random.key(0), (8, 8)),
    ...           "up_proj": jax.random.normal(jax.random.key(1), (8, 32))}
    >>> tx = optax.chain(optax.adamw(1e-3, weight_decay=0.1),
    ...                  llr_optax.scale_by_alpha_hill(total_steps=1000))
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = jax.jit(tx.update)(grads, state, params)
    >>> scales = llr_optax.current_scales(state)
    >>> [float(scales[k].squeeze()) for k in ("embed", "q_proj", "up_proj")]
    [5.0, 1.0, 5.0]
  """
  s_min = _scales.check_positive("s_min", s_min)
  s_max = _scales.check_positive("s_max", s_max)
  if s_min > s_max:
    raise ValueError(f"s_min must be <= s_max, got s_min={s_min} > s_max={s_max}")
  interval = _scales.check_int("interval", interval, 1)
  ramp_steps = interval // 2 if ramp_steps is None else _scales.check_int("ramp_steps", ramp_steps, 0)
  if total_steps is not None:
    total_steps = _scales.check_int("total_steps", total_steps, 1)
  active_fraction = _scales.check_fraction("active_fraction", active_fraction)
  min_eigenvalues = _scales.check_int("min_eigenvalues", min_eigenvalues, 2)
  if fixed_scales is None:
    fixed_scales = {"embed": s_max, "pos_embed": s_max, "head": s_max}
  fixed_scales = _pinned_by_label(_scales.check_scale_mapping("fixed_scales", fixed_scales),
                                  labels)
  if mapping_scope not in MAPPING_SCOPES:
    raise ValueError(f"mapping_scope must be one of {MAPPING_SCOPES}, got {mapping_scope!r}")
  if estimator not in _spectral.ESTIMATORS:
    raise ValueError(f"estimator must be one of {_spectral.ESTIMATORS}, got {estimator!r}")
  tiny = _scales.check_positive("tiny", tiny)
  active_steps = None if total_steps is None else math.ceil(active_fraction * total_steps)

  def plan_of(params):
    return _plan(params, labels, matrix_axes, fixed_scales, min_eigenvalues)

  def init_fn(params):
    plan = plan_of(params)
    # Every field gets its own buffers: a state whose leaves alias each other cannot be donated
    # to a jitted step ("donate the same buffer twice").
    nan = jax.tree.map(lambda s: jnp.full_like(s, jnp.nan), _initial_scales(plan))
    return ScaleByAlphaHillState(
        count=jnp.zeros([], jnp.int32), scales=_initial_scales(plan),
        ramp_from=_initial_scales(plan), targets=_initial_scales(plan),
        ramp_start=jnp.zeros([], jnp.int32), alphas=nan)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("scale_by_alpha_hill needs the current params: call "
                       "tx.update(updates, state, params) (nnx.Optimizer does this for you).")
    plan = plan_of(params)
    count = state.count
    due = count % interval == 0
    if active_steps is not None:
      due = due & (count < active_steps)

    def recompute(_):
      alphas = _compute_alphas(params, plan, estimator, tiny, mesh)
      prev = plan.treedef.flatten_up_to(state.scales)
      targets = _map_to_scales(alphas, prev, plan, s_min, s_max, mapping_scope)
      # The very first targets apply at once (there is no earlier layer-wise value to ramp from).
      ramp_from = [jnp.where(count == 0, t, p) for t, p in zip(targets, prev)]
      unflat = lambda xs: jax.tree.unflatten(plan.treedef, xs)
      return unflat(ramp_from), unflat(targets), count, unflat(alphas)

    def keep(_):
      return state.ramp_from, state.targets, state.ramp_start, state.alphas

    ramp_from, targets, ramp_start, alphas = jax.lax.cond(due, recompute, keep, None)
    if ramp_steps == 0:
      scales = targets
    else:
      w = jnp.clip((count - ramp_start).astype(jnp.float32) / ramp_steps, 0.0, 1.0)
      scales = jax.tree.map(lambda a, b: a + w * (b - a), ramp_from, targets)
    new_state = ScaleByAlphaHillState(
        count=optax.safe_increment(count), scales=scales, ramp_from=ramp_from, targets=targets,
        ramp_start=ramp_start, alphas=alphas)
    return _scales.apply_scales(updates, scales), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def alpha_hill_plan_summary(params, labels=None, matrix_axes=None, min_eigenvalues: int = 8,
                            fixed_scales: Mapping[str, float] | None = None) -> list[dict]:
  """Which leaves take part, are pinned or are left at 1 — for docs, notebooks and debugging."""
  fixed_scales = _pinned_by_label({"embed": 5.0, "pos_embed": 5.0, "head": 5.0}
                                  if fixed_scales is None
                                  else dict(fixed_scales), labels)
  plan = _plan(params, labels, matrix_axes, fixed_scales, min_eigenvalues)
  paths = [_labels.path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  role = lambda i: ("alpha" if plan.axes[i] is not None else
                    "fixed" if plan.fixed[i] is not None else "one")
  return [dict(path=paths[i], label=plan.labels[i], role=role(i),
               matrices=int(np.prod(plan.shapes[i])) if plan.shapes[i] else 1)
          for i in range(len(paths))]
