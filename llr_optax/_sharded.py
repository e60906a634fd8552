"""Mesh-aware ESD: spread the eigenvalue solves of many weight matrices over all devices.

With the params sharded (FSDP, tensor parallel, stacked layers over a mesh axis), the plain
`grouped_matrix_alphas` leaves the layout to XLA, which (as compiled by jax 0.10 on CPU)
all-gathers the full Gram stack onto every device before the eigensolver, so every device solves
every matrix; for a weight whose kept side is sharded (a wide `[d, f]` kernel under FSDP
`P("fsdp", None)`, or a tall one split over its columns) it also all-gathers the full weight.
Under Explicit axis types `gram` of such a weight is rejected outright (its product would be
sharded twice over one mesh axis).

Here, per group of Gram matrices of equal size `k`, one `shard_map` over ALL (non-manual) mesh
axes does:

1. each stack `[b, m, n]` is oriented so that the contraction runs over its larger side `c`
   (`[b, c, k]`) and laid out with `c` split over all devices (zero rows padded where `c` does
   not divide; zero rows do not change the Gram). Moving a weight into this layout is an
   all-to-all / local slice / collective-permute of `1 / devices` of it, never an all-gather;
2. each device forms its partial Gram matrices `x_c^T x_c` of every stack of the group;
3. they are concatenated, padded with zero matrices to a multiple of the device count, and
   summed with `psum_scatter` over the batch: a reduce-scatter of `k x k` matrices that leaves
   each device its share of complete Gram matrices;
4. each device runs the local eigenvalue solver and Hill fit on its share;
5. the alphas come back batch-sharded; the padded ones are dropped (only the `B` scalars are
   gathered).

Without a mesh, or with one device, it is exactly `_spectral.grouped_matrix_alphas`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from llr_optax import _spectral


def resolve_mesh(mesh: Any = None):
  """The mesh to spread the solves over, or None for the local solve.

  Args:
    mesh: a `jax.sharding.Mesh`/`AbstractMesh`; None for the context mesh (`jax.set_mesh`),
      if any; False for always local.

  Returns:
    The mesh, or None when there is none or it has fewer than 2 devices on non-manual axes.
  """
  if mesh is False:
    return None
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or _num_devices(mesh, _solve_axes(mesh)) < 2:
    return None
  return mesh


def _solve_axes(mesh) -> tuple[str, ...]:
  """Mesh axes the solves are spread over: all of them but the manual ones (inside shard_map)."""
  return tuple(name for name, kind in zip(mesh.axis_names, mesh.axis_types)
               if kind != AxisType.Manual)


def _num_devices(mesh, axes) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def _explicit(x) -> bool:
  """Whether `x`'s type carries Explicit mesh axes (then layouts must be changed by `reshard`)."""
  aval_mesh = jax.typeof(x).sharding.mesh
  return not aval_mesh.empty and AxisType.Explicit in aval_mesh.axis_types


def _sharding(mesh, spec):
  return NamedSharding(mesh, spec) if isinstance(mesh, jax.sharding.Mesh) else spec


def _reshard(x, mesh, spec):
  """Lays `x` out as `spec` when its type is Explicit (shard_map does it itself under Auto)."""
  return jax.sharding.reshard(x, _sharding(mesh, spec)) if _explicit(x) else x


def _replicated(x, mesh):
  """Gathers a (small) result onto every device and keeps XLA from spreading its sharding."""
  if _explicit(x):
    return jax.sharding.reshard(x, _sharding(mesh, P()))
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P()))


def _pad_rows(x, pad: int, axis: int):
  """Zero-pads `axis` at its end. Under Auto axes a concatenation: XLA all-gathers a sharded
  operand of `jnp.pad`, but not of a concatenation; Explicit axes reject the concatenation
  of differently sharded operands, and pad without any all-gather."""
  if not pad:
    return x
  if _explicit(x):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)
  shape = list(x.shape)
  shape[axis] = pad
  return jnp.concatenate([x, jnp.zeros(shape, x.dtype)], axis=axis)


def _local_fit(estimator: str, zero_threshold):
  """`grams [b, k, k] -> stats [b, len(STATS)]` on one device's share.

  On CPU, one matrix per solver call (`lax.map`): jaxlib's batched LAPACK kernels split a batch
  over the shared intra-op thread pool and block until it is done, which deadlocks when several
  devices of one host (e.g. `--xla_force_host_platform_device_count`) call them at once.
  """
  one = lambda g: _spectral.fit_spectra(g, estimator, zero_threshold)
  if jax.default_backend() != "cpu":
    return one
  return lambda g: jax.lax.map(one, g)


def _contraction_axes(x, axes: tuple[str, ...]) -> tuple[str, ...]:
  """Order of the mesh axes that split the contraction side (axis 1) of an oriented stack.

  Axes that already split that side come first (then moving into the layout is a local slice);
  the order does not change the result: partial Grams are summed over all devices anyway.
  """
  if not _explicit(x):
    return axes
  spec = tuple(jax.typeof(x).sharding.spec)
  entry = spec[1] if len(spec) > 1 else None
  have = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  first = tuple(a for a in have if a in axes)
  return first + tuple(a for a in axes if a not in first)


