"""optax's contract checks on our transformations, continued: (c) inject_hyperparams, (d)
MultiSteps, (e) apply_if_finite, (h) complex values (the list, fixtures and chains are in
test_optax_contract.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import llr_optax
from tests import _numpy_reference as ref
from tests.test_optax_contract import (PARAMS, STEPS, applied, apply_updates, assert_trees_close,
                                       chain, grads_at, our_states)

# --- plain chains (reference for (c), (d), (e)), jitted once per method ------------------------

_JITTED = {}


def plain_update(method):
  if method not in _JITTED:
    _JITTED[method] = jax.jit(chain("adamw", method).update)
  return _JITTED[method]


def run_plain(method, grads_seq):
  """(updates, applied values, state) after each update of `chain(adamw, method)`, params moved."""
  tx, update = chain("adamw", method), plain_update(method)
  params, state, out = PARAMS, tx.init(PARAMS), []
  for g in grads_seq:
    u, state = update(g, state, params)
    params = apply_updates(params, u)
    out.append((u, applied(state), state))
  return out


def test_second_jitted_update_does_not_recompile():
  update = plain_update("alpha_hill")
  tx = chain("adamw", "alpha_hill")
  state = tx.init(PARAMS)
  before = update._cache_size()
  for t in range(3):
    _, state = update(grads_at(t), state, PARAMS)
  assert update._cache_size() - before <= 1   # one compile (none if an earlier test made it)


# --- (c) inject_hyperparams ---------------------------------------------------------------------

INJECTED = {
    # factory, injected numeric arguments (as Python numbers), fixed keyword arguments
    "alpha_hill": (llr_optax.scale_by_alpha_hill,
                   dict(s_min=1.0, s_max=3.0, interval=2, ramp_steps=1, total_steps=STEPS,
                        active_fraction=0.5),
                   dict(estimator="eigh")),
    "relative": (llr_optax.relative_schedule,
                 dict(total_steps=STEPS, final_fraction=0.1, warmup_steps=2),
                 dict(multipliers=llr_optax.DENSE_MULTIPLIERS)),
    "alpha_decay": (llr_optax.add_decayed_weights_by_alpha_hill,
                    dict(weight_decay=0.1, min_ratio=0.5, max_ratio=1.5, interval=2,
                         ramp_steps=0, total_steps=STEPS, active_fraction=0.5),
                    dict(estimator="eigh")),
}
STATIC = {"alpha_hill": ("min_eigenvalues", "spread"), "relative": (),
          "alpha_decay": ("min_eigenvalues", "spread")}


def as_numpy_scalars(kw):
  """The same numbers as NumPy scalars (np.int64 / np.float32), which must be accepted too."""
  return {k: np.int64(v) if isinstance(v, int) else np.float32(v) for k, v in kw.items()}


@pytest.mark.parametrize("method", list(INJECTED))
def test_inject_hyperparams_under_jit_equals_the_plain_factory(method):
  factory, numeric, fixed = INJECTED[method]
  injected = optax.inject_hyperparams(factory, static_args=STATIC[method])(**numeric, **fixed)
  plain = factory(**as_numpy_scalars(numeric), **fixed)
  s_inj = jax.jit(injected.init)(PARAMS)
  s_plain = plain.init(PARAMS)
  assert set(numeric) <= set(s_inj.hyperparams)

  @jax.jit
  def step(g, s_inj, s_plain, params):
    u_inj, s_inj = injected.update(g, s_inj, params)
    u_plain, s_plain = plain.update(g, s_plain, params)
    return u_inj, u_plain, s_inj, s_plain

  params = PARAMS
  for t in range(4):
    g = grads_at(t, params)
    u_inj, u_plain, s_inj, s_plain = step(g, s_inj, s_plain, params)
    assert_trees_close(u_inj, u_plain, rtol=1e-6, what=f"{method} step {t}")
    assert_trees_close(applied(s_inj.inner_state), applied(s_plain), rtol=1e-6)
    params = apply_updates(params, jax.tree.map(lambda u: -0.05 * np.asarray(u), u_inj))
  # The injected numbers are live: changing the one that pins the embedding (s_max for LR
  # factors, weight_decay for AlphaDecay) moves the embedding's value at the next update.
  live = {"alpha_hill": ("s_max", 3.0, 4.0), "alpha_decay": ("weight_decay", 0.1, 0.2)}
  if method in live:
    name, old, new = live[method]
    s_inj.hyperparams[name] = jnp.asarray(new, s_inj.hyperparams[name].dtype)
    _, _, s_inj, s_plain = step(grads_at(9), s_inj, s_plain, params)
    assert np.asarray(applied(s_plain)["embed_tokens"]).item() == pytest.approx(old)
    assert np.asarray(applied(s_inj.inner_state)["embed_tokens"]).item() == pytest.approx(new)


@pytest.mark.parametrize("method,bad", [
    ("alpha_hill", dict(s_min=-1.0)), ("alpha_hill", dict(interval=0)),
    ("alpha_hill", dict(total_steps=0)), ("relative", dict(final_fraction=0.0)),
    ("relative", dict(warmup_steps=-1)), ("alpha_decay", dict(weight_decay=-0.1)),
    ("alpha_decay", dict(max_ratio=0.0)),
])
def test_inject_hyperparams_validates_concrete_values_eagerly(method, bad):
  factory, numeric, fixed = INJECTED[method]
  name = next(iter(bad))
  tx = optax.inject_hyperparams(factory, static_args=STATIC[method])(**{**numeric, **bad}, **fixed)
  with pytest.raises(ValueError, match=name):
    tx.init(PARAMS)
  with pytest.raises(ValueError, match=name):  # and the plain factory, with a NumPy scalar
    factory(**{**numeric, **as_numpy_scalars(bad)}, **fixed)


@pytest.mark.parametrize("method", ["alpha_hill", "alpha_decay"])
def test_traced_min_eigenvalues_asks_for_static_args(method):
  factory, numeric, fixed = INJECTED[method]
  tx = optax.inject_hyperparams(factory)(**numeric, **fixed)
  with pytest.raises(ValueError, match=r"min_eigenvalues.*static_args"):
    jax.jit(tx.init)(PARAMS)


def test_numpy_scalars_are_accepted_by_the_factories():
  tx = llr_optax.scale_by_alpha_hill(total_steps=np.int64(1000), s_max=np.float32(3),
                                     interval=np.int32(5), active_fraction=np.float64(0.5))
  state = tx.init(PARAMS)
  assert np.asarray(llr_optax.current_scales(state)["embed_tokens"]).item() == 3.0
  llr_optax.relative_schedule(llr_optax.DENSE_MULTIPLIERS, np.int64(1000), np.float32(0.06),
                              np.int64(10))
  llr_optax.add_decayed_weights_by_alpha_hill(np.float32(0.1), total_steps=np.int64(1000))
  with pytest.raises(ValueError, match="total_steps"):
    llr_optax.scale_by_alpha_hill(total_steps=np.float32(10.5))


# --- (d) MultiSteps, (e) apply_if_finite -------------------------------------------------------

# (alpha_decay runs the same `_recompute` mechanism and count as alpha_hill)
@pytest.mark.parametrize("method", ["alpha_hill", "relative"])
def test_multi_steps_counts_real_updates(method):
  k, real = 2, 4
  micro = [grads_at(100 + t) for t in range(k * real)]
  mean = [jax.tree.map(lambda *g: sum(np.asarray(x) for x in g) / k, *micro[k * t:k * t + k])
          for t in range(real)]
  want = run_plain(method, mean)
  tx = optax.MultiSteps(chain("adamw", method), every_k_schedule=k)
  update = jax.jit(tx.update)
  params, state = PARAMS, tx.init(PARAMS)
  for t, g in enumerate(micro):
    u, state = update(g, state, params)
    params = apply_updates(params, u)
    (ours,) = our_states(state)
    assert int(ours.count) == (t + 1) // k, f"micro-step {t}"
    if (t + 1) % k == 0:
      u_want, applied_want, _ = want[t // k]
      assert_trees_close(applied(state), applied_want, rtol=1e-6, what=f"factors micro {t}")
      assert_trees_close(u, u_want, rtol=1e-5, atol=1e-7, what=f"updates micro {t}")
    else:
      assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(u))
  # The factors really moved over the run (the check compares something that changes).
  first, last = want[0][1], want[-1][1]
  assert any(not np.allclose(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(last)))


@pytest.mark.parametrize("method", ["alpha_hill"])   # (count, ramp and alphas: all kept)
def test_apply_if_finite_keeps_our_state_on_a_nan_step(method):
  g0, g2 = grads_at(0), grads_at(2)
  nan = grads_at(1)
  nan["layers_0"]["up_proj"][3, 4] = np.nan
  want = run_plain(method, [g0, g2])
  tx = optax.apply_if_finite(chain("adamw", method), max_consecutive_errors=3)
  update = jax.jit(tx.update)
  params, state = PARAMS, tx.init(PARAMS)
  u, state = update(g0, state, params)
  params = apply_updates(params, u)
  kept = state.inner_state
  u, state = update(nan, state, params)
  assert int(state.notfinite_count) == 1
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(u))
  for a, b in zip(jax.tree.leaves(state.inner_state), jax.tree.leaves(kept)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(our_states(state)[0].count) == 1
  u, state = update(g2, state, params)
  assert_trees_close(u, want[1][0], rtol=1e-5, atol=1e-7, what="step after the NaN step")
  assert_trees_close(applied(state.inner_state), want[1][1], rtol=1e-6)


# --- (h) complex params and gradients -----------------------------------------------------------

def test_init_grad_scales_use_the_modulus_of_complex_gradients():
  rng = np.random.default_rng(11)
  shapes = {"a": (8, 4), "b": (5,), "c": (3, 3)}
  grads = [{k: (rng.standard_normal(s) + 1j * rng.standard_normal(s) * w).astype(np.complex64)
            for (k, s), w in zip(shapes.items(), (1.0, 3.0, 0.1))} for _ in range(3)]
  got = llr_optax.init_grad_scales([jax.tree.map(jnp.asarray, g) for g in grads])
  # NumPy reference: G_l = sum_t mean |g| (modulus), u = 1/sqrt(G), count-weighted mean 1.
  big_g = {k: sum(np.mean(np.abs(g[k].astype(np.complex128))) for g in grads) for k in shapes}
  u = {k: 1 / np.sqrt(big_g[k]) for k in shapes}
  n = {k: np.prod(s) for k, s in shapes.items()}
  mean = sum(n[k] * u[k] for k in shapes) / sum(n.values())
  for k in shapes:
    np.testing.assert_allclose(float(got[k]), u[k] / mean, rtol=1e-6)
  # The real part alone would give other factors (so the test tells the two apart).
  real_g = {k: sum(np.mean(np.abs(g[k].real)) for g in grads) for k in shapes}
  assert abs(real_g["b"] / real_g["a"] - big_g["b"] / big_g["a"]) > 0.1


def test_alpha_hill_on_complex_params_keeps_the_imaginary_part():
  rng = np.random.default_rng(12)
  c = lambda *s, t=None: ((rng.standard_t(t, s) if t else rng.standard_normal(s))
                          + 1j * rng.standard_normal(s)).astype(np.complex64) * 0.1
  params = {"q_proj": jnp.asarray(c(16, 16, t=2.0)), "up_proj": jnp.asarray(c(16, 32)),
            "down_proj": jnp.asarray(c(2, 32, 16, t=3.0))}
  grads = {k: jnp.asarray(c(*v.shape)) for k, v in params.items()}
  tx = optax.chain(optax.adamw(0.01), llr_optax.scale_by_alpha_hill(interval=1, total_steps=None,
                                                                     estimator="eigh"))
  base = optax.adamw(0.01)

  @jax.jit
  def step(grads, params):
    u, state = tx.update(grads, tx.init(params), params)
    return u, state, base.update(grads, base.init(params), params)[0]

  u, state, u_base = step(grads, params)
  alphas = llr_optax.last_alphas(state)
  scales = llr_optax.current_scales(state)
  # Alphas from the complex matrices' SVD (float64 port of the authors' median-Hill).
  want = {"q_proj": [ref.authors_alpha(ref.esd(np.asarray(params["q_proj"])))],
          "up_proj": [ref.authors_alpha(ref.esd(np.asarray(params["up_proj"])))],
          "down_proj": [ref.authors_alpha(ref.esd(m)) for m in np.asarray(params["down_proj"])]}
  for k, a in want.items():
    np.testing.assert_allclose(np.asarray(alphas[k]).ravel(), a, rtol=1e-4, err_msg=k)
    # ... and the real part alone would give different alphas.
    real_alpha = [ref.authors_alpha(ref.esd(m.real)) for m in np.asarray(params[k]).reshape(
        -1, *params[k].shape[-2:])]
    assert np.max(np.abs(np.asarray(real_alpha) - a)) > 1e-2, k
  for k in params:
    assert u[k].dtype == jnp.complex64
    np.testing.assert_allclose(np.asarray(u[k]), np.asarray(u_base[k]) * np.asarray(scales[k]),
                               rtol=1e-5, atol=1e-8)
    assert np.abs(np.asarray(u[k]).imag).max() > 1e-4
