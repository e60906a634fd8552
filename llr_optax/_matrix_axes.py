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

from llr_optax import _labels

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
  return _labels.align_to(tree, params, "matrix_axes", is_leaf=is_axes_leaf)


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


# --- building the tree for common layouts ------------------------------------------------------

# The rank of a leaf of each label when it is NOT stacked over layers: attention kernels may be
# `[embed, heads, head_dim]` (3) or `[embed, heads * head_dim]` (2), so "more than 2" is
# ambiguous for them only when a layer axis is named; experts are `[experts, in, out]`.
_UNSTACKED_RANK = {"expert": 3}
_HIDDEN = ("attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv", "mlp_gate", "mlp_up", "mlp_down",
           "router", "expert")


def _axes_for(shape: Sequence[int], label: str, layer_axis: int | None) -> MatrixAxes | None:
  ndim = len(shape)
  if ndim < 2 or label in _NON_MATRIX_LABELS:
    return None
  rest = list(range(ndim))
  if (layer_axis is not None and label in _HIDDEN
      and ndim > _UNSTACKED_RANK.get(label, 2) and -ndim <= layer_axis < ndim):
    rest.remove(layer_axis % ndim)  # stacked layers: a batch axis
  if label == "expert" and len(rest) == 3:
    rest = rest[1:]  # [experts, in, out]: one matrix per expert
  if len(rest) == 3 and label in ("attn_q", "attn_k", "attn_v", "attn_qkv"):
    return MatrixAxes(reduction_axis=(rest[0],), output_axis=(rest[1], rest[2]))  # [embed, heads, head_dim]
  if len(rest) == 3 and label == "attn_o":
    return MatrixAxes(reduction_axis=(rest[0], rest[1]), output_axis=(rest[2],))  # [heads, head_dim, embed]
  # Anything else: the last two remaining axes form the matrix, the others are a batch.
  return MatrixAxes(reduction_axis=(rest[-2],), output_axis=(rest[-1],))


def infer_matrix_axes(params: Any, labels: Any = None, layer_axis: int | None = None) -> Any:
  """The `MatrixAxes` tree of common transformer layouts, read off labels and shapes.

  * Attention kernels `[embed, heads, head_dim]` (query/key/value) and `[heads, head_dim, embed]`
    (output), as Flax `DenseGeneral` and MaxText store them, form one `embed x (heads *
    head_dim)` matrix (as a `Linear` of the same layer would); 2-D kernels are `[in, out]`.
  * Experts `[experts, in, out]`: one matrix per expert.
  * `layer_axis`: the axis of stacked (scanned) layers in every hidden-layer leaf (attention,
    MLP, router, experts): 0 for `nn.scan`/`nnx.scan` (`[layers, in, out]`), 1 for MaxText
    (`param_scan_axis: 1`, e.g. `decoder/layers/mlp/wi_0/kernel` of shape `[embed, layers,
    mlp]`). A leaf is taken as stacked only if its rank is above its unstacked rank (2; 3 for
    experts). Embedding and head are never stacked.
  * Norm scales, biases and leaves of rank < 2: None.

  Pass the result (or `functools.partial(infer_matrix_axes, layer_axis=...)`) as `matrix_axes`
  to `scale_by_alpha_hill`, `add_decayed_weights_by_alpha_hill`, `spectral_metrics` or
  `muon_dimension_numbers`.

  Args:
    params: the parameter pytree (arrays or anything with `.shape`).
    labels: label tree, callable params -> label tree, or None for `label_params(params)`.
    layer_axis: the stacked-layer axis of hidden-layer leaves, or None if layers are not stacked.

  Returns:
    A tree with the params' structure of `MatrixAxes` (= `optax.contrib.MuonDimensionNumbers`)
    or None.

  Example:
    >>> import jax.numpy as jnp, llr_optax
    >>> params = {"decoder": {"layers": {                     # MaxText, 3 scanned layers
    ...     "mlp": {"wi_0": {"kernel": jnp.zeros((64, 3, 128))}},
    ...     "self_attention": {"query": {"kernel": jnp.zeros((64, 3, 4, 16))}}}}}
    >>> axes = llr_optax.infer_matrix_axes(params, layer_axis=1)["decoder"]["layers"]
    >>> axes["mlp"]["wi_0"]["kernel"]
    MuonDimensionNumbers(reduction_axis=(0,), output_axis=(2,))
    >>> axes["self_attention"]["query"]["kernel"]
    MuonDimensionNumbers(reduction_axis=(0,), output_axis=(2, 3))
  """
  label_tree = _labels.resolve_labels(labels, params)
  return jax.tree.map(lambda x, label: _axes_for(x.shape, label, layer_axis), params, label_tree)


# Lookup tables and the output head go to Muon's AdamW (as in the Muon paper's recipe).
_ADAM_LABELS = ("embed", "pos_embed", "head")


def muon_dimension_numbers(params: Any, labels: Any = None, matrix_axes: Any = None) -> Any:
  """`optax.contrib.muon`'s `muon_weight_dimension_numbers` for a transformer's params.

  Hidden weight matrices (attention, MLP, router, experts and any other matrix leaf; stacked
  or scanned layers and experts as batch axes, each matrix orthogonalised separately) get a
  `MuonDimensionNumbers`; token and position embeddings, head, norm scales, biases and leaves of
  rank < 2 get None, i.e. Muon's own AdamW.

  Args:
    params: the parameter pytree.
    labels: label tree, callable params -> label tree, or None for `label_params(params)`.
    matrix_axes: as in `scale_by_alpha_hill` (a tree, a callable such as
      `functools.partial(infer_matrix_axes, layer_axis=1)`, a single `MatrixAxes`, or None
      for the default: the last two axes, leading axes a batch).

  Returns:
    A tree with the params' structure of `MuonDimensionNumbers` or None.

  Example:
    >>> import jax.numpy as jnp, optax, llr_optax
    >>> params = {"embed_tokens": jnp.zeros((32, 8)), "layers": {"q_proj": jnp.zeros((2, 8, 8)),
    ...           "input_norm": jnp.ones((2, 8))}, "lm_head": jnp.zeros((8, 32))}
    >>> llr_optax.muon_dimension_numbers(params)
    {'embed_tokens': None, 'layers': {'input_norm': None, 'q_proj': MuonDimensionNumbers(reduction_axis=1, output_axis=2)}, 'lm_head': None}
    >>> tx = optax.contrib.muon(1e-3, muon_weight_dimension_numbers=llr_optax.muon_dimension_numbers)
  """
  label_tree = _labels.resolve_labels(labels, params)
  axes_tree = resolve_matrix_axes(matrix_axes, params, label_tree)
  return jax.tree.map(lambda axes, label: None if label in _ADAM_LABELS else axes,
                      axes_tree, label_tree, is_leaf=is_axes_leaf)