def _oriented(stack: jax.Array) -> jax.Array:
  """`[b, m, n] -> [b, c, k]` with `c >= k`: the Gram is `x^T x`, as `_spectral.gram` chooses."""
  return stack if stack.shape[-2] >= stack.shape[-1] else jnp.swapaxes(stack, -1, -2)


def sharded_solve(mesh: Any = None, estimator: str = "auto", zero_threshold=None):
  """A `solve` for `grouped_matrix_alphas`: `grams [B, k, k] -> alphas [B]`, batch over devices.

  The Gram stack is padded with zero matrices to a multiple of the device count, split along
  its batch axis over all mesh axes, solved locally on each device, and the padded alphas are
  dropped. Use it when the Gram matrices are already formed; `grouped_matrix_alphas` below also
  forms them where the weights live. Without a mesh (or with one device) it is the local solve.
  """
  estimator = _spectral._check_estimator(estimator)
  fit = _local_fit(estimator, zero_threshold)
  local = lambda g: fit(g)[:, 0]

  def solve(grams: jax.Array) -> jax.Array:
    m = resolve_mesh(mesh)
    if m is None:
      return local(grams)
    axes = _solve_axes(m)
    batch = grams.shape[0]
    pad = -batch % _num_devices(m, axes)
    grams = _pad_rows(grams, pad, 0)  # zero matrices: their alphas are NaN and are dropped below
    grams = _reshard(grams, m, P(axes))
    alphas = jax.shard_map(local, mesh=m, in_specs=P(axes), out_specs=P(axes))(grams)
    return _replicated(alphas, m)[:batch]

  return solve


def grouped_spectral_stats(stacks: Sequence[jax.Array], estimator: str = "auto",
                           zero_threshold=None, mesh: Any = None) -> list[jax.Array]:
  """`_spectral.grouped_spectral_stats`, spread over the devices of `mesh` (see module doc).

  Args:
    stacks: matrix stacks `[b_i, m_i, n_i]`, laid out however the params are.
    estimator: see `_spectral.esd`; "svd" (the cross-check path) always runs locally.
    zero_threshold: see `_spectral.hill_alpha`.
    mesh: see `resolve_mesh`; resolved at trace time.

  Returns:
    One float32 `[b_i, len(STATS)]` array per input stack, replicated.
  """
  m = resolve_mesh(mesh)
  estimator = _spectral._check_estimator(estimator)
  if m is None or estimator == "svd":
    return _spectral.grouped_spectral_stats(stacks, estimator, zero_threshold)
  axes = _solve_axes(m)
  ndev = _num_devices(m, axes)
  local = _local_fit(estimator, zero_threshold)

  by_size: dict[int, list[int]] = {}
  for idx, s in enumerate(stacks):
    by_size.setdefault(min(s.shape[-2:]), []).append(idx)
  out: list[jax.Array | None] = [None] * len(stacks)
  for k, members in by_size.items():
    xs, specs = [], []
    for j in members:
      x = _oriented(stacks[j])
      x = _pad_rows(x, -x.shape[1] % ndev, 1)
      spec = P(None, _contraction_axes(x, axes), None)
      xs.append(_reshard(x, m, spec))
      specs.append(spec)
    sizes = [stacks[j].shape[0] for j in members]
    total = sum(sizes)
    padded = total + (-total % ndev)

    def body(*local_xs, padded=padded):
      xs_ = [x.astype(_spectral.working_dtype(x)) for x in local_xs]
      parts = [jnp.einsum("bck,bcl->bkl", jnp.conj(x), x, precision=jax.lax.Precision.HIGHEST)
               for x in xs_]
      g = jnp.concatenate(parts, axis=0)
      if padded > g.shape[0]:  # zero matrices: their stats are NaN and are dropped below
        g = jnp.concatenate([g, jnp.zeros((padded - g.shape[0], k, k), g.dtype)], axis=0)
      g = jax.lax.psum_scatter(g, axes, scatter_dimension=0, tiled=True)
      return local(g)

    stats = jax.shard_map(body, mesh=m, in_specs=tuple(specs), out_specs=P(axes))(*xs)
    stats = _replicated(stats, m)
    start = 0
    for j, size in zip(members, sizes):
      out[j] = stats[start:start + size]
      start += size
  return out


def grouped_matrix_alphas(stacks: Sequence[jax.Array], estimator: str = "auto",
                          zero_threshold=None, mesh: Any = None) -> list[jax.Array]:
  """The alphas of `grouped_spectral_stats`: one float32 `[b_i]` vector per stack."""
  return [s[:, 0] for s in grouped_spectral_stats(stacks, estimator, zero_threshold, mesh)]
