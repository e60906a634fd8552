"""esd / hill_alpha / matrix_alpha against an independent NumPy reference (SVD + Hill formula)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llr_optax

TINY = 1e-5


def np_esd(w):
  """Reference ESD: squared singular values from NumPy's SVD, in float64, ascending."""
  s = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
  return np.sort(s * s, axis=-1)


def np_hill(eigs):
  """Reference PL_Alpha_Hill, median xmin, tiny eigenvalues left out (one spectrum)."""
  lam = np.sort(np.maximum(np.asarray(eigs, np.float64), 0.0))
  lam = lam[lam >= TINY]
  n = lam.size
  i = n // 2
  xmin = lam[i]
  return 1.0 + (n - i) / np.sum(np.log(lam[i:] / xmin))


def heavy_tailed(rng, shape):
  # Student-t entries with 2 degrees of freedom: a heavy-tailed ESD, like a well-trained layer.
  return (rng.standard_t(2.0, size=shape) * 0.05).astype(np.float32)


SHAPES = [(64, 64), (96, 48), (40, 120), (33, 17)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["gaussian", "heavy"])
@pytest.mark.parametrize("estimator", ["auto", "tridiagonal", "eigh", "svd"])
def test_esd_and_alpha_match_numpy(shape, kind, estimator):
  rng = np.random.default_rng(sum(shape))
  w = (rng.standard_normal(shape).astype(np.float32) if kind == "gaussian"
       else heavy_tailed(rng, shape))
  got = np.asarray(llr_optax.esd(w, estimator))
  want = np_esd(w)
  assert got.shape == (min(shape),)
  assert np.all(np.diff(got) >= 0), "ascending"
  # Tolerances: the top half (all that alpha uses) to 1e-4 relative; every eigenvalue to 1e-4 of
  # the largest (a float32 Gram matrix cannot resolve the smallest ones more finely).
  top = slice(min(shape) // 2, None)
  np.testing.assert_allclose(got[top], want[top], rtol=1e-4)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * want[-1])
  alpha = float(llr_optax.matrix_alpha(w, estimator))
  np.testing.assert_allclose(alpha, np_hill(want), rtol=1e-4)


def test_batched_equals_per_matrix_and_reference():
  rng = np.random.default_rng(0)
  w = np.stack([heavy_tailed(rng, (3, 48, 80)), rng.standard_normal((3, 48, 80)).astype(np.float32)])
  got = np.asarray(llr_optax.matrix_alpha(w))
  assert got.shape == (2, 3)
  want = np.array([[np_hill(np_esd(w[a, b])) for b in range(3)] for a in range(2)])
  np.testing.assert_allclose(got, want, rtol=1e-4)
  eigs = np.asarray(llr_optax.esd(w))
  assert eigs.shape == (2, 3, 48)
  np.testing.assert_allclose(np.asarray(llr_optax.hill_alpha(eigs)), want, rtol=1e-4)
  # Heavy-tailed matrices have smaller alpha than Gaussian ones: the signal the method uses.
  assert np.all(got[0] < got[1])


def test_hill_alpha_formula_on_fixed_spectrum():
  eigs = jnp.array([0.5, 1.0, 2.0, 4.0, 8.0])   # N=5, i=2, xmin=2, k=3
  want = 1.0 + 3.0 / (np.log(1.0) + np.log(2.0) + np.log(4.0))
  np.testing.assert_allclose(float(llr_optax.hill_alpha(eigs)), want, rtol=1e-6)


def test_tiny_eigenvalues_are_left_out_not_logged():
  # A rank-3 spectrum padded with exact and rounding-level zeros: fit on the 3 usable values.
  eigs = jnp.array([-1e-9, 0.0, 1e-7, 1.0, 3.0, 9.0])
  want = np_hill([1.0, 3.0, 9.0])
  np.testing.assert_allclose(float(llr_optax.hill_alpha(eigs)), want, rtol=1e-6)


@pytest.mark.parametrize("eigs", [
    np.zeros(8),                             # zero matrix
    np.ones(8),                              # identity-like: flat top half
    np.array([0.1, 0.2, 0.3, 1.0, 1.0, 1.0]),  # flat top half
    np.array([0.0, 0.0, 0.0, 2.0]),          # one usable eigenvalue
    np.array([1.0, np.nan, 2.0, 3.0]),       # NaN weights
    np.array([1.0, 2.0, np.inf, 3.0]),
], ids=["zero", "ones", "flat-top", "rank1", "nan", "inf"])
def test_degenerate_spectra_give_nan_without_crashing(eigs):
  assert np.isnan(float(llr_optax.hill_alpha(jnp.asarray(eigs, jnp.float32))))


def test_degenerate_matrices_through_esd():
  for w in (np.zeros((16, 16), np.float32), np.eye(16, dtype=np.float32),
            np.full((16, 16), np.nan, np.float32)):
    assert np.isnan(float(llr_optax.matrix_alpha(w)))


def test_esd_under_jit_and_vmap():
  rng = np.random.default_rng(1)
  w = rng.standard_normal((4, 32, 24)).astype(np.float32)
  jitted = jax.jit(llr_optax.matrix_alpha)(w)
  vmapped = jax.vmap(llr_optax.matrix_alpha)(w)
  want = [np_hill(np_esd(x)) for x in w]
  np.testing.assert_allclose(np.asarray(jitted), want, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(vmapped), want, rtol=1e-4)


def test_grouped_matrix_alphas_batches_orientations_together():
  rng = np.random.default_rng(2)
  stacks = [rng.standard_normal((2, 32, 32)).astype(np.float32),    # like q_proj
            heavy_tailed(rng, (3, 32, 88)),                         # like gate_proj
            heavy_tailed(rng, (1, 88, 32)),                         # like down_proj
            rng.standard_normal((2, 16, 40)).astype(np.float32)]    # another Gram size
  calls = []

  def counting_solve(g):
    calls.append(g.shape)
    return llr_optax.hill_alpha(jnp.linalg.eigvalsh(g))

  got = llr_optax.grouped_matrix_alphas([jnp.asarray(s) for s in stacks], solve=counting_solve)
  # Two Gram sizes (32 and 16) -> exactly two batched solver calls.
  assert sorted(calls) == [(2, 16, 16), (6, 32, 32)]
  for stack, alphas in zip(stacks, got):
    np.testing.assert_allclose(np.asarray(alphas), [np_hill(np_esd(m)) for m in stack], rtol=1e-4)


def test_bad_inputs():
  with pytest.raises(ValueError, match="estimator"):
    llr_optax.esd(np.ones((4, 4)), estimator="qr")
  with pytest.raises(ValueError, match="matrix"):
    llr_optax.esd(np.ones(4))
