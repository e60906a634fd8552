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

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import eigh_tridiagonal

ESTIMATORS = ("auto", "tridiagonal", "eigh", "svd")

# The authors' `filter_zeros=True` threshold (their EVALS_THRESH). Their released configs run with
# `filter_zeros=False`, i.e. every eigenvalue counts; we do the same unless `zero_threshold` is set.
EVALS_THRESH = 1e-5

# The fit is undefined when its median eigenvalue `xmin` is at the rounding level of the float32
# Gram matrix: then xmin, and through it alpha, is rounding noise (a rank-1 matrix would get
# alpha ~1.16 from noise; in float64 the same fit gives another number). Measured on rank-deficient
# matrices of shapes 32x16 ... 16384x32 and 2048x2048, float32 "zero" eigenvalues never exceeded
# 4 * eps * lambda_max; the threshold `_NOISE_FACTOR * sqrt(N) * eps * lambda_max` keeps a margin
# of 8x at N = 16 (more at larger N), and sits far below the median of any genuine spectrum (a
# square Gaussian matrix's median is ~0.1 lambda_max; the threshold at N = 4096 is 3e-5
# lambda_max). Genuine small eigenvalues below the median never enter a logarithm, so they count
# (in N) however small they are.
_NOISE_FACTOR = 4.0
_EPS32 = float(jnp.finfo(jnp.float32).eps)

# A fit whose mean log-ratio over the tail is below this is a flat spectrum (alpha > 1e4):
# rounding noise, not a power law. It is reported as NaN (no finite alpha).
_FLAT_LOG_RATIO = 1e-4

# What `spectral_stats` returns along its last axis, in this order.
STATS = ("alpha", "spectral_norm", "frobenius_norm", "ks_distance")


def _check_estimator(estimator: str) -> str:
  if estimator not in ESTIMATORS:
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
  if estimator == "auto":
    return "tridiagonal" if jax.default_backend() == "cpu" else "eigh"
  return estimator


def working_dtype(x) -> jnp.dtype:
  """float32, or complex64 for complex weights (whose Gram matrix `W^H W` is Hermitian)."""
  return jnp.complex64 if jnp.iscomplexobj(x) else jnp.float32


def gram(w: jax.Array) -> jax.Array:
  """Gram matrix of the smaller side of `w` (`[..., m, n] -> [..., k, k]`, k = min(m, n)).

  `W^H W` (or `W W^H`), in float32 (complex64 for complex `w`: the eigenvalues stay real).
  """
  w = jnp.asarray(w)
  w = w.astype(working_dtype(w))
  # HIGHEST: TPUs would otherwise multiply in bfloat16, which blurs the small eigenvalues.
  mm = lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
  wh = jnp.conj(jnp.swapaxes(w, -1, -2))
  return mm(wh, w) if w.shape[-2] >= w.shape[-1] else mm(w, wh)


def eigvalsh(g: jax.Array, estimator: str = "auto") -> jax.Array:
  """Ascending eigenvalues of symmetric matrices `[..., k, k] -> [..., k]` (f32, no vectors)."""
  method = _check_estimator(estimator)
  if method == "svd":
    raise ValueError("estimator='svd' needs the matrix itself; use esd(w, estimator='svd')")
  g = jnp.asarray(g)
  g = g.astype(working_dtype(g))
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
    w: weight matrices `[..., m, n]`; leading axes are a batch. Complex weights give the
      (real) eigenvalues of `W^H W`.
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
  w = jnp.asarray(w)
  w = w.astype(working_dtype(w))
  if w.ndim < 2:
    raise ValueError(f"esd needs a matrix [..., m, n], got shape {w.shape}")
  if _check_estimator(estimator) == "svd":
    s = jnp.linalg.svd(w, compute_uv=False)
    return jnp.sort(s * s, axis=-1)
  return eigvalsh(gram(w), estimator)


def _check_zero_threshold(zero_threshold: float | None) -> float | None:
  if zero_threshold is None:
    return None
  if isinstance(zero_threshold, jax.core.Tracer):
    return zero_threshold
  value = float(np.asarray(zero_threshold))
  if not (np.isfinite(value) and value >= 0):
    raise ValueError(f"zero_threshold must be None or a finite number >= 0, got {zero_threshold!r}")
  return value


