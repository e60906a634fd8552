"""`spectral_metrics` against NumPy: per matrix, from the float64 SVD and the port of the
authors' median-Hill fit and KS distance (tests/_numpy_reference.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llr_optax
from tests import _numpy_reference as ref


def make_params():
  rng = np.random.default_rng(21)
  p = {"embed_tokens": rng.standard_normal((24, 16)),
       "layers": {"q_proj": np.stack([rng.standard_t(2.0, (16, 16)), rng.standard_normal((16, 16)),
                                      rng.standard_t(4.0, (16, 16))]) * 0.1,
                  "input_norm": 1 + 0.1 * rng.standard_normal(16)},
       "up_proj": rng.standard_t(3.0, (16, 40)) * 0.1,
       "v_proj": rng.standard_normal((16, 1))}   # one eigenvalue: below min_eigenvalues=2
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), p)


def np_metrics(w):
  """Every metric of one matrix, in float64."""
  eigs = ref.esd(np.asarray(w, np.float64))
  alpha, ks = ref.authors_fit(eigs)
  lam_max, total = eigs[-1], eigs.sum()
  return {"alpha": alpha, "num_eigenvalues": float(eigs.size), "spectral_norm": lam_max,
          "frobenius_norm": total, "stable_rank": total / lam_max,
          "alpha_weighted": alpha * np.log10(lam_max), "log_norm": np.log10(total),
          "ks_distance": ks}


# Tolerances: float32 Gram + eigensolver vs float64 SVD. Eigenvalue sums and the largest
# eigenvalue to 1e-5; alpha (and what is built from it) to 1e-4; the KS distance (a max over
# fitted CDF differences, each moved by alpha's error) to 2e-4, as in test_spectral.py.
RTOL = {"alpha": 1e-4, "num_eigenvalues": 0, "spectral_norm": 1e-5, "frobenius_norm": 1e-5,
        "stable_rank": 2e-5, "alpha_weighted": 1e-4, "log_norm": 1e-5, "ks_distance": 2e-4}


def test_metric_names():
  assert llr_optax.SPECTRAL_METRICS == (
      "alpha", "num_eigenvalues", "spectral_norm", "frobenius_norm", "stable_rank",
      "alpha_weighted", "log_norm", "ks_distance")


def test_spectral_metrics_match_numpy_per_matrix():
  params = make_params()
  metrics = jax.jit(llr_optax.spectral_metrics)(params)
  assert set(metrics) == set(llr_optax.SPECTRAL_METRICS)
  q = np.asarray(params["layers"]["q_proj"])
  want = {"q_proj": [np_metrics(m) for m in q],
          "up_proj": [np_metrics(params["up_proj"])],
          "embed_tokens": [np_metrics(params["embed_tokens"])]}   # measured: nothing is pinned
  for name, tree in metrics.items():
    # Shaped like current_scales: per matrix for matrix leaves (matrix axes 1), scalar else.
    assert tree["layers"]["q_proj"].shape == (3, 1, 1)
    assert tree["up_proj"].shape == tree["embed_tokens"].shape == (1, 1)
    assert tree["layers"]["input_norm"].shape == ()
    got = {"q_proj": tree["layers"]["q_proj"], "up_proj": tree["up_proj"],
           "embed_tokens": tree["embed_tokens"]}
    for leaf, per_matrix in want.items():
      np.testing.assert_allclose(np.asarray(got[leaf]).ravel(), [m[name] for m in per_matrix],
                                 rtol=RTOL[name], err_msg=f"{name} {leaf}")
    # A norm scale and a matrix with one eigenvalue are not measured.
    assert np.isnan(np.asarray(tree["layers"]["input_norm"]))
    assert np.isnan(np.asarray(tree["v_proj"]).item())
  # The stacked matrices really differ (Student-t with 2 degrees of freedom: the heaviest tail).
  a = np.asarray(metrics["alpha"]["layers"]["q_proj"]).ravel()
  assert np.argmin(a) == 0 and np.ptp(a) > 0.3, a


def test_matrix_axes_and_min_eigenvalues():
  # A MaxText-style [d, L, f] kernel measured per layer with its layer axis as a batch.
  rng = np.random.default_rng(22)
  w = (rng.standard_t(3.0, (16, 2, 24)) * 0.1).astype(np.float32)
  params = {"mlp": {"wi_0": {"kernel": jnp.asarray(w)}}}
  axes = llr_optax.infer_matrix_axes(params, layer_axis=1)
  metrics = jax.jit(lambda p: llr_optax.spectral_metrics(p, matrix_axes=axes))(params)
  got = np.asarray(metrics["alpha"]["mlp"]["wi_0"]["kernel"])
  assert got.shape == (1, 2, 1)
  want = [ref.authors_alpha(ref.esd(w[:, i, :])) for i in range(2)]
  np.testing.assert_allclose(got.ravel(), want, rtol=1e-4)
  # min_eigenvalues above the 16 eigenvalues: not measured.
  none = jax.jit(lambda p: llr_optax.spectral_metrics(p, min_eigenvalues=17))(params)
  assert np.all(np.isnan(np.asarray(none["spectral_norm"]["mlp"]["wi_0"]["kernel"])))


def test_bad_arguments():
  with pytest.raises(ValueError, match="min_eigenvalues"):
    llr_optax.spectral_metrics(make_params(), min_eigenvalues=1)
  with pytest.raises(ValueError, match="estimator"):
    llr_optax.spectral_metrics(make_params(), estimator="qr")
