"""`relative_schedule`: decoupled relative learning-rate schedules per module type (RLRS).

Module type `m` runs `eta_m(t) = eta * (a_m c(t) + f b_m (1 - c(t)))`, where `c(t)` is the
cosine progress after warmup. The base optimizer runs the matching cosine
`eta(t) = eta * (c(t) + f (1 - c(t)))` (`relative_base_schedule` builds it, with the same
warmup), so the factor chained after it is the ratio `r_m(t) = eta_m(t) / eta(t)`. Formulas:
docs/methods.md.

The paper defines `c(t)` on the cosine. Any other progress `c(t)` going from 1 to 0 gives the same
construction on another base schedule: `progress=` takes it, e.g. `wsd_progress` for a
warmup-stable-decay schedule (1 until the decay starts, then linear to 0), so a module's LR moves
from `a_m` to `f b_m` times the peak during the decay only. Blockwise LR's authors do exactly this
on their WSD runs (every block decays to the common floor along the base schedule).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from llr_optax import _labels, _per_leaf, _scales

# Paper, Table 5 (dense): label or group -> (start multiplier a_m, end multiplier b_m).
DENSE_MULTIPLIERS: Mapping[str, tuple[float, float]] = {
    "embed": (5.0, 0.6), "head": (1.0, 0.4), "mlp": (1.0, 0.6), "attn": (1.0, 0.2)}
DENSE_FINAL_FRACTION = 0.06
# Paper, Table 4 (mixture of experts).
MOE_MULTIPLIERS: Mapping[str, tuple[float, float]] = {
    "embed": (5.0, 0.6), "head": (0.6, 0.4), "router": (0.6, 1.0), "expert": (0.3, 1.125),
    "attn": (1.0, 1.0)}
MOE_FINAL_FRACTION = 0.04
# Blockwise LR (Wang et al. 2025, "The Sharpness Disparity Principle", the LLR paper's
# "Sharpness" baseline): peak-LR ratios norm 1, value/output 4, FFN 6, query/key 8, embedding 10
# (their README; their code takes each block's peak LR as a flag). In their code every block
# decays to the SAME floor `min_lr` (base/20 in their OpenWebText cosine runs), so a block's LR
# is `min_lr + c(t) (r base - min_lr)`: exactly `relative_schedule` with `(start, end) = (r, 1)`.
# Not in the table (factor 1, as their flags' defaults): an untied head (no tuned value is
# published), position embeddings, biases, router and experts (no MoE in the paper). A fused qkv
# kernel needs per-column ratios (they split GPT-2's `c_attn` into q/k/v for this): split it.
BLOCKWISE_MULTIPLIERS: Mapping[str, tuple[float, float]] = {
    "embed": (10.0, 1.0), "attn_q": (8.0, 1.0), "attn_k": (8.0, 1.0), "attn_v": (4.0, 1.0),
    "attn_o": (4.0, 1.0), "mlp": (6.0, 1.0), "norm": (1.0, 1.0)}
BLOCKWISE_FINAL_FRACTION = 0.05
# Paper: warmup over 1% of the steps.
WARMUP_FRACTION = 0.01


@_scales.register_scale_state
class RelativeScheduleState(NamedTuple):
  """State of `relative_schedule`.

  Attributes:
    count: number of updates applied so far (int32).
    scales: the per-leaf factors `r_m(t)` the last update applied (a `_per_leaf.PerLeaf`: one
      float32 vector, one entry per leaf; `current_scales` reads it as a params-shaped tree).
  """
  count: jax.Array
  scales: _per_leaf.PerLeaf


def _validate(total_steps, final_fraction, warmup_steps):
  total_steps = _scales.check_int("total_steps", total_steps, 1)
  final_fraction = _scales.check_positive("final_fraction", final_fraction)
  warmup_steps = _scales.check_int("warmup_steps", warmup_steps, 0)
  if not (_scales.is_traced(total_steps) or _scales.is_traced(warmup_steps)) and (
      warmup_steps >= total_steps):
    raise ValueError(f"warmup_steps must be < total_steps, got {warmup_steps} >= {total_steps}")
  return total_steps, final_fraction, warmup_steps


def cosine_progress(step: jax.Array, total_steps: int, warmup_steps: int = 0) -> jax.Array:
  """`c(t)`: 1 during warmup, then `(1 + cos(pi p)) / 2` with p going 0 -> 1 until total_steps.

  Matches `optax.warmup_cosine_decay_schedule(..., warmup_steps, decay_steps=total_steps)`.
  """
  decay = jnp.maximum(total_steps - warmup_steps, 1)
  p = jnp.clip((jnp.asarray(step, jnp.float32) - warmup_steps) / decay, 0.0, 1.0)
  return 0.5 * (1.0 + jnp.cos(jnp.pi * p))


def wsd_progress(step: jax.Array, total_steps: int, decay_steps: int) -> jax.Array:
  """`c(t)` of a warmup-stable-decay (WSD) schedule: 1 until `total_steps - decay_steps`, then
  linear down to 0 at `total_steps`.

  With `relative_base_schedule(..., progress=...)` the LR warms up linearly to the peak, stays
  there until the decay starts, then falls linearly to `final_fraction * peak` over the last
  `decay_steps` steps (the warmup lies inside the stable phase, where `c = 1`). Returns a float32
  array; does not validate its arguments.

  Example:
    >>> import llr_optax
    >>> [round(float(llr_optax.wsd_progress(t, 100, 20)), 3) for t in (0, 80, 90, 100)]
    [1.0, 1.0, 0.5, 0.0]
  """
  start = total_steps - decay_steps
  p = jnp.clip((jnp.asarray(step, jnp.float32) - start) / max(decay_steps, 1), 0.0, 1.0)
  return 1.0 - p


def relative_base_schedule(peak_lr: float, total_steps: int, final_fraction: float,
                           warmup_steps: int = 0,
                           progress: Callable[[jax.Array], jax.Array] | None = None
                           ) -> optax.Schedule:
  """The base LR `eta(t)` that `relative_schedule` with the same arguments assumes.

  Linear warmup from 0 to `peak_lr`, then `peak_lr * (c(t) + f (1 - c(t)))`: with the default
  cosine progress, cosine down to `final_fraction * peak_lr` at `total_steps`. Build both from
  the same numbers so they cannot disagree.

  Args:
    peak_lr: the peak LR.
    total_steps: training length.
    final_fraction: `f`, the final LR as a fraction of the peak.
    warmup_steps: linear warmup length.
    progress: `step -> c(t)` in [0, 1], 1 at the end of warmup (None: `cosine_progress`), e.g.
      `lambda t: wsd_progress(t, T, D)`.

  Example:
    >>> import llr_optax
    >>> sched = llr_optax.relative_base_schedule(1e-3, total_steps=100, final_fraction=0.06)
    >>> round(float(sched(0)), 8), round(float(sched(100)), 8)
    (0.001, 6e-05)
  """
  total_steps, final_fraction, warmup_steps = _validate(total_steps, final_fraction, warmup_steps)
  peak_lr = _scales.check_positive("peak_lr", peak_lr)
  if progress is None:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps, decay_steps=total_steps,
        end_value=peak_lr * final_fraction)
  _check_progress(progress)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    c = progress(step)
    decayed = peak_lr * (c + final_fraction * (1.0 - c))
    if warmup_steps == 0:
      return decayed
    return jnp.where(step < warmup_steps, peak_lr * step / warmup_steps, decayed)

  return schedule


def _check_progress(progress):
  if not callable(progress):
    raise ValueError(f"progress must be a callable step -> c(t), got {progress!r}")


def relative_schedule(
    multipliers: Mapping[str, tuple[float, float]],
    total_steps: int,
    final_fraction: float,
    warmup_steps: int = 0,
    labels: Any = None,
    progress: Callable[[jax.Array], jax.Array] | None = None,
) -> optax.GradientTransformation:
  """Per-module relative LR schedules (RLRS), chained after a base optimizer on the cosine.

  Each leaf labelled `m` is scaled by
  `r_m(t) = (a_m c(t) + f b_m (1 - c(t))) / (c(t) + f (1 - c(t)))`, so that with the base LR
  `relative_base_schedule(eta, total_steps, f, warmup_steps)` its effective LR is
  `eta_m(t) = eta (a_m c(t) + f b_m (1 - c(t)))`. Leaves whose label has no multiplier keep 1.

  Args:
    multipliers: label or group ("attn", "mlp") -> `(a_m, b_m)`, e.g. `DENSE_MULTIPLIERS`.
    total_steps: training length `T` (the cosine reaches its end here).
    final_fraction: `f`, the base schedule's final LR as a fraction of its peak (paper: 0.06
      dense, 0.04 MoE).
    warmup_steps: linear warmup length (paper: 1% of steps); `r_m = a_m` during warmup.
    labels: label tree, callable params -> label tree, or None for `label_params(params)`.
    progress: `step -> c(t)` (None: `cosine_progress(step, total_steps, warmup_steps)`, the
      paper's); pass the same one to `relative_base_schedule`, e.g. `wsd_progress` for a
      warmup-stable-decay base schedule.

  Returns:
    An `optax.GradientTransformation` whose state is a `RelativeScheduleState`.

  Example:
    >>> import jax.numpy as jnp, optax, llr_optax
    >>> steps = 1000
    >>> base = llr_optax.relative_base_schedule(3e-4, steps, llr_optax.DENSE_FINAL_FRACTION, 10)
    >>> tx = optax.chain(optax.adamw(base, weight_decay=0.1),
    ...                  llr_optax.relative_schedule(llr_optax.DENSE_MULTIPLIERS, steps,
    ...                                              llr_optax.DENSE_FINAL_FRACTION, 10))
    >>> params = {"embed_tokens": jnp.ones((8, 4)), "q_proj": jnp.ones((4, 4))}
    >>> state = tx.init(params)
    >>> _, state = tx.update(params, state, params)
    >>> {k: float(v) for k, v in llr_optax.current_scales(state).items()}
    {'embed_tokens': 5.0, 'q_proj': 1.0}

  References:
    Ludziejewski et al., "Decoupled Relative Learning Rate Schedules", 2025,
    https://arxiv.org/abs/2507.03526
  """
  total_steps, final_fraction, warmup_steps = _validate(total_steps, final_fraction, warmup_steps)
  if not isinstance(multipliers, Mapping) or not multipliers:
    raise ValueError("multipliers must be a non-empty mapping label -> (start, end)")
  table = {}
  for key, pair in multipliers.items():
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
      raise ValueError(f"multipliers[{key!r}] must be a (start, end) pair, got {pair!r}")
    table[key] = (_scales.check_positive(f"multipliers[{key!r}][0]", pair[0]),
                  _scales.check_positive(f"multipliers[{key!r}][1]", pair[1]))
  if labels is None or not callable(labels):  # else checked once the labels are known
    _labels.expand_label_keys(list(table), "multipliers", _labels.labels_in(labels))
  if progress is None:
    progress = functools.partial(cosine_progress, total_steps=total_steps,
                                 warmup_steps=warmup_steps)
  else:
    _check_progress(progress)

  def factors(count, params):
    leaves, treedef = jax.tree.flatten(params)
    if not leaves:  # `optax.tree.map_params`' placeholder
      return _per_leaf.PerLeaf.from_leaves([], _per_leaf.Layout(treedef, []))
    label_list = treedef.flatten_up_to(_labels.resolve_labels(labels, params))
    owner = _labels.expand_label_keys(list(table), "multipliers", sorted(set(label_list)))
    c = progress(count)
    base = c + final_fraction * (1.0 - c)

    def one(label):
      if label not in owner:
        return jnp.ones([], jnp.float32)
      a, b = table[owner[label]]
      return (a * c + final_fraction * b * (1.0 - c)) / base

    return _per_leaf.PerLeaf.from_leaves([one(l) for l in label_list],
                                         _per_leaf.Layout(treedef, [()] * len(leaves)))

  def init_fn(params):
    zero = jnp.zeros([], jnp.int32)
    return RelativeScheduleState(count=zero, scales=factors(zero, params))

  def update_fn(updates, state, params=None):
    del params  # the labels come from the updates' key paths (same structure as the params)
    scales = factors(state.count, updates)
    new_state = RelativeScheduleState(count=optax.safe_increment(state.count), scales=scales)
    return _scales.apply_scales(updates, scales), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def warmup_steps_for(total_steps: int, fraction: float = WARMUP_FRACTION) -> int:
  """The paper's warmup length: `fraction` of the steps, at least 1 when training at all."""
  return max(1, math.ceil(fraction * total_steps)) if total_steps > 1 else 0
