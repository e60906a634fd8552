"""esd / hill_alpha / matrix_alpha / spectral_stats against NumPy references (tests/_numpy_reference.py:
float64 SVD and a port of the authors' median-Hill fit)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llr_optax
from llr_optax import _spectral
from tests import _numpy_reference as ref

np_esd = ref.esd
np_hill = ref.authors_alpha


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


def test_every_eigenvalue_counts_as_in_the_authors_released_configs():
  # The example: diag(sqrt([1e-6, 2e-6, 1, ..., 8])) has the ESD [1e-6, 2e-6, 1, ..., 8].
  # All 10 count (filter_zeros=False): i = 5, xmin = 4, tail 4..8 -> alpha = 3.6576.
  w = np.diag(np.sqrt([1e-6, 2e-6, 1, 2, 3, 4, 5, 6, 7, 8])).astype(np.float32)
  want = np_hill(np_esd(w))
  assert want == pytest.approx(1 + 5 / np.log(5 * 6 * 7 * 8 / 4**4), rel=1e-7)  # (float32 input)
  assert round(want, 4) == 3.6576
  for estimator in ("tridiagonal", "eigh", "svd"):
    np.testing.assert_allclose(float(llr_optax.matrix_alpha(w, estimator)), want, rtol=1e-5)
  # The authors' filter_zeros=True (threshold 1e-5) drops the two small ones: another alpha.
  filtered = np_hill(np_esd(w), filter_zeros=True)
  assert abs(filtered - want) > 0.1
  np.testing.assert_allclose(float(llr_optax.matrix_alpha(w, zero_threshold=1e-5)), filtered,
                             rtol=1e-5)


def test_square_gaussian_small_eigenvalues_still_count():
  # A square 128x128 N(0, 0.02^2) matrix (tiny preset's attention shape): its smallest
  # eigenvalues are ~1e-6, below the authors' 1e-5 threshold, and they count by default.
  # (Seed 5 has two eigenvalues below 1e-5: dropping two moves the median index by one.)
  w = (np.random.default_rng(5).standard_normal((128, 128)) * 0.02).astype(np.float32)
  eigs = np_esd(w)
  assert np.sum(eigs <= 1e-5) == 2
  want, want_filtered = np_hill(eigs), np_hill(eigs, filter_zeros=True)
  assert abs(want - want_filtered) > 1e-4     # the median index moves
  got = float(llr_optax.matrix_alpha(w))
  got_filtered = float(llr_optax.matrix_alpha(w, zero_threshold=1e-5))
  np.testing.assert_allclose(got, want, rtol=1e-4)
  np.testing.assert_allclose(got_filtered, want_filtered, rtol=1e-4)


@pytest.mark.parametrize("shape,rank", [((32, 16), 1), ((32, 16), 7), ((64, 64), 2),
                                        ((128, 128), 63), ((40, 120), 19), ((256, 96), 1)])
def test_median_at_rounding_level_is_undefined(shape, rank):
  # Rank below N/2: the median eigenvalue is 0 in exact arithmetic; what is there instead is the
  # rounding of the matrix (and of its Gram). The authors' rule reads an alpha off it, and that
  # number depends on the precision, not on the matrix: the same product held in float64 gives
  # another one. We return NaN.
  rng = np.random.default_rng(rank)
  w64 = rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, shape[1]))
  w = w64.astype(np.float32)
  from_f32, from_f64 = np_hill(np_esd(w)), np_hill(np_esd(w64))
  assert not np.isclose(from_f32, from_f64, rtol=1e-2)
  for estimator in ("tridiagonal", "eigh", "svd"):
    assert np.isnan(float(llr_optax.matrix_alpha(w, estimator))), estimator


@pytest.mark.parametrize("shape", [(32, 16), (128, 128), (40, 120)])
def test_rank_just_above_half_is_a_genuine_fit(shape):
  # One more than half the rank: the median is the smallest non-zero eigenvalue, a genuine one.
  n = min(shape)
  rank = n - n // 2 + 1
  rng = np.random.default_rng(n)
  w = (rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, shape[1]))
       ).astype(np.float32)
  np.testing.assert_allclose(float(llr_optax.matrix_alpha(w)), np_hill(np_esd(w)), rtol=1e-3)


def test_filter_zeros_drops_values_at_or_below_the_threshold():
  eigs = jnp.array([-1e-9, 0.0, 1e-7, 1e-5, 1.0, 3.0, 9.0])
  # Kept: 1, 3, 9 (1e-5 itself is dropped: the authors keep eigs > thresh).
  want = np_hill(np.asarray(eigs), filter_zeros=True)
  assert want == pytest.approx(np_hill([1.0, 3.0, 9.0]))
  np.testing.assert_allclose(float(llr_optax.hill_alpha(eigs, zero_threshold=1e-5)), want,
                             rtol=1e-6)
  # Nothing above the threshold: the authors fall back to every eigenvalue.
  small = jnp.array([1e-8, 2e-8, 4e-8, 8e-8])
  np.testing.assert_allclose(float(llr_optax.hill_alpha(small, zero_threshold=1e-5)),
                             np_hill(np.asarray(small), filter_zeros=True), rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_spectral_stats_and_ks_distance_match_the_authors_code(shape):
  rng = np.random.default_rng(sum(shape) + 1)
  w = heavy_tailed(rng, shape)
  eigs = np_esd(w)
  alpha, ks = ref.authors_fit(eigs)
  got = np.asarray(_spectral.spectral_stats(llr_optax.esd(w)))
  np.testing.assert_allclose(got, [alpha, eigs[-1], eigs.sum(), ks], rtol=2e-4)
  fitted = np.asarray(_spectral.fit_spectra(_spectral.gram(w)))   # top half + trace
  np.testing.assert_allclose(fitted, got, rtol=2e-4)


def test_complex_weights_use_the_hermitian_gram():
  rng = np.random.default_rng(5)
  w = (rng.standard_normal((48, 20)) + 1j * rng.standard_normal((48, 20))).astype(np.complex64)
  want = np_esd(w)   # NumPy's SVD of the complex matrix: eigenvalues of W^H W
  for estimator in ("tridiagonal", "eigh", "svd"):
    got = np.asarray(llr_optax.esd(w, estimator))
    np.testing.assert_allclose(got[10:], want[10:], rtol=1e-4)
    np.testing.assert_allclose(float(llr_optax.matrix_alpha(w, estimator)), np_hill(want),
                               rtol=1e-4)
  # The real part alone has another spectrum: the imaginary part is not dropped.
  assert abs(np_hill(np_esd(w.real)) - np_hill(want)) > 1e-3


@pytest.mark.parametrize("eigs", [
    np.zeros(8),                             # zero matrix
    np.ones(8),                              # identity-like: flat top half
    np.array([0.1, 0.2, 0.3, 1.0, 1.0, 1.0]),  # flat top half
    np.array([0.0, 0.0, 0.0, 2.0]),          # rank 1: the median is 0
    np.array([1.0, np.nan, 2.0, 3.0]),       # NaN weights
    np.array([1.0, 2.0, np.inf, 3.0]),
    np.array([3.0]),                         # one eigenvalue
], ids=["zero", "ones", "flat-top", "rank1", "nan", "inf", "single"])
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
  with pytest.raises(ValueError, match="zero_threshold"):
    llr_optax.hill_alpha(jnp.ones(4), zero_threshold=-1.0)
