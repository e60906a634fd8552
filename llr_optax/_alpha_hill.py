"""`scale_by_alpha_hill`: heavy-tail guided layer-wise learning rates (LLR).

Every `interval` steps (inside the jitted update, behind one `lax.cond`) the PL_Alpha_Hill of
every weight matrix is re-estimated; alphas are mapped linearly onto `[s_min, s_max]` (larger
alpha = less heavy-tailed = less trained = larger LR); the applied factors then ramp linearly from
their current values to the new targets over `ramp_steps` steps ("soft switch"). Embedding and
output head are pinned at `s_max`. After `active_fraction * total_steps` steps no recompute
happens; the last targets are kept. The mechanism (plan, recompute, map, ramp) lives in
`_recompute.py`, shared with AlphaDecay. Formulas: docs/methods.md.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llr_optax import _labels, _per_leaf, _recompute, _scales, _spectral

MAPPING_SCOPES = ("global", "label")

# Paper text defaults (Section 4) and the authors' released 130M configuration.
PAPER = dict(s_min=1.0, s_max=5.0, interval=100, ramp_steps=50, active_fraction=0.2)
RELEASED_130M = dict(s_min=1.0, s_max=3.0, interval=40, ramp_steps=20, active_fraction=0.2,
                     min_eigenvalues=50)


@_scales.register_scale_state
class ScaleByAlphaHillState(NamedTuple):
  """State of `scale_by_alpha_hill`; every field is an array (jit-, donation- and orbax-friendly).

  Per-matrix quantities are flat `[M]` vectors in the params' flattening order (one entry per
  non-matrix leaf, one per matrix of a matrix leaf); `scales` and `alphas` carry the layout to
  read them as params-shaped trees (`current_scales`, `last_alphas`).

  Attributes:
    count: number of updates applied so far (int32).
    scales: the factors the last update applied (`_per_leaf.PerLeaf`).
    ramp_from: `[M]` the factors when each current ramp started.
    targets: `[M]` where the current ramps end (the last mapped alphas).
    ramp_start: `[M]` int32, the step each current ramp started (the last recompute).
    alphas: the alphas of the last recompute (NaN where not computed or not finite).
  """
  count: jax.Array
  scales: _per_leaf.PerLeaf
  ramp_from: jax.Array
  targets: jax.Array
  ramp_start: jax.Array
  alphas: _per_leaf.PerLeaf


def check_keys_now(keys, what: str, labels) -> None:
  """Label keys are checked eagerly when the labels are known now (default rules or a concrete
  tree); with a callable they are checked when it is applied (in `init`)."""
  if labels is None or not callable(labels):
    _labels.expand_label_keys(list(keys), what, _labels.labels_in(labels))


def active_steps_of(total_steps, active_fraction):
  """`ceil(active_fraction * total_steps)`, or None for ever; traced inputs stay traced."""
  if total_steps is None:
    return None
  if _scales.is_traced(total_steps) or _scales.is_traced(active_fraction):
    return jnp.ceil(active_fraction * total_steps).astype(jnp.int32)
  return math.ceil(active_fraction * total_steps)


def check_spread(spread, interval) -> int:
  spread = _scales.check_int("spread", spread, 1, static=True)
  if not _scales.is_traced(interval) and spread > interval:
    raise ValueError(f"spread must be <= interval ({interval}), got {spread}")
  return spread


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
    zero_threshold: float | None = None,
    spread: int = 1,
    strict: bool = False,
    mesh: Any = None,
) -> optax.GradientTransformation:
  """Heavy-tail guided layer-wise learning rates (LLR), chained after the base optimizer.

  Multiplies each weight matrix's update by a factor in `[s_min, s_max]` mapped linearly from its
  PL_Alpha_Hill (larger alpha, i.e. a less heavy-tailed ESD, gets a larger LR). Embedding and
  head are pinned at `s_max`; norms, biases and matrices with fewer than `min_eigenvalues`
  eigenvalues keep factor 1. Alphas are recomputed at step 0 and then every `interval` steps
  while `step < active_fraction * total_steps`; after a recompute the factors ramp linearly from
  their current values to the new targets over `ramp_steps` steps (at the recompute step itself
  the old factors still apply). At step 0 there is no old value: the run starts directly at the
  first targets, so it is layer-wise from its first update.

  Place it AFTER the whole base optimizer (scaling before Adam or Muon is undone by their
  normalisation). `update` needs `params`. Works inside `optax.masked`/`optax.partition`, under
  `optax.inject_hyperparams` (the numeric arguments may be arrays; pass `labels`/`matrix_axes`
  callables and `min_eigenvalues`/`spread` in `static_args`) and `optax.MultiSteps` (it counts
  real updates).

  Args:
    s_min: factor of the most heavy-tailed (smallest alpha) matrix.
    s_max: factor of the least heavy-tailed matrix, and of embedding and head.
    interval: steps between recomputes.
    ramp_steps: length of the soft switch; default `interval // 2`; 0 is a hard switch.
    total_steps: training length, for the active phase; None means recompute for ever.
    active_fraction: recomputes start while `step < active_fraction * total_steps`.
    labels: label tree, callable params -> label tree, or None for `label_params(params)`.
    matrix_axes: `MatrixAxes` tree/callable/single value saying which axes form the matrix of a
      leaf (others are stacked matrices, each with its own alpha and factor). Default: the last
      two axes of every leaf of rank >= 2 that is not labelled norm/bias; for scanned layouts
      (e.g. MaxText's `[embed, layers, mlp]`) use `infer_matrix_axes`.
    min_eigenvalues: matrices with fewer eigenvalues (min(m, n)) take no part (factor 1);
      the authors use 50.
    fixed_scales: label or group ("attn", "mlp") -> pinned factor (a label wins over its group;
      custom labels of `labels` are accepted); default `{"embed": s_max, "head": s_max}`.
      Pinned leaves take no part in alpha_min/alpha_max.
    mapping_scope: "global" (min/max over all participating matrices, the paper's default) or
      "label" (per module type).
    estimator: eigenvalue solver, see `esd`.
    zero_threshold: None (default, as the authors' released configs: every eigenvalue counts),
      or drop eigenvalues `<= zero_threshold` before the fit, as the authors' `filter_zeros=True`
      (their threshold: 1e-5); see `hill_alpha`.
    spread: recompute over this many consecutive steps, one slice of the matrices (about equal
      solve cost) per step, instead of all in one step (1, the default, as the paper). Each
      slice's factors ramp from the step its new alpha exists; with frozen weights the targets
      after the last slice equal those of the all-at-once recompute. Must be `<= interval`.
    strict: raise a `ValueError` (instead of warning once) when a leaf labelled attention, MLP
      or expert takes no part (not read as a matrix, or too few eigenvalues).
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

  References:
    He et al., "One LR Doesn't Fit All: Heavy-Tail Guided Layerwise Learning Rates for LLMs",
    2026, https://arxiv.org/abs/2605.22297 (code: github.com/hed-ucas/Layer-wise-Learning-Rate);
    the estimator is TempBalance's: Zhou et al., "Temperature Balancing, Layer-wise Weight
    Analysis, and Neural Network Training", NeurIPS 2023, https://arxiv.org/abs/2312.00359.
  """
  s_min = _scales.check_positive("s_min", s_min)
  s_max = _scales.check_positive("s_max", s_max)
  if not (_scales.is_traced(s_min) or _scales.is_traced(s_max)) and s_min > s_max:
    raise ValueError(f"s_min must be <= s_max, got s_min={s_min} > s_max={s_max}")
  interval = _scales.check_int("interval", interval, 1)
  ramp_steps = interval // 2 if ramp_steps is None else _scales.check_int("ramp_steps", ramp_steps, 0)
  if total_steps is not None:
    total_steps = _scales.check_int("total_steps", total_steps, 1)
  active_fraction = _scales.check_fraction("active_fraction", active_fraction)
  min_eigenvalues = _scales.check_int("min_eigenvalues", min_eigenvalues, 2, static=True)
  fixed_scales = _scales.check_scale_mapping(
      "fixed_scales", {"embed": s_max, "head": s_max} if fixed_scales is None else fixed_scales)
  check_keys_now(fixed_scales, "fixed_scales", labels)
  if mapping_scope not in MAPPING_SCOPES:
    raise ValueError(f"mapping_scope must be one of {MAPPING_SCOPES}, got {mapping_scope!r}")
  if estimator not in _spectral.ESTIMATORS:
    raise ValueError(f"estimator must be one of {_spectral.ESTIMATORS}, got {estimator!r}")
  zero_threshold = _spectral._check_zero_threshold(zero_threshold)
  spread = check_spread(spread, interval)
  active_steps = active_steps_of(total_steps, active_fraction)

  def plan_of(params):
    return _recompute.make_plan(params, labels, matrix_axes, fixed_scales, min_eigenvalues,
                                strict=strict, what="scale_by_alpha_hill")

  def init_fn(params):
    plan = plan_of(params)
    fields = _recompute.init_fields(plan, 1.0)
    return ScaleByAlphaHillState(
        count=jnp.zeros([], jnp.int32), scales=_per_leaf.PerLeaf(fields.values, plan.layout),
        ramp_from=fields.ramp_from, targets=fields.targets, ramp_start=fields.ramp_start,
        alphas=_per_leaf.PerLeaf(fields.alphas, plan.layout))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("scale_by_alpha_hill needs the current params: call "
                       "tx.update(updates, state, params) (nnx.Optimizer does this for you).")
    plan = plan_of(params)
    fields = _recompute.Fields(state.scales.values, state.ramp_from, state.targets,
                               state.ramp_start, state.alphas.values)
    fields = _recompute.advance(
        fields, state.count, params, plan, lo=s_min, hi=s_max, default=1.0,
        interval=interval, ramp_steps=ramp_steps, active_steps=active_steps, spread=spread,
        scope=mapping_scope, estimator=estimator, zero_threshold=zero_threshold, mesh=mesh)
    scales = _per_leaf.PerLeaf(fields.values, plan.layout)
    new_state = ScaleByAlphaHillState(
        count=optax.safe_increment(state.count), scales=scales, ramp_from=fields.ramp_from,
        targets=fields.targets, ramp_start=fields.ramp_start,
        alphas=_per_leaf.PerLeaf(fields.alphas, plan.layout))
    return _scales.apply_scales(updates, scales), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def alpha_hill_plan_summary(params, labels=None, matrix_axes=None, min_eigenvalues: int = 8,
                            fixed_scales: Mapping[str, float] | None = None) -> list[dict]:
  """Which leaves take part, are pinned or keep 1, and why — for docs, notebooks and debugging.

  Returns one dict per leaf: `path`, `label`, `role` ("alpha": takes part, "fixed": pinned by
  `fixed_scales`, "one": keeps factor 1), `matrices` (number of factors of the leaf) and
  `reason` (why a leaf keeps 1; empty otherwise).
  """
  fixed_scales = {"embed": 5.0, "head": 5.0} if fixed_scales is None else dict(fixed_scales)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the reasons are in the summary itself
    plan = _recompute.make_plan(params, labels, matrix_axes, fixed_scales, min_eigenvalues)
  label_tree = _labels.resolve_labels(labels, params)
  axes_tree = _recompute._matrix_axes.resolve_matrix_axes(matrix_axes, params, label_tree)
  leaves = jax.tree.leaves(params)
  all_axes = plan.layout.treedef.flatten_up_to(axes_tree)
  rows = []
  for i, path in enumerate(plan.paths):
    role = ("alpha" if plan.axes[i] is not None else
            "fixed" if plan.fixed[i] is not None else "one")
    reason = "" if role != "one" else (
        _recompute._why_not(leaves[i].shape, plan.labels[i], all_axes[i], min_eigenvalues) or "")
    rows.append(dict(path=path, label=plan.labels[i], role=role,
                     matrices=int(np.prod(plan.layout.shapes[i])) if plan.layout.shapes[i] else 1,
                     reason=reason))
  return rows
