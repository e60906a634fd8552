"""Per-leaf (or per-matrix) values of a params tree, stored as ONE flat array in optimizer states.

Every method keeps a few numbers per leaf: an LR factor, an alpha, a weight decay; for a stacked
kernel `[L, d_in, d_out]` one per matrix. Storing them as a tree shaped like the params has two
costs that users of real pipelines hit:

* `optax.tree.map_params` (optax's recipe for optimizer-state shardings) calls `init` on a
  placeholder and treats every state subtree built from the params as *parameters*, so a tree of
  `()`/`(L, 1, 1)` arrays would receive the params' shardings and fail to `device_put`;
* every leaf of the optimizer state is walked on the host at every step by `nnx.Optimizer`
  and by jit's argument handling: a tree per field multiplies the state's leaf count.

So the values live in one float32 vector (`PerLeaf.values`), concatenated in the params'
flattening order; the layout needed to read them back as a tree (the params' treedef and each
leaf's value shape) is static pytree metadata of the `PerLeaf` node. Under the placeholder the
layout is empty; an empty layout compares equal to any other so that `map_params` can match the
placeholder state against the real one (and the lone vector is then a non-parameter leaf).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class Layout:
  """Static description of a `PerLeaf` vector: params treedef and each leaf's value shape."""

  __slots__ = ("treedef", "shapes", "offsets")

  def __init__(self, treedef: Any, shapes: Sequence[tuple[int, ...]]):
    self.treedef = treedef
    self.shapes = tuple(tuple(int(d) for d in s) for s in shapes)
    self.offsets = tuple(np.cumsum([0] + [math.prod(s) for s in self.shapes]).tolist())

  @property
  def size(self) -> int:
    return self.offsets[-1]

  def __eq__(self, other: Any) -> bool:
    if not isinstance(other, Layout):
      return NotImplemented
    # An empty layout (from `optax.tree.map_params`' placeholder, or a model without leaves)
    # matches any layout: see the module docstring.
    if not self.shapes or not other.shapes:
      return True
    return self.shapes == other.shapes and self.treedef == other.treedef

  def __hash__(self) -> int:
    return hash(Layout)  # consistent with __eq__, which treats an empty layout as a wildcard

  def __repr__(self) -> str:
    return f"Layout({len(self.shapes)} leaves, {self.size} values)"


@jax.tree_util.register_pytree_with_keys_class
class PerLeaf:
  """Per-leaf values of a params tree as one flat float32 vector plus its static `Layout`.

  Read it as a tree with `.tree()` (or `llr_optax.current_scales` for LR factors); each leaf is
  a scalar, or for matrix leaves an array shaped like the leaf with the matrix axes set to 1.
  """

  __slots__ = ("values", "layout")

  def __init__(self, values: jax.Array, layout: Layout):
    self.values = values
    self.layout = layout

  @classmethod
  def from_leaves(cls, leaves: Sequence[Any], layout: Layout) -> PerLeaf:
    flat = [jnp.reshape(jnp.asarray(x, jnp.float32), (-1,)) for x in leaves]
    values = jnp.concatenate(flat) if flat else jnp.zeros((0,), jnp.float32)
    return cls(values, layout)

  def leaves(self) -> list[jax.Array]:
    """The values of each leaf, shaped as the layout says (static slices of the vector)."""
    off, out = self.layout.offsets, []
    for i, shape in enumerate(self.layout.shapes):
      out.append(self.values[off[i]:off[i + 1]].reshape(shape))
    return out

  def tree(self) -> Any:
    return jax.tree.unflatten(self.layout.treedef, self.leaves())

  def replace(self, values: jax.Array) -> PerLeaf:
    return PerLeaf(values, self.layout)

  def tree_flatten_with_keys(self):
    return ((jax.tree_util.GetAttrKey("values"), self.values),), self.layout

  @classmethod
  def tree_unflatten(cls, layout, children):
    return cls(children[0], layout)

  def __repr__(self) -> str:
    return f"PerLeaf({self.layout!r}, values={self.values!r})"
