"""AlphaDecay: per-matrix weight decay driven by the same PL_Alpha_Hill estimate (HT-SR).

He et al. (2025) use the heavy-tail estimate the other way round from LLR: instead of the LR,
each weight matrix's decoupled weight decay is mapped linearly from its alpha onto
`[min_ratio * wd, max_ratio * wd]` - a more heavy-tailed matrix (smaller alpha, "better
trained") gets weaker decay. It is the `add_decayed_weights` of AdamW, between `scale_by_adam`
and the learning rate, so the decay is multiplied by the (scheduled) LR as in AdamW. The
recompute mechanism (plan, interval, optional ramp, active phase) is `_recompute.py`'s.

What the authors' code (github.com/hed-ucas/AlphaDecay, `WeightDecayUnbalance.py`) does, and
where we depart:

* every nn.Linear takes part if it has >= 50 eigenvalues (`min_eigenvalues`; our default 8 as
  in `scale_by_alpha_hill`, 50 in `ALPHA_DECAY_RELEASED`); embedding and head keep `wd`
  (the paper: the first and last layer). Their `remove_first_layer` drops the first visited Linear,
  which in their LLaMA is layer 0's `q_proj`, not the embedding (not visited there); we keep
  that matrix in (a departure without an option: it is an artefact of module order).
* norm scales (and biases) keep `wd`, as their "untuned" group does; pass `mask` to exclude
  them as optax's `adamw(mask=...)` would.
* recompute every 500 steps for the whole run, no ramp: our defaults too. Their first
  assignment is at optimizer construction (step 0) and then when `(step + 1) % 500 == 0`; ours
  at step 0 and every `interval` steps (one step earlier).
* ratios: class default 0.5 / 1.5 (our default); their released AdamW scripts use
  0.6666 / 5 (`ALPHA_DECAY_RELEASED`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from llr_optax import _alpha_hill, _per_leaf, _recompute, _scales, _spectral

# The authors' released AdamW scripts (github.com/hed-ucas/AlphaDecay, LLaMa-pretraining).
ALPHA_DECAY_RELEASED = dict(min_ratio=0.6666, max_ratio=5.0, interval=500, min_eigenvalues=50)


@_scales.register_alpha_state
class AddDecayedWeightsByAlphaHillState(NamedTuple):
  """State of `add_decayed_weights_by_alpha_hill` (fields as in `ScaleByAlphaHillState`).

  Attributes:
    count: number of updates applied so far (int32).
    decays: the weight decay coefficients the last update applied (`_per_leaf.PerLeaf`; read
      them as a tree with `current_weight_decays`).
    ramp_from: `[M]` the coefficients when each current ramp started.
    targets: `[M]` where the current ramps end.
    ramp_start: `[M]` int32, the step each current ramp started.
    alphas: the alphas of the last recompute (`last_alphas`).
  """
  count: jax.Array
  decays: _per_leaf.PerLeaf
  ramp_from: jax.Array
  targets: jax.Array
  ramp_start: jax.Array
  alphas: _per_leaf.PerLeaf


def add_decayed_weights_by_alpha_hill(
    weight_decay: float,
    min_ratio: float = 0.5,
    max_ratio: float = 1.5,
    interval: int = 500,
    ramp_steps: int = 0,
    total_steps: int | None = None,
    active_fraction: float = 1.0,
    labels: Any = None,
    *,
    mask: Any = None,
    matrix_axes: Any = None,
    min_eigenvalues: int = 8,
    fixed_decays: Mapping[str, float] | None = None,
    mapping_scope: str = "global",
    estimator: str = "auto",
    zero_threshold: float | None = None,
    spread: int = 1,
    strict: bool = False,
    mesh: Any = None,
) -> optax.GradientTransformation:
  """AlphaDecay: adds `wd_l * params` with a per-matrix `wd_l` mapped from its PL_Alpha_Hill.

  `wd_l = min_ratio * wd + (max_ratio - min_ratio) * wd * (alpha_l - alpha_min) /
  (alpha_max - alpha_min)` over the participating matrices (larger alpha, i.e. a lighter tail,
  gets stronger decay; equal min and max give `max_ratio * wd`, as `np.interp` does). Embedding
  and head (`fixed_decays`, default `wd`), norms, biases and matrices with fewer than
  `min_eigenvalues` eigenvalues keep `wd`. Alphas are recomputed at step 0 and every `interval`
  steps (while `step < active_fraction * total_steps`), optionally ramped as in
  `scale_by_alpha_hill`.

  Use it where `add_decayed_weights` sits in AdamW: between `scale_by_adam` and the learning
  rate (see `adamw_alpha_decay`). `update` needs `params`.

  Args:
    weight_decay: the base coefficient `wd`.
    min_ratio: `wd_l / wd` of the most heavy-tailed matrix.
    max_ratio: `wd_l / wd` of the least heavy-tailed matrix.
    interval: steps between recomputes (authors: 500).
    ramp_steps: soft switch length (authors: none, 0).
    total_steps: training length, for the active phase; None: recompute for ever (authors).
    active_fraction: recomputes start while `step < active_fraction * total_steps`.
    labels: label tree, callable params -> label tree, or None for `label_params(params)`.
    mask: as `optax.add_decayed_weights`: a tree or callable of booleans, True where decay
      applies (e.g. to exclude norm scales and biases).
    matrix_axes: see `scale_by_alpha_hill` and `infer_matrix_axes`.
    min_eigenvalues: matrices with fewer eigenvalues keep `wd` (authors: 50).
    fixed_decays: label or group -> pinned coefficient; default `{"embed": wd, "pos_embed": wd,
      "head": wd}` (the authors' code visits only Linear layers).
    mapping_scope: "global" (min/max over all participating matrices) or "label".
    estimator: see `esd`.
    zero_threshold: see `scale_by_alpha_hill` (authors: None, every eigenvalue counts).
    spread: see `scale_by_alpha_hill`.
    strict: see `scale_by_alpha_hill`.
    mesh: see `scale_by_alpha_hill`.

  Returns:
    An `optax.GradientTransformation` whose state is an `AddDecayedWeightsByAlphaHillState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, llr_optax
    >>> params = {"q_proj": jax.random.normal(jax.random.key(0), (16, 16)),
    ...           "up_proj": jax.random.t(jax.random.key(1), 2.0, (16, 48))}
    >>> tx = llr_optax.add_decayed_weights_by_alpha_hill(0.1)
    >>> zeros = jax.tree.map(jnp.zeros_like, params)
    >>> updates, state = tx.update(zeros, tx.init(params), params)
    >>> {k: round(float(v.squeeze()), 3) for k, v in llr_optax.current_weight_decays(state).items()}
    {'q_proj': 0.15, 'up_proj': 0.05}

  References:
    He et al., "AlphaDecay: Module-wise Weight Decay for Heavy-Tailed Balancing in LLMs", 2025,
    https://arxiv.org/abs/2506.14562 (code: github.com/hed-ucas/AlphaDecay).
  """
  weight_decay = _scales.check_positive("weight_decay", weight_decay)
  min_ratio = _scales.check_positive("min_ratio", min_ratio)
  max_ratio = _scales.check_positive("max_ratio", max_ratio)
  if not (_scales.is_traced(min_ratio) or _scales.is_traced(max_ratio)) and min_ratio > max_ratio:
    raise ValueError(f"min_ratio must be <= max_ratio, got {min_ratio} > {max_ratio}")
  interval = _scales.check_int("interval", interval, 1)
  ramp_steps = _scales.check_int("ramp_steps", ramp_steps, 0)
  if total_steps is not None:
    total_steps = _scales.check_int("total_steps", total_steps, 1)
  active_fraction = _scales.check_fraction("active_fraction", active_fraction)
  min_eigenvalues = _scales.check_int("min_eigenvalues", min_eigenvalues, 2, static=True)
  fixed_decays = _scales.check_scale_mapping(
      "fixed_decays",
      {"embed": weight_decay, "pos_embed": weight_decay, "head": weight_decay}
      if fixed_decays is None else fixed_decays)
  _alpha_hill.check_keys_now(fixed_decays, "fixed_decays", labels)
  if mapping_scope not in _alpha_hill.MAPPING_SCOPES:
    raise ValueError(f"mapping_scope must be one of {_alpha_hill.MAPPING_SCOPES}, "
                     f"got {mapping_scope!r}")
  if estimator not in _spectral.ESTIMATORS:
    raise ValueError(f"estimator must be one of {_spectral.ESTIMATORS}, got {estimator!r}")
  zero_threshold = _spectral._check_zero_threshold(zero_threshold)
  spread = _alpha_hill.check_spread(spread, interval)
  active_steps = _alpha_hill.active_steps_of(total_steps, active_fraction)

  def plan_of(params):
    return _recompute.make_plan(params, labels, matrix_axes, fixed_decays, min_eigenvalues,
                                strict=strict, what="add_decayed_weights_by_alpha_hill")

  def init_fn(params):
    plan = plan_of(params)
    fields = _recompute.init_fields(plan, weight_decay)
    return AddDecayedWeightsByAlphaHillState(
        count=jnp.zeros([], jnp.int32), decays=_per_leaf.PerLeaf(fields.values, plan.layout),
        ramp_from=fields.ramp_from, targets=fields.targets, ramp_start=fields.ramp_start,
        alphas=_per_leaf.PerLeaf(fields.alphas, plan.layout))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("add_decayed_weights_by_alpha_hill needs the current params: call "
                       "tx.update(updates, state, params).")
    plan = plan_of(params)
    fields = _recompute.Fields(state.decays.values, state.ramp_from, state.targets,
                               state.ramp_start, state.alphas.values)
    fields = _recompute.advance(
        fields, state.count, params, plan, lo=min_ratio * weight_decay,
        hi=max_ratio * weight_decay, default=weight_decay, interval=interval,
        ramp_steps=ramp_steps, active_steps=active_steps, spread=spread, scope=mapping_scope,
        estimator=estimator, zero_threshold=zero_threshold, mesh=mesh)
    decays = _per_leaf.PerLeaf(fields.values, plan.layout)
    leaves, treedef = jax.tree.flatten(updates)
    new = [(u + d * p).astype(u.dtype)
           for u, d, p in zip(leaves, decays.leaves(), treedef.flatten_up_to(params))]
    new_state = AddDecayedWeightsByAlphaHillState(
        count=optax.safe_increment(state.count), decays=decays, ramp_from=fields.ramp_from,
        targets=fields.targets, ramp_start=fields.ramp_start,
        alphas=_per_leaf.PerLeaf(fields.alphas, plan.layout))
    return jax.tree.unflatten(treedef, new), new_state

  tx = optax.GradientTransformation(init_fn, update_fn)
  return tx if mask is None else optax.masked(tx, mask)


def adamw_alpha_decay(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    min_ratio: float = 0.5,
    max_ratio: float = 1.5,
    interval: int = 500,
    *,
    mask: Any = None,
    **alpha_decay_kwargs: Any,
) -> optax.GradientTransformation:
  """`optax.adamw` with AlphaDecay's per-matrix weight decay in place of the uniform one.

  `chain(scale_by_adam(b1, b2, eps), add_decayed_weights_by_alpha_hill(weight_decay, ...),
  scale_by_learning_rate(learning_rate))`: with `min_ratio = max_ratio = 1` it is
  `optax.adamw` (same defaults). Further keyword arguments go to
  `add_decayed_weights_by_alpha_hill`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, llr_optax
    >>> params = {"w": jax.random.normal(jax.random.key(0), (16, 32))}
    >>> tx = llr_optax.adamw_alpha_decay(1e-3, weight_decay=0.1)
    >>> updates, state = tx.update(params, tx.init(params), params)
    >>> updates["w"].shape
    (16, 32)

  References:
    He et al., "AlphaDecay: Module-wise Weight Decay for Heavy-Tailed Balancing in LLMs", 2025,
    https://arxiv.org/abs/2506.14562
  """
  return optax.chain(
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      add_decayed_weights_by_alpha_hill(weight_decay, min_ratio, max_ratio, interval, mask=mask,
                                        **alpha_decay_kwargs),
      optax.scale_by_learning_rate(learning_rate),
  )