def spectral_stats(eigenvalues: jax.Array, zero_threshold: float | None = None,
                   total: jax.Array | None = None) -> jax.Array:
  """PL_Alpha_Hill and spectral summaries of ascending spectra, `[..., N] -> [..., len(STATS)]`.

  The authors' median-Hill (LLR, TempBalance, AlphaDecay, all with `filter_zeros=False`): over
  all `N` eigenvalues, `i = N // 2`, `xmin = lambda_i`, `k = N - i`,
  `alpha = 1 + k / sum_{j >= i} ln(lambda_j / xmin)`; the fit's Kolmogorov-Smirnov distance
  `max_{j >= i} |1 - (lambda_j / xmin)^(1 - alpha) - (j - i) / k|`. With `zero_threshold` (the
  authors' `filter_zeros=True`, their threshold 1e-5) the eigenvalues `<= zero_threshold` are
  dropped first (all are kept if none is above it), so `N` is the number kept.

  No finite alpha (NaN alpha and KS distance): NaN/Inf input, fewer than 2 eigenvalues, a flat
  tail (mean log-ratio < 1e-4, e.g. a zero or identity-like matrix), or an `xmin` at the float32
  rounding level of the Gram matrix (`xmin <= 4 sqrt(N) eps lambda_max`, e.g. rank below N/2),
  where alpha would be read from rounding noise.

  Args:
    eigenvalues: `[..., N]`, ascending (as `esd` returns them).
    zero_threshold: None (default, every eigenvalue counts) or the `filter_zeros` threshold.
    total: the sum of all eigenvalues if already known (e.g. the trace of the Gram matrix);
      by default the sum of `eigenvalues`.

  Returns:
    float32 `[..., 4]`: alpha, spectral norm (`lambda_max`), Frobenius norm squared (the sum of
    the eigenvalues), KS distance; see `STATS`.
  """
  lam = jnp.asarray(eigenvalues, jnp.float32)
  size = lam.shape[-1]
  finite = jnp.all(jnp.isfinite(lam), axis=-1)
  lam = jnp.where(jnp.isfinite(lam), jnp.maximum(lam, 0.0), 0.0)
  if zero_threshold is None:
    n = jnp.full(lam.shape[:-1], size, jnp.int32)
  else:
    n = jnp.sum(lam > zero_threshold, axis=-1).astype(jnp.int32)
    n = jnp.where(n == 0, size, n)  # the authors' fallback: nothing left -> every eigenvalue
  # Ascending order puts the kept eigenvalues at the end: they start at index size - n.
  i = (size - n) + n // 2
  k = (n - n // 2).astype(jnp.float32)
  xmin = jnp.take_along_axis(lam, i[..., None], axis=-1)[..., 0]
  lam_max = lam[..., -1]
  above_noise = xmin > _NOISE_FACTOR * np.sqrt(size) * _EPS32 * lam_max
  in_tail = jnp.arange(size) >= i[..., None]
  ratio = jnp.where(in_tail, lam / jnp.where(above_noise, xmin, 1.0)[..., None], 1.0)
  log_sum = jnp.sum(jnp.log(jnp.maximum(ratio, 1.0)), axis=-1)
  ok = finite & (n >= 2) & above_noise & (log_sum > _FLAT_LOG_RATIO * k)
  alpha = jnp.where(ok, 1.0 + k / jnp.where(ok, log_sum, 1.0), jnp.nan)
  rank = (jnp.arange(size) - i[..., None]).astype(jnp.float32) / k[..., None]
  fitted_cdf = 1.0 - jnp.maximum(ratio, 1.0) ** (1.0 - jnp.where(ok, alpha, 2.0)[..., None])
  ks = jnp.max(jnp.where(in_tail, jnp.abs(fitted_cdf - rank), 0.0), axis=-1)
  total = jnp.sum(lam, axis=-1) if total is None else jnp.asarray(total, jnp.float32)
  bad = lambda x: jnp.where(finite, x, jnp.nan)
  return jnp.stack([alpha, bad(lam_max), bad(total), jnp.where(ok, ks, jnp.nan)], axis=-1)


def hill_alpha(eigenvalues: jax.Array, zero_threshold: float | None = None) -> jax.Array:
  """PL_Alpha_Hill of ascending spectra with the median as xmin, batched over leading axes.

  As in the authors' code (`filter_zeros=False`): over all `N` eigenvalues, `i = N // 2`,
  `xmin = lambda_i`, `k = N - i`, `alpha = 1 + k / sum_{j >= i} ln(lambda_j / xmin)`. Small
  eigenvalues count in `N` however small they are, and never enter a logarithm unless they are
  the median itself. NaN where no finite alpha exists (see `spectral_stats`): NaN/Inf input, a
  flat tail, or a median at float32 rounding level (rank below `N / 2`).

  Args:
    eigenvalues: `[..., N]` in ascending order (as returned by `esd`).
    zero_threshold: None (default), or drop eigenvalues `<= zero_threshold` first, as the
      authors' `filter_zeros=True` does (their threshold: `1e-5`).

  Returns:
    float32 `[...]`.

  Example:
    >>> import jax.numpy as jnp
    >>> import llr_optax
    >>> float(llr_optax.hill_alpha(jnp.array([1.0, 1.0, 1.0, 2.0])))  # 1 + 2 / ln 2
    3.885...
  """
  return spectral_stats(eigenvalues, _check_zero_threshold(zero_threshold))[..., 0]


def matrix_alpha(w: jax.Array, estimator: str = "auto",
                 zero_threshold: float | None = None) -> jax.Array:
  """`hill_alpha(esd(w))`: the tail exponent of each matrix `[..., m, n] -> [...]`.

  Example:
    >>> import jax, llr_optax
    >>> w = jax.random.normal(jax.random.key(0), (4, 64, 32))   # a batch of 4 matrices
    >>> llr_optax.matrix_alpha(w).shape
    (4,)
  """
  return hill_alpha(esd(w, estimator), zero_threshold)


def _count_below(d: jax.Array, e: jax.Array, x: float) -> jax.Array:
  """Number of eigenvalues `<= x` of tridiagonal matrices `d [b, k]`, `e [b, k - 1]`: a Sturm
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


def fit_spectra(g: jax.Array, estimator: str = "auto",
                zero_threshold: float | None = None) -> jax.Array:
  """`spectral_stats` of symmetric (Gram) matrices `[..., k, k] -> [..., len(STATS)]`.

  On the tridiagonal path only what the fit reads is solved for: the top `k - k // 2`
  eigenvalues (bisection by index: the same values as the full solve in ~40% of its time). The
  Hill index is never below `k // 2`, so the bottom half is never read; with `zero_threshold` it
  enters only through the number of eigenvalues `<= zero_threshold` (one Sturm count), which
  decides the index. The sum of the eigenvalues is the trace of `g`.
  """
  method = _check_estimator(estimator)
  k = g.shape[-1]
  g = jnp.asarray(g)
  g = g.astype(working_dtype(g))
  total = jnp.real(jnp.trace(g, axis1=-2, axis2=-1))
  if method != "tridiagonal" or k < 3:
    return spectral_stats(eigvalsh(g, method), zero_threshold, total)
  half, batch = k // 2, g.shape[:-2]
  flat = g.reshape((-1, k, k))
  _, d, e, _ = jax.lax.linalg.tridiagonal(flat, lower=True)
  top = jax.vmap(lambda d_, e_: eigh_tridiagonal(
      d_, e_, eigvals_only=True, select="i", select_range=(half, k - 1)))(d, e)
  top = jnp.sort(top, axis=-1)
  if zero_threshold is None:
    bottom = jnp.zeros((top.shape[0], half), top.dtype)  # never read by the fit
    lam = jnp.concatenate([bottom, top], axis=-1)
  else:
    # Stand-ins above the threshold for the unsolved bottom half (below the Hill index, so never
    # read), then the counted eigenvalues `<= zero_threshold` set to 0 (dropped).
    stand_in = jnp.full((top.shape[0], half), 2.0 * zero_threshold + 1e-30, top.dtype)
    lam = jnp.concatenate([stand_in, top], axis=-1)
    below = _count_below(d, e, zero_threshold)
    lam = jnp.where(jnp.arange(k) < below[:, None], 0.0, lam)
  stats = spectral_stats(lam, zero_threshold, total.reshape(-1))
  return stats.reshape(batch + (len(STATS),))


def fit_alphas(g: jax.Array, estimator: str = "auto",
               zero_threshold: float | None = None) -> jax.Array:
  """The alphas of `fit_spectra`: `[..., k, k] -> [...]`."""
  return fit_spectra(g, estimator, zero_threshold)[..., 0]


def group_by_gram_size(stacks: Sequence[jax.Array], fit: Callable[[jax.Array], jax.Array],
                       ) -> list[jax.Array]:
  """Applies `fit: grams [B, k, k] -> [B, ...]` once per Gram size over all `stacks [b_i, m_i,
  n_i]`: each stack's Grams (`k_i = min(m_i, n_i)`) are formed where its weights live, all of
  one size are concatenated and fitted in a single batched call, and the results are split back
  (`[b_i, ...]` per stack)."""
  grams = [gram(s) for s in stacks]
  by_size: dict[int, list[int]] = {}
  for idx, g in enumerate(grams):
    by_size.setdefault(g.shape[-1], []).append(idx)
  out: list[jax.Array | None] = [None] * len(stacks)
  for members in by_size.values():
    results = fit(jnp.concatenate([grams[j] for j in members], axis=0))
    start = 0
    for j in members:
      out[j] = results[start:start + grams[j].shape[0]]
      start += grams[j].shape[0]
  return out


def grouped_matrix_alphas(stacks: Sequence[jax.Array], estimator: str = "auto",
                          zero_threshold: float | None = None, solve=None) -> list[jax.Array]:
  """Alphas of several matrix stacks `[b_i, m_i, n_i]`, batching same-size Gram matrices.

  Each stack's Gram matrices are formed where its weights live (`k_i x k_i`,
  `k_i = min(m_i, n_i)`: never larger than the matrix itself), then all Grams of one size are
  concatenated and solved in a single batched call.

  Args:
    stacks: matrix stacks, e.g. every q/k/v/o/gate/up/down kernel of a model.
    estimator: see `esd`.
    zero_threshold: see `hill_alpha`.
    solve: optional function `grams [B, k, k] -> alphas [B]` replacing the local batched solve
      (the mesh-aware path spreads the batch over devices here).

  Returns:
    One float32 `[b_i]` alpha vector per input stack.

  Example:
    >>> import jax, llr_optax
    >>> stacks = [jax.random.normal(jax.random.key(i), (2, 64, 32)) for i in range(3)]
    >>> [a.shape for a in jax.jit(llr_optax.grouped_matrix_alphas)(stacks)]   # one batched solve
    [(2,), (2,), (2,)]
  """
  estimator_ = _check_estimator(estimator)
  zero_threshold = _check_zero_threshold(zero_threshold)
  if estimator_ == "svd":  # cross-check path: no Gram matrices
    return [matrix_alpha(s, "svd", zero_threshold) for s in stacks]
  if solve is None:
    def solve(g):
      return fit_alphas(g, estimator_, zero_threshold)
  return group_by_gram_size(stacks, solve)


def grouped_spectral_stats(stacks: Sequence[jax.Array], estimator: str = "auto",
                           zero_threshold: float | None = None) -> list[jax.Array]:
  """`spectral_stats` of several matrix stacks, batched as `grouped_matrix_alphas` does:
  one float32 `[b_i, len(STATS)]` array per stack."""
  estimator_ = _check_estimator(estimator)
  if estimator_ == "svd":
    return [spectral_stats(esd(s, "svd"), zero_threshold) for s in stacks]
  return group_by_gram_size(stacks, lambda g: fit_spectra(g, estimator_, zero_threshold))
