"""The heavy-tailed (HT-SR) recompute mechanism shared by the alpha-driven transformations.

`scale_by_alpha_hill` (LR factors, LLR) and `add_decayed_weights_by_alpha_hill` (weight decay,
AlphaDecay) both keep one value per weight matrix that is driven by the matrix's PL_Alpha_Hill:

1. a static *plan* (trace time) says which leaves take part (matrix leaves with enough
   eigenvalues), which are pinned (embedding, head) and which keep a default value, and warns
   about leaves the user expects to take part that do not;
2. every `interval` steps (while active) the alphas are recomputed inside the jitted update,
   behind one `lax.cond` - optionally spread over `spread` consecutive steps, one slice of the
   matrices per step, so no single step pays for the whole eigensolve;
3. the alphas are mapped linearly onto `[lo, hi]` (min/max over the participating matrices, or
   per label), larger alpha -> larger value, as the authors' `np.interp`;
4. each recomputed value ramps linearly from its applied value to its new target over
   `ramp_steps` steps (the "soft switch"); the very first targets apply at once.

All per-value quantities are flat `[M]` vectors in the params' flattening order (`_per_leaf`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from llr_optax import _labels, _matrix_axes, _per_leaf, _scales, _sharded

# Labels whose leaves a user expects to take part; a leaf with one of them that does not is
# reported (warning, or error with strict=True).
EXPECTED_LABELS = ("attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv", "mlp_gate", "mlp_up",
                   "mlp_down", "expert")


class Plan(NamedTuple):
  """Static view of the params: layout of the per-value vectors and who takes part."""
  layout: _per_leaf.Layout
  paths: list[str]
  labels: list[str]
  axes: list[Any]                # MatrixAxes of participating leaves, else None
  fixed: list[Any]               # pinned value of a leaf (e.g. embedding), else None
  skipped: list[tuple[str, str]]  # (path, reason) of expected leaves that take no part

  def members(self) -> np.ndarray:
    """`[M]` bool: values that belong to participating matrices."""
    mask = np.zeros(self.layout.size, bool)
    for i, axes in enumerate(self.axes):
      if axes is not None:
        mask[self.layout.offsets[i]:self.layout.offsets[i + 1]] = True
    return mask


def _why_not(shape, label, axes, min_eigenvalues) -> str | None:
  """Why a leaf with these axes takes no part (None if it can)."""
  if axes is None:
    return f"shape {list(shape)} is not read as a matrix"
  b, m, n = _matrix_axes.matrix_shape(shape, axes)
  if min(m, n) < min_eigenvalues:
    what = f"{b} matrices" if b != 1 else "1 matrix"
    return (f"shape {list(shape)} is read as {what} of {m}x{n}: {min(m, n)} eigenvalues "
            f"< min_eigenvalues={min_eigenvalues}")
  return None


def _hint(leaves: list[tuple[tuple[int, ...], Any]]) -> str:
  """What to do about skipped leaves: name matrix axes when a layout may be misread (a stacked
  leaf, or one of rank >= 2 not read as a matrix), else point at min_eigenvalues."""
  misread = any((axes is None and len(shape) >= 2)
                or (axes is not None and _matrix_axes.matrix_shape(shape, axes)[0] > 1)
                for shape, axes in leaves)
  if misread:
    return ("(a scanned or stacked layout needs matrix_axes, e.g. "
            "llr_optax.infer_matrix_axes(params, layer_axis=...); strict=True makes this an error)")
  return "(lower min_eigenvalues to include them; strict=True makes this an error)"


def make_plan(params: Any, labels: Any, matrix_axes: Any, fixed: Mapping[str, Any],
              min_eigenvalues: int, *, strict: bool = False, what: str = "") -> Plan:
  """The plan of `params`.

  Args:
    params: the params (may hold `MaskedNode`s; an `optax.tree.map_params` placeholder, which has
      no leaves, gives an empty plan).
    labels, matrix_axes: as the transformations take them.
    fixed: label or group -> pinned value (a single label wins over its group); keys that are
      neither a known label, a group, nor a label of this tree raise.
    min_eigenvalues: matrices with fewer eigenvalues take no part.
    strict: raise instead of warning when an expected leaf takes no part.
    what: the transformation's name, for messages.
  """
  leaves, treedef = jax.tree.flatten(params)
  if not leaves:
    return Plan(_per_leaf.Layout(treedef, []), [], [], [], [], [])
  label_tree = _labels.resolve_labels(labels, params)
  axes_tree = _matrix_axes.resolve_matrix_axes(matrix_axes, params, label_tree)
  label_list = treedef.flatten_up_to(label_tree)
  axes_list = treedef.flatten_up_to(axes_tree)
  owner = _labels.expand_label_keys(list(fixed), f"{what} fixed values",
                                    sorted(set(label_list)))
  paths = [_labels.path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  shapes, pinned, take_part, skipped, skipped_layouts = [], [], [], [], []
  for path, x, label, axes in zip(paths, leaves, label_list, axes_list):
    shapes.append(_matrix_axes.per_matrix_shape(x.shape, axes))
    value = fixed[owner[label]] if label in owner else None
    pinned.append(value)
    reason = _why_not(x.shape, label, axes, min_eigenvalues)
    take_part.append(axes if reason is None and value is None else None)
    if reason is not None and value is None and label in EXPECTED_LABELS:
      skipped.append((path, reason))
      skipped_layouts.append((x.shape, axes))
  if skipped:
    message = (f"{what}: {len(skipped)} leaves labelled attention/MLP/expert take no part and keep "
               "the default value: " + "; ".join(f"{p}: {r}" for p, r in skipped) + " "
               + _hint(skipped_layouts))
    if strict:
      raise ValueError(message)
    # Same text, same place: Python shows it once per session, however often we trace.
    warnings.warn(message, UserWarning, stacklevel=2)
  return Plan(_per_leaf.Layout(treedef, shapes), paths, label_list, take_part, pinned, skipped)


def initial_values(plan: Plan, default: Any) -> jax.Array:
  """`[M]` float32: pinned values where pinned, `default` elsewhere.

  A NumPy constant when the values are concrete (the usual case: nothing to compute in the
  jitted update); a traced vector under a jitted `optax.inject_hyperparams`."""
  values = [default if f is None else f for f in plan.fixed]
  if any(_scales.is_traced(v) for v in values):
    parts = [jnp.full((math.prod(s),), v, jnp.float32) for s, v in zip(plan.layout.shapes, values)]
    return jnp.concatenate(parts) if parts else jnp.zeros((0,), jnp.float32)
  sizes = [math.prod(s) for s in plan.layout.shapes]
  return np.repeat(np.asarray(values, np.float32), sizes) if sizes else np.zeros(0, np.float32)


# --- which matrices each step of a spread recompute solves -------------------------------------

Chunk = list[tuple[int, int, int]]  # (leaf index, first matrix, end matrix) of the leaf's stack


def chunks(params: Any, plan: Plan, n: int) -> list[Chunk]:
  """Splits the participating matrices into `<= n` contiguous chunks of about equal solve cost
  (`~k^3` for a `k x k` Gram matrix), in leaf order, so a chunk is a few batched solves."""
  leaves = plan.layout.treedef.flatten_up_to(params)
  items = []  # (leaf, matrix index, cost)
  for i, axes in enumerate(plan.axes):
    if axes is not None:
      b, m, k = _matrix_axes.matrix_shape(leaves[i].shape, axes)
      items += [(i, j, float(min(m, k)) ** 3) for j in range(b)]
  if not items:
    return [[]]
  total, spent, out = sum(c for *_, c in items), 0.0, [[]]
  for leaf, j, cost in items:
    if out[-1] and len(out) < n and spent >= total * len(out) / n:
      out.append([])  # this chunk has its share of the cost
    current = out[-1]
    if current and current[-1][0] == leaf and current[-1][2] == j:
      current[-1] = (leaf, current[-1][1], j + 1)  # extend the slice of the same stack
    else:
      current.append((leaf, j, j + 1))
    spent += cost
  return out


def chunk_stats(params: Any, plan: Plan, chunk: Chunk, estimator: str, zero_threshold: Any,
                mesh: Any) -> tuple[np.ndarray, jax.Array]:
  """Spectral stats of one chunk's matrices: (`[c]` value indices, `[c, len(STATS)]` stats)."""
  leaves = plan.layout.treedef.flatten_up_to(params)
  stacks, index = [], []
  for leaf, lo, hi in chunk:
    stacks.append(_matrix_axes.to_matrices(leaves[leaf], plan.axes[leaf])[lo:hi])
    index.append(plan.layout.offsets[leaf] + np.arange(lo, hi))
  if not stacks:
    return np.zeros((0,), np.int32), jnp.zeros((0, 4), jnp.float32)
  stats = _sharded.grouped_spectral_stats(stacks, estimator, zero_threshold, mesh)
  return np.concatenate(index), jnp.concatenate(stats, axis=0)


