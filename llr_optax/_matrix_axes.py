"""Which axes of a leaf form its weight matrix (or matrices).

A scanned transformer stores `L` layers' kernels in one `[L, d_in, d_out]` leaf; an attention
kernel may be `[embed, heads, head_dim]`. We describe a leaf the same way `optax.contrib.muon`
does, with `MuonDimensionNumbers(reduction_axis, output_axis)`: the named axes (several are
flattened together) form the matrix, every other axis is a batch of independent matrices. So a
user can hand the very same tree to muon and to our transformations.

Per-matrix quantities (alpha, scale) are stored with the leaf's shape where the matrix axes are
set to 1, so applying a scale is a plain broadcast multiply.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from optax.contrib import MuonDimensionNumbers as MatrixAxes

# Labels that are never matrices, whatever their rank.
_NON_MATRIX_LABELS = ("norm", "bias")


def _as_tuple(axes: Sequence[int] | int, ndim: int) -> tuple[int, ...]:
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return tuple(a % ndim for a in axes)


def normalize(axes: MatrixAxes, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """Returns (batch, reduction, output) axis tuples of a leaf with `ndim` dimensions."""
  red = _as_tuple(axes.reduction_axis, ndim)
  out = _as_tuple(axes.output_axis, ndim)
  if set(red) & set(out) or len(set(red)) != len(red) or len(set(out)) != len(out):
    raise ValueError(f"matrix axes {axes} repeat an axis (leaf has {ndim} dimensions)")
  batch = tuple(a for a in range(ndim) if a not in red and a not in out)
  return batch, red, out


def default_matrix_axes(x: Any, label: str) -> MatrixAxes | None:
  """Last two axes form the matrix, leading axes are stacked layers; 0-D/1-D leaves are not."""
  if getattr(x, "ndim", 0) < 2 or label in _NON_MATRIX_LABELS:
    return None
  return MatrixAxes(reduction_axis=x.ndim - 2, output_axis=x.ndim - 1)


def resolve_matrix_axes(matrix_axes: Any, params: Any, labels: Any) -> Any:
  """A tree with `params`' structure of `MatrixAxes` (matrix leaves) or None (the others).

  Args:
    matrix_axes: None for the default rule (`default_matrix_axes`), a single `MatrixAxes` used for
      every leaf of rank >= 2, a tree of `MatrixAxes`/None, or a callable params -> such a tree.
    params: the parameter pytree.
    labels: the label tree of `params`.
  """
  if matrix_axes is None:
    return jax.tree.map(default_matrix_axes, params, labels)
  if isinstance(matrix_axes, MatrixAxes):
    return jax.tree.map(lambda x: matrix_axes if x.ndim >= 2 else None, params)
  tree = matrix_axes(params) if callable(matrix_axes) else matrix_axes
  is_leaf = lambda a: a is None or isinstance(a, MatrixAxes)
  flat, treedef = jax.tree.flatten(tree, is_leaf=is_leaf)
  if treedef.num_leaves != jax.tree.structure(params).num_leaves:
    raise ValueError("matrix_axes must have the same tree structure as params "
                     f"({treedef.num_leaves} vs {jax.tree.structure(params).num_leaves} leaves)")
  return jax.tree.unflatten(jax.tree.structure(params), flat)


def is_axes_leaf(a: Any) -> bool:
  return a is None or isinstance(a, MatrixAxes)


def matrix_shape(shape: Sequence[int], axes: MatrixAxes) -> tuple[int, int, int]:
  """(number of matrices, rows, columns) of a leaf of `shape` viewed with `axes`."""
  batch, red, out = normalize(axes, len(shape))
  prod = lambda ax: math.prod(shape[a] for a in ax)
  return prod(batch), prod(red), prod(out)


def to_matrices(x: jax.Array, axes: MatrixAxes) -> jax.Array:
  """Views a leaf as a stack of matrices `[batch, rows, columns]`."""
  batch, red, out = normalize(axes, x.ndim)
  b, m, n = matrix_shape(x.shape, axes)
  return jnp.transpose(x, batch + red + out).reshape(b, m, n)


def per_matrix_shape(shape: Sequence[int], axes: MatrixAxes | None) -> tuple[int, ...]:
  """Shape of a per-matrix quantity of a leaf: matrix axes set to 1 (`()` for non-matrices)."""
  if axes is None:
    return ()
  _, red, out = normalize(axes, len(shape))
  return tuple(1 if a in red or a in out else d for a, d in enumerate(shape))
