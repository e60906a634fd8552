"""Per-matrix spectral diagnostics of a model's weights, in the style of weightwatcher.

The same batched (and mesh-aware) Gram + eigenvalue machinery as the alpha recompute, so it is
jittable and cheap enough to log during training: only the top half of each spectrum is solved
for, the Frobenius norm comes from the Gram's trace.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llr_optax import _matrix_axes, _per_leaf, _recompute, _scales, _spectral

SPECTRAL_METRICS = ("alpha", "num_eigenvalues", "spectral_norm", "frobenius_norm",
                    "stable_rank", "alpha_weighted", "log_norm", "ks_distance")


def spectral_metrics(params: Any, labels: Any = None, matrix_axes: Any = None, *,
                     min_eigenvalues: int = 2, estimator: str = "auto",
                     zero_threshold: float | None = None, mesh: Any = None) -> dict[str, Any]:
  """Heavy-tailed self-regularization (HT-SR) metrics of every weight matrix.

  For each matrix `W` (`m x n`) with ESD `lambda_1 <= ... <= lambda_N`, `N = min(m, n)`:

  * `alpha`: PL_Alpha_Hill with the median as xmin, as `hill_alpha` (the authors' rule);
  * `num_eigenvalues`: `N`;
  * `spectral_norm`: `lambda_max` (the squared largest singular value, as weightwatcher);
  * `frobenius_norm`: `sum_i lambda_i = ||W||_F^2`;
  * `stable_rank`: `||W||_F^2 / lambda_max`;
  * `alpha_weighted`: `alpha * log10(lambda_max)`;
  * `log_norm`: `log10(||W||_F^2)`;
  * `ks_distance`: the power-law fit's Kolmogorov-Smirnov distance over the tail,
    `max_{j >= i} |1 - (lambda_j / xmin)^(1 - alpha) - (j - i) / (N - i)|`, as the authors'
    code computes it.

  Every matrix leaf with at least `min_eigenvalues` eigenvalues is measured, embedding and head
  included (nothing is pinned here). Jittable; batched by Gram size; spread over `mesh` like the
  recompute of `scale_by_alpha_hill`.

  Args:
    params: the parameter pytree.
    labels: label tree, callable params -> label tree, or None for `label_params(params)`
      (decides which leaves are matrices: norms and biases are not).
    matrix_axes: see `scale_by_alpha_hill` and `infer_matrix_axes`.
    min_eigenvalues: smaller matrices are not measured.
    estimator: see `esd`.
    zero_threshold: see `hill_alpha`.
    mesh: see `scale_by_alpha_hill`.

  Returns:
    `{metric: tree}` for each name in `SPECTRAL_METRICS`; each tree is shaped like
    `current_scales`' output (a scalar per leaf; per matrix for matrix leaves, the matrix axes
    set to 1) and is NaN where a leaf is not measured (and `alpha`, `alpha_weighted`,
    `ks_distance` where the fit is undefined).

  Example:
    >>> import jax, llr_optax
    >>> params = {"q_proj": jax.random.normal(jax.random.key(0), (3, 64, 64)),  # 3 stacked layers
    ...           "norm": jax.numpy.ones(64)}
    >>> m = jax.jit(llr_optax.spectral_metrics)(params)
    >>> m["alpha"]["q_proj"].shape, m["num_eigenvalues"]["q_proj"].ravel().tolist()
    ((3, 1, 1), [64.0, 64.0, 64.0])
    >>> bool(jax.numpy.isnan(m["alpha"]["norm"]))
    True
  """
  min_eigenvalues = _scales.check_int("min_eigenvalues", min_eigenvalues, 2, static=True)
  if estimator not in _spectral.ESTIMATORS:
    raise ValueError(f"estimator must be one of {_spectral.ESTIMATORS}, got {estimator!r}")
  zero_threshold = _spectral._check_zero_threshold(zero_threshold)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # unmeasured leaves are NaN in the result
    plan = _recompute.make_plan(params, labels, matrix_axes, {}, min_eigenvalues)
  size = plan.layout.size
  index, stats = _recompute.chunk_stats(params, plan, _recompute.chunks(params, plan, 1)[0],
                                        estimator, zero_threshold, mesh)
  flat = {name: jnp.full((size,), jnp.nan, jnp.float32).at[index].set(stats[:, k])
          for k, name in enumerate(_spectral.STATS)}
  counts = np.full(size, np.nan, np.float32)
  leaves = plan.layout.treedef.flatten_up_to(params)
  for i, axes in enumerate(plan.axes):
    if axes is not None:
      counts[plan.layout.offsets[i]:plan.layout.offsets[i + 1]] = min(
          _matrix_axes.matrix_shape(leaves[i].shape, axes)[1:])
  flat["num_eigenvalues"] = jnp.asarray(counts)
  flat["stable_rank"] = flat["frobenius_norm"] / flat["spectral_norm"]
  flat["alpha_weighted"] = flat["alpha"] * jnp.log10(flat["spectral_norm"])
  flat["log_norm"] = jnp.log10(flat["frobenius_norm"])
  return {name: _per_leaf.PerLeaf(flat[name], plan.layout).tree() for name in SPECTRAL_METRICS}