def map_linear(alphas: jax.Array, plan: Plan, lo: Any, hi: Any, scope: str) -> jax.Array:
  """Linear map of alphas onto `[lo, hi]` over the participating matrices (NaN elsewhere).

  `scope="global"`: min/max over all of them (the papers' default); `"label"`: per label.
  Non-finite alphas do not enter min/max and map to NaN. Equal min and max map to `hi`, as the
  authors' `np.interp` returns its right endpoint.
  """
  members = plan.members()
  out = jnp.full_like(alphas, jnp.nan)
  if scope == "global":
    groups = [np.flatnonzero(members)]
  else:
    value_labels = np.repeat(np.asarray(plan.labels, object),
                             np.diff(np.asarray(plan.layout.offsets)))
    groups = [np.flatnonzero(members & (value_labels == l)) for l in sorted(set(plan.labels))]
  for idx in groups:
    if idx.size == 0:
      continue
    a = alphas[idx]
    a_lo, a_hi = jnp.nanmin(a), jnp.nanmax(a)
    span = a_hi - a_lo
    frac = jnp.where(span > 0, (a - a_lo) / jnp.where(span > 0, span, 1.0), 1.0)
    out = out.at[idx].set(jnp.where(jnp.isfinite(a), lo + (hi - lo) * frac, jnp.nan))
  return out


