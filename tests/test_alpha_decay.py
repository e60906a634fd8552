"""AlphaDecay (`add_decayed_weights_by_alpha_hill`, `adamw_alpha_decay`) against a NumPy reference.

Per weight matrix `wd_l = np.interp(alpha_l, [alpha_min, alpha_max], [min_ratio wd, max_ratio wd])`
(alphas: float64 SVD + the port of the authors' median-Hill fit in tests/_numpy_reference.py);
embedding, head, norms and biases keep `wd`; the update is `u + wd_l * p`. Recomputed at step 0
and every `interval` steps, applied at once (or ramped over `ramp_steps`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import llr_optax
from tests import _numpy_reference as ref

WD, MIN_RATIO, MAX_RATIO = 0.1, 0.5, 1.5
# Participating matrices (a stacked leaf gives one per slice).
MATRICES = ("q_proj", "k_proj", "up_proj", "down_proj")


def make_params(seed, heavy):
  rng = np.random.default_rng(seed)
  draw = lambda name, shape: (rng.standard_t(2.0, shape) if name in heavy
                              else rng.standard_normal(shape)) * 0.1
  p = {"embed_tokens": rng.standard_normal((24, 16)), "lm_head": rng.standard_normal((16, 24)),
       "input_norm": 1 + 0.1 * rng.standard_normal(16), "o_proj": {"bias": rng.standard_normal(16)},
       "q_proj": draw("q_proj", (16, 16)), "k_proj": draw("k_proj", (16, 16)),
       "up_proj": draw("up_proj", (16, 32)),
       "down_proj": np.stack([draw("down_proj", (32, 16)), rng.standard_normal((32, 16)) * 0.1])}
  return jax.tree.map(lambda x: np.asarray(x, np.float32), p)


def param_sequence(steps):
  """Params that change every 2 steps (so within an interval of 3), heavy tails moving around."""
  heavy = [("q_proj",), ("up_proj", "down_proj"), ("k_proj",), ("q_proj", "up_proj")]
  return [make_params(50 + t // 2, heavy[(t // 2) % 4]) for t in range(steps)]


def np_alphas(params):
  """{name: [alpha per matrix]} of the participating matrices (float64 reference)."""
  out = {}
  for k in MATRICES:
    w = np.asarray(params[k], np.float64)
    out[k] = [ref.authors_alpha(ref.esd(m)) for m in w.reshape(-1, *w.shape[-2:])]
  return out


def np_decays(alphas, wd=WD, min_ratio=MIN_RATIO, max_ratio=MAX_RATIO):
  """AlphaDecay's linear map, written with np.interp as the authors' code does."""
  flat = np.concatenate([alphas[k] for k in MATRICES])
  lo, hi = flat.min(), flat.max()
  return {k: np.interp(alphas[k], [lo, hi], [min_ratio * wd, max_ratio * wd]) for k in MATRICES}


def reference_decays(param_seq, interval, ramp_steps):
  """The coefficient of each participating matrix at each step (NumPy simulation)."""
  out, applied = [], None
  for t, params in enumerate(param_seq):
    if t % interval == 0:
      target = np_decays(np_alphas(params))
      ramp_from, start = (target if applied is None else applied), t
    w = 1.0 if ramp_steps == 0 else min((t - start) / ramp_steps, 1.0)
    applied = {k: ramp_from[k] + w * (target[k] - ramp_from[k]) for k in MATRICES}
    out.append(applied)
  return out


@pytest.mark.parametrize("ramp_steps,mask", [(0, "bias"), (2, None)])
def test_decays_and_updates_follow_the_reference(ramp_steps, mask):
  steps, interval = 8, 3   # recomputes at 0, 3, 6; the params change at 2, 4, 6 as well
  param_seq = param_sequence(steps)
  mask_tree = None if mask is None else jax.tree.map(lambda _: True, param_seq[0])
  if mask is not None:
    mask_tree["o_proj"]["bias"] = False   # as adamw(mask=...): no decay on biases
  tx = llr_optax.add_decayed_weights_by_alpha_hill(WD, MIN_RATIO, MAX_RATIO, interval=interval,
                                                   ramp_steps=ramp_steps, mask=mask_tree)
  want = reference_decays(param_seq, interval, ramp_steps)
  update = jax.jit(tx.update)
  state = tx.init(param_seq[0])
  rng = np.random.default_rng(0)
  for t, params in enumerate(param_seq):
    u = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)
    out, state = update(u, state, params)
    decays = llr_optax.current_weight_decays(state)
    for k in MATRICES:
      got = np.asarray(decays[k]).ravel()
      # Tolerance: alphas agree to ~1e-5 relative; the linear map amplifies that by
      # (max_ratio - min_ratio) wd / (alpha_max - alpha_min) < 1.
      np.testing.assert_allclose(got, want[t][k], rtol=1e-4, err_msg=f"step {t} {k}")
      wd_l = np.asarray(want[t][k]).reshape(np.asarray(decays[k]).shape)
      np.testing.assert_allclose(np.asarray(out[k]), u[k] + wd_l * params[k], rtol=1e-4,
                                 atol=1e-6, err_msg=f"step {t} {k}")
    # Embedding, head and norm keep wd (not pinned by alpha); the masked bias gets none.
    for k in ("embed_tokens", "lm_head", "input_norm"):
      np.testing.assert_allclose(np.asarray(out[k]), u[k] + WD * params[k], rtol=1e-5, atol=1e-7)
      assert np.asarray(decays[k]).item() == pytest.approx(WD)
    if mask is None:
      np.testing.assert_allclose(np.asarray(out["o_proj"]["bias"]),
                                 u["o_proj"]["bias"] + WD * params["o_proj"]["bias"], rtol=1e-5)
    else:
      np.testing.assert_array_equal(np.asarray(out["o_proj"]["bias"]), u["o_proj"]["bias"])
      assert isinstance(decays["o_proj"]["bias"], optax.MaskedNode)
  # The extremes reach min_ratio * wd and max_ratio * wd, and the decays really moved between
  # recomputes (so "recompute only at multiples of interval" is tested).
  flat = lambda d: np.concatenate([np.ravel(d[k]) for k in MATRICES])
  assert flat(want[0]).min() == pytest.approx(MIN_RATIO * WD)
  assert flat(want[0]).max() == pytest.approx(MAX_RATIO * WD)
  assert np.abs(flat(want[2]) - flat(want[4])).max() > 0.01
  alphas = llr_optax.last_alphas(state)
  for k, a in np_alphas(param_seq[6]).items():
    np.testing.assert_allclose(np.asarray(alphas[k]).ravel(), a, rtol=1e-4, err_msg=k)
  assert np.isnan(np.asarray(alphas["embed_tokens"]).item())
  assert np.isnan(np.asarray(alphas["input_norm"]).item())


def test_ramp_moves_from_old_to_new_over_ramp_steps():
  # (checked value by value in the test above; here the three points of one ramp explicitly)
  param_seq = param_sequence(8)
  want = reference_decays(param_seq, 3, 2)
  old = np_decays(np_alphas(param_seq[0]))
  new = np_decays(np_alphas(param_seq[3]))
  for k in MATRICES:
    np.testing.assert_allclose(want[3][k], old[k])               # the recompute step: old
    np.testing.assert_allclose(want[4][k], (old[k] + new[k]) / 2)
    np.testing.assert_allclose(want[5][k], new[k])
  assert max(np.abs(old[k] - new[k]).max() for k in MATRICES) > 0.01


def test_adamw_alpha_decay_with_unit_ratios_is_adamw():
  kw = dict(b1=0.8, b2=0.95, eps=1e-7, weight_decay=0.05)
  # (estimator="eigh": with unit ratios the alphas do not matter, and it compiles faster)
  ours = llr_optax.adamw_alpha_decay(1e-2, min_ratio=1.0, max_ratio=1.0, interval=2,
                                     estimator="eigh", **kw)
  theirs = optax.adamw(1e-2, **kw)

  @jax.jit
  def step(g, s1, s2, params):
    u1, s1 = ours.update(g, s1, params)
    u2, s2 = theirs.update(g, s2, params)
    return u1, u2, s1, s2

  params = make_params(1, ("q_proj",))
  s1, s2 = ours.init(params), theirs.init(params)
  rng = np.random.default_rng(2)
  for t in range(4):
    g = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)
    u1, u2, s1, s2 = step(g, s1, s2, params)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9,
                                 err_msg=f"step {t}")
    params = jax.tree.map(lambda p, u: p + np.asarray(u), params, u1)
  decays = llr_optax.current_weight_decays(s1)
  assert all(np.allclose(np.asarray(d), 0.05) for d in jax.tree.leaves(decays))


def test_released_configuration_as_kwargs():
  assert llr_optax.ALPHA_DECAY_RELEASED == dict(min_ratio=0.6666, max_ratio=5.0, interval=500,
                                                min_eigenvalues=50)
  rng = np.random.default_rng(3)
  params = {"q_proj": rng.standard_t(2.0, (64, 64)) * 0.1,
            "up_proj": rng.standard_normal((64, 128)) * 0.1,
            "k_proj": rng.standard_normal((48, 48)) * 0.1}   # 48 < 50 eigenvalues: keeps wd
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  tx = llr_optax.adamw_alpha_decay(1e-3, weight_decay=0.1, estimator="eigh",
                                   **llr_optax.ALPHA_DECAY_RELEASED)
  zeros = jax.tree.map(np.zeros_like, params)
  with pytest.warns(UserWarning, match=r"k_proj: shape \[48, 48\].* < min_eigenvalues=50"):
    _, state = jax.jit(tx.update)(zeros, tx.init(params), params)
  decays = {k: np.asarray(v).item() for k, v in llr_optax.current_weight_decays(state).items()}
  # Two participating matrices: the heavy-tailed one at min_ratio * wd, the other at max.
  assert decays["q_proj"] == pytest.approx(0.6666 * 0.1)
  assert decays["up_proj"] == pytest.approx(5.0 * 0.1)
  assert decays["k_proj"] == pytest.approx(0.1)
  assert np.isnan(np.asarray(llr_optax.last_alphas(state)["k_proj"]).item())
  llr_optax.add_decayed_weights_by_alpha_hill(0.1, **llr_optax.ALPHA_DECAY_RELEASED)


@pytest.mark.parametrize("kwargs,name", [
    (dict(weight_decay=0.0), "weight_decay"), (dict(min_ratio=-1.0), "min_ratio"),
    (dict(min_ratio=2.0, max_ratio=1.0), "min_ratio"), (dict(interval=0), "interval"),
    (dict(ramp_steps=-1), "ramp_steps"), (dict(fixed_decays={"embed": -1.0}), "fixed_decays"),
    (dict(mapping_scope="layer"), "mapping_scope"), (dict(spread=5, interval=4), "spread"),
])
def test_bad_hyperparameters_name_the_parameter(kwargs, name):
  args = dict(weight_decay=0.1)
  args.update(kwargs)
  with pytest.raises(ValueError, match=name):
    llr_optax.add_decayed_weights_by_alpha_hill(**args)
