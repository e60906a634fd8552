"""Empirical spectral density (ESD) of weight matrices and its PL_Alpha_Hill tail exponent.

Only the eigenvalues of `W^T W` are needed (no vectors), and only their ratios matter for alpha.
We form the Gram matrix of the smaller side in float32 and run an eigenvalues-only solver:

* on CPU, Householder tridiagonalisation (`lax.linalg.tridiagonal`) followed by the
  eigenvalues-only tridiagonal solver: LAPACK's speed, while `jnp.linalg.eigvalsh` also computes
  eigenvectors and is ~2-3x slower;
* on GPU/TPU, `jnp.linalg.eigvalsh` (cuSOLVER / Jacobi), which is fast there.

Matrices whose Gram matrices have the same size are solved in one batched call, so a whole
transformer (q/k/v/o/gate/up/down of every block, whatever their orientation) costs a handful
of solver launches.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.scipy.linalg import eigh_tridiagonal

ESTIMATORS = ("auto", "tridiagonal", "eigh", "svd")

# Eigenvalues below this (after clamping at 0) are numerically zero: they are left out of the fit,
# as in the authors' code, so they can never produce log(0).
TINY_EIGENVALUE = 1e-5

# A fit whose mean log-ratio over the top half is below this is a flat spectrum (alpha > 1e4):
# rounding noise, not a power law. It is reported as NaN (no finite alpha).
_FLAT_LOG_RATIO = 1e-4


def _check_estimator(estimator: str) -> str:
  if estimator not in ESTIMATORS:
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
  if estimator == "auto":
    return "tridiagonal" if jax.default_backend() == "cpu" else "eigh"
  return estimator


def gram(w: jax.Array) -> jax.Array:
  """Gram matrix of the smaller side of `w` (`[..., m, n] -> [..., k, k]`, k = min(m, n)), f32."""
  w = jnp.asarray(w, jnp.float32)
  # HIGHEST: TPUs would otherwise multiply in bfloat16, which blurs the small eigenvalues.
  mm = lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
  wt = jnp.swapaxes(w, -1, -2)
  return mm(wt, w) if w.shape[-2] >= w.shape[-1] else mm(w, wt)


def eigvalsh(g: jax.Array, estimator: str = "auto") -> jax.Array:
  """Ascending eigenvalues of symmetric matrices `[..., k, k] -> [..., k]` (f32, no vectors)."""
  method = _check_estimator(estimator)
  if method == "svd":
    raise ValueError("estimator='svd' needs the matrix itself; use esd(w, estimator='svd')")
  g = jnp.asarray(g, jnp.float32)
  k = g.shape[-1]
  if method == "eigh" or k < 3:
    return jnp.linalg.eigvalsh(g)
  batch = g.shape[:-2]
  flat = g.reshape((-1, k, k))
  _, d, e, _ = jax.lax.linalg.tridiagonal(flat, lower=True)
  vals = jax.vmap(lambda d_, e_: eigh_tridiagonal(d_, e_, eigvals_only=True))(d, e)
  return jnp.sort(vals, axis=-1).reshape(batch + (k,))


def esd(w: jax.Array, estimator: str = "auto") -> jax.Array:
  """Ascending eigenvalues of `W^T W` (the squared singular values of `W`).

  Args:
    w: weight matrices `[..., m, n]`; leading axes are a batch.
    estimator: "auto" (tridiagonal on CPU, eigh elsewhere), "tridiagonal", "eigh", or "svd"
      (`jnp.linalg.svd(compute_uv=False)` squared; slowest, for cross-checks).

  Returns:
    float32 `[..., min(m, n)]`, ascending.

  Example:
    >>> import jax.numpy as jnp
    >>> import llr_optax
    >>> llr_optax.esd(jnp.diag(jnp.array([1.0, 2.0, 3.0]))).round(4)
    Array([1., 4., 9.], dtype=float32)
  """
  w = jnp.asarray(w, jnp.float32)
  if w.ndim < 2:
    raise ValueError(f"esd needs a matrix [..., m, n], got shape {w.shape}")
  if _check_estimator(estimator) == "svd":
    s = jnp.linalg.svd(w, compute_uv=False)
    return jnp.sort(s * s, axis=-1)
  return eigvalsh(gram(w), estimator)


def hill_alpha(eigenvalues: jax.Array, tiny: float = TINY_EIGENVALUE) -> jax.Array:
  """PL_Alpha_Hill of ascending spectra with the median as xmin, batched over leading axes.

  With the `n` eigenvalues that are >= `tiny` (the top `n` of the ascending spectrum),
  `i = n // 2`, `xmin` the i-th of them and `k = n - i`:
  `alpha = 1 + k / sum_{j >= i} ln(lambda_j / xmin)`. When no eigenvalue is tiny, `n = N`,
  exactly the formula of SPEC.md. Returns NaN where no finite alpha exists: fewer than 2 usable
  eigenvalues, a flat top half (zero/identity-like matrices), or NaN/Inf input.

  Args:
    eigenvalues: `[..., N]` in ascending order (as returned by `esd`).
    tiny: eigenvalues below this are treated as zero and left out.

  Returns:
    float32 `[...]`.

  Example:
    >>> import jax.numpy as jnp
    >>> import llr_optax
    >>> float(llr_optax.hill_alpha(jnp.array([1.0, 1.0, 1.0, 2.0])))  # 1 + 2 / ln 2
    3.885...
  """
  lam = jnp.asarray(eigenvalues, jnp.float32)
  size = lam.shape[-1]
  finite = jnp.all(jnp.isfinite(lam), axis=-1)
  lam = jnp.where(jnp.isfinite(lam), jnp.maximum(lam, 0.0), 0.0)
  usable = lam >= tiny
  n = jnp.sum(usable, axis=-1)
  # Ascending order puts the usable eigenvalues at the end: they start at index size - n.
  i = (size - n) + n // 2
  k = (n - n // 2).astype(jnp.float32)
  xmin = jnp.take_along_axis(lam, i[..., None], axis=-1)[..., 0]
  safe_xmin = jnp.where(n > 0, xmin, 1.0)
  in_tail = jnp.arange(size) >= i[..., None]
  logs = jnp.where(in_tail, jnp.log(jnp.maximum(lam, tiny) / safe_xmin[..., None]), 0.0)
  total = jnp.sum(logs, axis=-1)
  ok = finite & (n >= 2) & (total > _FLAT_LOG_RATIO * k)
  return jnp.where(ok, 1.0 + k / jnp.where(ok, total, 1.0), jnp.nan)


def matrix_alpha(w: jax.Array, estimator: str = "auto", tiny: float = TINY_EIGENVALUE) -> jax.Array:
  """`hill_alpha(esd(w))`: the tail exponent of each matrix `[..., m, n] -> [...]`.

  Example:
    >>> import jax, llr_optax
    >>> w = jax.random.normal(jax.random.key(0), (4, 64, 32))   # a batch of 4 matrices
    >>> llr_optax.matrix_alpha(w).shape
    (4,)
  """
  return hill_alpha(esd(w, estimator), tiny)


def _count_below(d: jax.Array, e: jax.Array, x: float) -> jax.Array:
  """Number of eigenvalues below `x` of tridiagonal matrices `d [b, k]`, `e [b, k - 1]`: a Sturm
  count with LAPACK's (`?stebz`) pivot guard (pivots `<= pivmin` count as negative, so an
  eigenvalue exactly at `x` counts too)."""
  e2 = jnp.square(e)
  pivmin = jnp.finfo(d.dtype).tiny * jnp.maximum(1.0, jnp.max(e2, axis=-1))

  def guard(q, count):
    small = q <= pivmin
    return jnp.where(small, jnp.minimum(q, -pivmin), q), count + small

  def step(carry, de):
    q, count = carry
    return guard(de[0] - de[1] / q - x, count), None

  init = guard(d[:, 0] - x, jnp.zeros_like(d[:, 0], jnp.int32))
  (_, count), _ = jax.lax.scan(step, init, (d[:, 1:].T, e2.T), unroll=8)
  return count


def fit_alphas(g: jax.Array, estimator: str = "auto", tiny: float = TINY_EIGENVALUE) -> jax.Array:
  """`hill_alpha(eigvalsh(g, estimator), tiny)` of symmetric matrices `[..., k, k] -> [...]`.

  On the tridiagonal path only what the fit reads is solved for: the top `k - k // 2`
  eigenvalues (bisection by index: the same values as the full solve in ~40% of its time) and
  the number `c` of eigenvalues below `tiny` (one Sturm count). The Hill index `i` is never below
  `k // 2`, so the bottom half enters the fit only through `c`: it is stood in for by `tiny`
  (usable, never in the tail), and the `c` smallest entries by `0`. The count also decides for
  eigenvalues below the bisection's absolute resolution `eps * |g|` (which can exceed `tiny`),
  where the full solve returns interval midpoints: e.g. exact zeros of a rank-deficient Gram
  are then excluded, as in float64, instead of read as ~`eps * |g|`.
  """
  method = _check_estimator(estimator)
  k = g.shape[-1]
  if method != "tridiagonal" or k < 3:
    return hill_alpha(eigvalsh(g, method), tiny)
  half, batch = k // 2, g.shape[:-2]
  flat = jnp.asarray(g, jnp.float32).reshape((-1, k, k))
  _, d, e, _ = jax.lax.linalg.tridiagonal(flat, lower=True)
  top = jax.vmap(lambda d_, e_: eigh_tridiagonal(
      d_, e_, eigvals_only=True, select="i", select_range=(half, k - 1)))(d, e)
  below = _count_below(d, e, tiny)
  lam = jnp.concatenate([jnp.full((top.shape[0], half), tiny, top.dtype),
                         jnp.sort(top, axis=-1)], axis=-1)
  lam = jnp.where(jnp.arange(k) < below[:, None], 0.0, lam)
  return hill_alpha(lam, tiny).reshape(batch)


def grouped_matrix_alphas(stacks: Sequence[jax.Array], estimator: str = "auto",
                          tiny: float = TINY_EIGENVALUE, solve=None) -> list[jax.Array]:
  """Alphas of several matrix stacks `[b_i, m_i, n_i]`, batching same-size Gram matrices.

  Each stack's Gram matrices are formed where its weights live (`k_i x k_i`,
  `k_i = min(m_i, n_i)`: never larger than the matrix itself), then all Grams of one size are
  concatenated and solved in a single batched call.

  Args:
    stacks: matrix stacks, e.g. every q/k/v/o/gate/up/down kernel of a model.
    estimator: see `esd`.
    tiny: see `hill_alpha`.
    solve: optional function `grams [B, k, k] -> alphas [B]` replacing the local batched solve
      (the mesh-aware path spreads the batch over devices here).

  Returns:
    One float32 `[b_i]` alpha vector per input stack.
  """
  estimator_ = _check_estimator(estimator)
  if solve is None:
    def solve(g):
      return fit_alphas(g, estimator_, tiny)
  if estimator_ == "svd":  # cross-check path: no Gram matrices
    return [matrix_alpha(s, "svd", tiny) for s in stacks]
  grams = [gram(s) for s in stacks]
  by_size: dict[int, list[int]] = {}
  for idx, g in enumerate(grams):
    by_size.setdefault(g.shape[-1], []).append(idx)
  out: list[jax.Array | None] = [None] * len(stacks)
  for members in by_size.values():
    alphas = solve(jnp.concatenate([grams[j] for j in members], axis=0))
    start = 0
    for j in members:
      out[j] = alphas[start:start + grams[j].shape[0]]
      start += grams[j].shape[0]
  return out