def ramp(count: jax.Array, ramp_from: jax.Array, targets: jax.Array, ramp_start: jax.Array,
         ramp_steps: Any) -> jax.Array:
  """Applied values: linear from `ramp_from` (at `ramp_start`) to `targets` over `ramp_steps`;
  `ramp_steps = 0` is a hard switch (the targets apply from `ramp_start` on)."""
  elapsed = (count - ramp_start).astype(jnp.float32)
  w = jnp.where(ramp_steps > 0, jnp.clip(elapsed / jnp.maximum(ramp_steps, 1), 0.0, 1.0), 1.0)
  return ramp_from + w * (targets - ramp_from)


class Fields(NamedTuple):
  """The per-value state of an alpha-driven transformation (all `[M]`)."""
  values: jax.Array      # applied in the last update
  ramp_from: jax.Array
  targets: jax.Array
  ramp_start: jax.Array  # int32: the step each value's current ramp started
  alphas: jax.Array      # last recomputed alphas (NaN: not computed / no finite alpha)


def init_fields(plan: Plan, default: Any) -> Fields:
  # Separate device buffers per field: a state whose leaves alias cannot be donated.
  fresh = lambda: jnp.array(initial_values(plan, default), jnp.float32)
  return Fields(values=fresh(), ramp_from=fresh(), targets=fresh(),
                ramp_start=jnp.zeros((plan.layout.size,), jnp.int32),
                alphas=jnp.full((plan.layout.size,), jnp.nan, jnp.float32))


def advance(fields: Fields, count: jax.Array, params: Any, plan: Plan, *, lo, hi, default,
            interval, ramp_steps, active_steps, spread: int, scope: str, estimator: str,
            zero_threshold, mesh) -> Fields:
  """One step of the mechanism: recompute (a chunk of) the alphas when due, then ramp.

  Values that no alpha drives (pinned ones, and `default` for leaves that take no part) are set
  from the current hyperparameters at every step: under `optax.inject_hyperparams` they may
  change during the run (e.g. `s_max`, which pins the embedding, or AlphaDecay's `wd`)."""
  parts = chunks(params, plan, spread)
  position = count % interval
  due = position < len(parts)
  if active_steps is not None:
    due = due & (count - position < active_steps)

  def recompute(fields: Fields) -> Fields:
    def solve_chunk(k):
      def branch(alphas):
        index, stats = chunk_stats(params, plan, parts[k], estimator, zero_threshold, mesh)
        in_chunk = np.zeros(plan.layout.size, bool)
        in_chunk[index] = True
        return alphas.at[index].set(stats[:, 0]), jnp.asarray(in_chunk)
      return branch

    branches = [solve_chunk(k) for k in range(len(parts))]
    if len(branches) == 1:
      alphas, in_chunk = branches[0](fields.alphas)
    else:
      alphas, in_chunk = jax.lax.switch(jnp.minimum(position, len(parts) - 1), branches,
                                        fields.alphas)
    mapped = map_linear(alphas, plan, lo, hi, scope)
    # A matrix without a finite alpha keeps its applied value (in the recomputed chunk) or its
    # target (elsewhere); pinned and default values never change.
    held = jnp.where(in_chunk, fields.values, fields.targets)
    targets = jnp.where(jnp.isfinite(mapped), mapped, held)
    # The first targets apply at once: there is no earlier alpha-driven value to ramp from.
    first = count - position == 0
    ramp_from = jnp.where(in_chunk, jnp.where(first, targets, fields.values), fields.ramp_from)
    ramp_start = jnp.where(in_chunk, count, fields.ramp_start).astype(jnp.int32)
    return fields._replace(ramp_from=ramp_from, targets=targets, ramp_start=ramp_start,
                           alphas=alphas)

  fields = jax.lax.cond(due, recompute, lambda f: f, fields)
  values = ramp(count, fields.ramp_from, fields.targets, fields.ramp_start, ramp_steps)
  values = jnp.where(plan.members(), values, initial_values(plan, default))
  return fields._replace(values=values)
