"""Mesh-aware ESD (`llr_optax._sharded`, `scale_by_alpha_hill(mesh=...)`).

The multi-device checks run `tests/_sharded_check.py` in a child process with 8 simulated CPU
devices (`XLA_FLAGS` must be set before jax is imported, so this process is left alone) and
assert on its JSON report. The single-device fallbacks are checked here directly. Under
pytest-xdist, conftest.py sends this whole module to one worker, which runs the child once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llr_optax
from tests import _numpy_reference as ref
from llr_optax import _sharded, _spectral

PARENT_XLA_FLAGS = os.environ.get("XLA_FLAGS")
CHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sharded_check.py")
CASES = ("auto/fsdp", "auto/tp/mesh-arg", "explicit/fsdp", "explicit/tp")
PARTICIPATING = {"gate_proj", "layers/down_proj", "layers/k_proj", "layers/q_proj",
                 "layers/up_proj", "layers/v_proj", "o_proj"}


@pytest.fixture(scope="module")
def report() -> dict:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=8"])
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, CHECK], env=env, capture_output=True, text=True,
                        timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-6000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_child_has_eight_devices_and_parent_is_untouched(report):
  assert report["devices"] == 8
  assert os.environ.get("XLA_FLAGS") == PARENT_XLA_FLAGS  # the flag went to the child only


def test_every_matrix_has_a_finite_alpha(report):
  # 11 Gram matrices of size 64 and 5 of size 48 (neither divides 8): all present and finite.
  ref = report["reference"]["alphas"]
  assert set(report["participating"]) == PARTICIPATING
  assert sum(len(ref[k]) for k in PARTICIPATING) == 16
  assert all(np.isfinite(ref[k]).all() for k in PARTICIPATING)


@pytest.mark.parametrize("case", CASES)
def test_sharded_alphas_and_scales_equal_single_device(report, case):
  ref = report["reference"]
  got = report["cases"][case]
  top_alpha = max(abs(a) for k in PARTICIPATING for a in ref["alphas"][k])
  top_scale = max(abs(s) for v in ref["scales"].values() for s in v)
  # max_diff is inf if any alpha went missing or became NaN (a padded one kept, a real dropped).
  assert got["alpha_diff"] <= 1e-5 * top_alpha, got["alpha_diff"]
  assert got["scale_diff"] <= 1e-5 * top_scale, got["scale_diff"]


@pytest.mark.parametrize("case", CASES)
def test_no_full_weight_or_gram_stack_is_all_gathered(report, case):
  gathers = report["cases"][case]["gathers"]
  assert gathers["full"] == [], gathers["full"]
  assert gathers["has_all_to_all_or_reduce_scatter"]  # the Grams are reduce-scattered


def test_naive_local_solve_does_all_gather(report):
  # Control: the same sharded params with the local solve gather full weights and Gram stacks,
  # so the assertion above can fail.
  gathers = report["naive"]["gathers"]
  assert gathers["full"], gathers
  assert sorted(map(tuple, gathers["full_gram_stacks"])) == [(5, 48, 48), (11, 64, 64)]


def test_sharded_solve_hook(report):
  assert report["sharded_solve_diff"] <= 1e-6


# --- one device: the plain local solve -------------------------------------------------------

def _stacks():
  key = jax.random.key(1)
  return [jax.random.normal(jax.random.fold_in(key, i), s)
          for i, s in enumerate([(3, 32, 48), (2, 48, 32), (1, 32, 32)])]  # one Gram size


def _one_device_mesh():
  return jax.make_mesh((1,), ("x",), devices=jax.devices()[:1])


def test_resolve_mesh_falls_back_without_devices():
  one = _one_device_mesh()
  assert _sharded.resolve_mesh() is None
  assert _sharded.resolve_mesh(False) is None
  assert _sharded.resolve_mesh(one) is None
  with jax.set_mesh(one):
    assert _sharded.resolve_mesh() is None


def test_local_fallback_equals_spectral():
  want = jax.jit(_spectral.grouped_matrix_alphas)(_stacks())
  got = jax.jit(_sharded.grouped_matrix_alphas)(_stacks())
  hook = jax.jit(lambda s: _spectral.grouped_matrix_alphas(s, solve=_sharded.sharded_solve()))(
      _stacks())
  for w, g, h in zip(want, got, hook):
    np.testing.assert_array_equal(g, w)
    np.testing.assert_allclose(h, w, rtol=1e-6)  # one matrix per solve (lax.map): 1-ulp apart


def test_scale_by_alpha_hill_on_a_one_device_mesh():
  params = {"q_proj": jax.random.normal(jax.random.key(0), (16, 16)),
            "up_proj": jax.random.normal(jax.random.key(1), (16, 40))}
  grads = jax.tree.map(jnp.ones_like, params)

  def alphas(**kw):
    tx = llr_optax.scale_by_alpha_hill(**kw)
    _, state = jax.jit(tx.update)(grads, tx.init(params), params)
    return llr_optax.last_alphas(state)

  want = alphas()
  one = _one_device_mesh()
  with jax.set_mesh(one):
    for got in (alphas(), alphas(mesh=one)):
      for k in want:
        np.testing.assert_array_equal(got[k], want[k])


# --- the per-device solve: `_spectral.fit_spectra` (top half + trace, Sturm count) -----------
# (Here because every device of the sharded path runs it; it is also the local default solve.)

@pytest.mark.parametrize("k", [3, 64])
@pytest.mark.parametrize("zero_threshold", [None, 1e-5])
def test_fit_spectra_equals_the_full_spectrum_fit(k, zero_threshold):
  w = jax.random.normal(jax.random.key(k), (5, 3 * k, k))
  g = jnp.einsum("bck,bcl->bkl", w, w)
  got = jax.jit(lambda g: _spectral.fit_spectra(g, zero_threshold=zero_threshold))(g)
  want = jax.jit(lambda g: _spectral.spectral_stats(_spectral.eigvalsh(g), zero_threshold))(g)
  np.testing.assert_allclose(got, want, rtol=2e-5)


_FIT = jax.jit(lambda g: _spectral.fit_alphas(g, zero_threshold=1e-5))


@pytest.mark.parametrize("below", [0, 3, 8, 12, 14, 16])
def test_fit_alphas_counts_filtered_eigenvalues_exactly(below):
  # Exact zeros and 3e-6 (<= the 1e-5 threshold) next to large eigenvalues: the bisection's
  # absolute resolution (eps * |g| ~ 3e-4) is coarser than the threshold; the Sturm count still
  # drops them, as float64 does.
  lam = np.concatenate([np.zeros(below - below // 2), np.full(below // 2, 3e-6),
                        np.linspace(1.0, 50.0, 16 - below) ** 2])
  g = jnp.asarray(np.diag(np.random.default_rng(below).permutation(lam)), jnp.float32)
  got = float(_FIT(g[None])[0])
  kept = lam[lam > 1e-5]
  want = ref.authors_alpha(lam, filter_zeros=True) if kept.size >= 2 else np.nan
  if not np.isfinite(want):
    want = np.nan   # a one-point tail: the authors' code divides by zero, we report NaN
  np.testing.assert_allclose(got, want, rtol=1e-5, equal_nan=True)
