"""scale_by_alpha_hill against a NumPy simulation of SPEC.md section 1, step by step."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import llr_optax
from llr_optax import _recompute  # chunks / make_plan: the slices a spread recompute solves
from tests.test_spectral import np_esd, np_hill

S_MIN, S_MAX = 1.0, 5.0
MATRICES = ("q_proj", "k_proj", "up_proj", "down_proj")


def make_params(seed, heavy=("q_proj",)):
  """A small transformer-like tree; `heavy` matrices get Student-t (heavy-tailed) entries."""
  rng = np.random.default_rng(seed)
  shapes = {"q_proj": (16, 16), "k_proj": (16, 16), "up_proj": (16, 40), "down_proj": (40, 16)}
  p = {"embed_tokens": rng.standard_normal((24, 16)), "lm_head": rng.standard_normal((16, 24)),
       "input_norm": np.ones(16)}
  for name, shape in shapes.items():
    p[name] = (rng.standard_t(2.0, shape) * 0.1 if name in heavy
               else rng.standard_normal(shape) * 0.1)
  return {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}


def reference_scales(param_seq, interval, ramp, active_steps):
  """NumPy simulation: the factor each matrix gets at each step (SPEC.md section 1)."""
  applied = {k: 1.0 for k in MATRICES}
  out = []
  for t, params in enumerate(param_seq):
    if t % interval == 0 and (active_steps is None or t < active_steps):
      alphas = {}
      for k in MATRICES:
        w = np.asarray(params[k], np.float64)
        a = np_hill(np_esd(w)) if np.all(np.isfinite(w)) and np.any(w) else np.nan
        alphas[k] = a
      finite = [a for a in alphas.values() if np.isfinite(a)]
      lo, hi = min(finite), max(finite)
      target = {}
      for k, a in alphas.items():
        if not np.isfinite(a):
          target[k] = applied[k]
        else:
          target[k] = S_MAX if hi == lo else S_MIN + (S_MAX - S_MIN) * (a - lo) / (hi - lo)
      ramp_from = dict(target) if t == 0 else dict(applied)
      t0 = t
    w = 1.0 if ramp == 0 else min(max((t - t0) / ramp, 0.0), 1.0)
    applied = {k: ramp_from[k] + w * (target[k] - ramp_from[k]) for k in MATRICES}
    out.append(dict(applied))
  return out


def param_sequence(steps):
  """Params that drift over time so that alphas (and so targets) change between recomputes."""
  seq = []
  for t in range(steps):
    heavy = ("q_proj",) if (t // 3) % 2 == 0 else ("up_proj", "k_proj")
    seq.append(make_params(100 + t // 3, heavy))
  return seq


def run(tx, param_seq):
  state = tx.init(param_seq[0])
  update = jax.jit(tx.update)
  scales, states = [], []
  for params in param_seq:
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = update(grads, state, params)
    scales.append(llr_optax.current_scales(state))
    states.append(state)
  return scales, states


@pytest.mark.parametrize("ramp", [2, 0])
def test_scales_follow_reference_at_every_step(ramp):
  steps, interval, total = 16, 3, 20     # active while t < 10: recomputes at 0, 3, 6, 9
  param_seq = param_sequence(steps)
  tx = llr_optax.scale_by_alpha_hill(S_MIN, S_MAX, interval=interval, ramp_steps=ramp,
                                     total_steps=total, active_fraction=0.5)
  got, _ = run(tx, param_seq)
  want = reference_scales(param_seq, interval, ramp, math.ceil(0.5 * total))
  for t in range(steps):
    for k in MATRICES:
      # Tolerance: float32 eigenvalues vs float64 SVD move alpha by ~1e-6 relative; the linear
      # map amplifies that by (s_max - s_min) / (alpha_max - alpha_min) ~ 4.
      np.testing.assert_allclose(float(got[t][k].squeeze()), want[t][k], atol=1e-4,
                                 err_msg=f"step {t} leaf {k}")
    # Embedding and head pinned at s_max, norms at 1, every step.
    assert float(got[t]["embed_tokens"].squeeze()) == S_MAX
    assert float(got[t]["lm_head"].squeeze()) == S_MAX
    assert float(got[t]["input_norm"]) == 1.0
  # The schedule really moves: the extremes reach s_min and s_max after each recompute.
  assert min(float(got[1][k].squeeze()) for k in MATRICES) == pytest.approx(S_MIN)
  assert max(float(got[1][k].squeeze()) for k in MATRICES) == pytest.approx(S_MAX)


def test_soft_switch_moves_linearly_from_old_to_new():
  param_seq = param_sequence(8)
  tx = llr_optax.scale_by_alpha_hill(S_MIN, S_MAX, interval=4, ramp_steps=4, total_steps=None)
  got, _ = run(tx, param_seq)
  for k in MATRICES:
    old, new = float(got[3][k].squeeze()), _target(param_seq, 4, k)
    assert abs(new - old) > 0.1, "the test needs targets that move"
    # At the recompute step (4) the old factor still applies, then a quarter of the way per step.
    for t, w in zip(range(4, 8), (0.0, 0.25, 0.5, 0.75)):
      np.testing.assert_allclose(float(got[t][k].squeeze()), old + w * (new - old), atol=1e-4,
                                 err_msg=f"step {t} {k}")


def _target(param_seq, t, k):
  """The mapped target of leaf k from the params at step t (NumPy)."""
  alphas = {m: np_hill(np_esd(np.asarray(param_seq[t][m], np.float64))) for m in MATRICES}
  lo, hi = min(alphas.values()), max(alphas.values())
  return S_MIN + (S_MAX - S_MIN) * (alphas[k] - lo) / (hi - lo)


def test_no_recompute_after_active_phase():
  param_seq = param_sequence(10)
  # Later params are wildly different: if anything were recomputed, the factors would change.
  late = [make_params(999, heavy=("down_proj", "k_proj", "up_proj"))] * 10
  tx = llr_optax.scale_by_alpha_hill(S_MIN, S_MAX, interval=2, ramp_steps=1, total_steps=20,
                                     active_fraction=0.25)   # recomputes at 0, 2, 4 only
  got, states = run(tx, param_seq[:5] + late)
  # (every participating matrix's ramp started at the last recompute, 4; the others never)
  assert int(np.max(np.asarray(states[-1].ramp_start))) == 4
  for t in range(6, 15):
    for k in MATRICES:
      assert float(got[t][k].squeeze()) == float(got[5][k].squeeze())
  np.testing.assert_array_equal(np.asarray(states[-1].alphas.tree()["q_proj"]),
                                np.asarray(states[4].alphas.tree()["q_proj"]))


def test_degenerate_matrix_keeps_its_previous_scale_and_no_nan_leaks():
  param_seq = param_sequence(7)
  bad = dict(param_seq[3])
  bad["k_proj"] = jnp.zeros_like(bad["k_proj"])
  param_seq[3] = bad
  bad6 = dict(param_seq[6])
  bad6["up_proj"] = jnp.full_like(bad6["up_proj"], jnp.nan)
  param_seq[6] = bad6
  tx = llr_optax.scale_by_alpha_hill(S_MIN, S_MAX, interval=3, ramp_steps=0, total_steps=None)
  got, states = run(tx, param_seq)
  want = reference_scales(param_seq, 3, 0, None)
  assert float(got[3]["k_proj"].squeeze()) == pytest.approx(float(got[2]["k_proj"].squeeze()))
  assert float(got[6]["up_proj"].squeeze()) == pytest.approx(float(got[5]["up_proj"].squeeze()))
  for t in range(7):
    for k in MATRICES:
      np.testing.assert_allclose(float(got[t][k].squeeze()), want[t][k], atol=1e-4)
  assert np.isnan(float(states[3].alphas.tree()["k_proj"].squeeze()))
  # The NaN weights are the caller's problem, but our factors stay finite.
  assert all(np.all(np.isfinite(np.asarray(s))) for s in jax.tree.leaves(got))


def test_equal_alphas_map_to_s_max():
  p = make_params(0, heavy=())
  for k in MATRICES:
    p[k] = jnp.asarray(np.random.default_rng(5).standard_normal((16, 16)), jnp.float32)
  p["up_proj"] = p["q_proj"]      # shapes must match the tree; reuse the same matrix everywhere
  p["down_proj"] = p["q_proj"]
  tx = llr_optax.scale_by_alpha_hill(S_MIN, S_MAX, interval=1, total_steps=None)
  got, _ = run(tx, [p])
  for k in MATRICES:
    assert float(got[0][k].squeeze()) == S_MAX


def test_stacked_layers_get_one_alpha_and_scale_per_slice():
  rng = np.random.default_rng(3)
  stacked = np.stack([rng.standard_t(2.0, (16, 16)) * 0.1, rng.standard_normal((16, 16)) * 0.1,
                      rng.standard_t(3.0, (16, 16)) * 0.1]).astype(np.float32)
  params = {"layers": {"q_proj": jnp.asarray(stacked)}}
  tx = llr_optax.scale_by_alpha_hill(S_MIN, S_MAX, total_steps=None)
  state = tx.init(params)
  updates, state = tx.update({"layers": {"q_proj": jnp.ones((3, 16, 16))}}, state, params)
  scales = np.asarray(llr_optax.current_scales(state)["layers"]["q_proj"])
  alphas = np.asarray(llr_optax.last_alphas(state)["layers"]["q_proj"])
  assert scales.shape == alphas.shape == (3, 1, 1)
  want_alpha = [np_hill(np_esd(m)) for m in stacked]
  np.testing.assert_allclose(alphas.ravel(), want_alpha, rtol=1e-4)
  lo, hi = min(want_alpha), max(want_alpha)
  np.testing.assert_allclose(scales.ravel(), [S_MIN + (S_MAX - S_MIN) * (a - lo) / (hi - lo)
                                              for a in want_alpha], atol=1e-4)
  np.testing.assert_allclose(np.asarray(updates["layers"]["q_proj"]),
                             np.broadcast_to(scales, (3, 16, 16)), rtol=1e-6)


def test_matrix_axes_option_flattens_multi_axis_kernels():
  # A MaxText-style [embed, heads, head_dim] kernel is one 16 x 16 matrix, not 16 stacked ones.
  rng = np.random.default_rng(4)
  w = (rng.standard_normal((16, 4, 4)) * 0.1).astype(np.float32)
  params = {"query": jnp.asarray(w), "key": jnp.asarray(w[:, ::-1] ** 3)}
  axes = llr_optax.MatrixAxes(reduction_axis=0, output_axis=(1, 2))
  tx = llr_optax.scale_by_alpha_hill(total_steps=None, matrix_axes=axes)
  state = tx.init(params)
  _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  alphas = llr_optax.last_alphas(state)
  assert alphas["query"].shape == (1, 1, 1)
  np.testing.assert_allclose(float(alphas["query"].squeeze()), np_hill(np_esd(w.reshape(16, 16))),
                             rtol=1e-4)


def test_small_matrices_are_excluded_by_min_eigenvalues():
  params = make_params(0)
  tx = llr_optax.scale_by_alpha_hill(total_steps=None, min_eigenvalues=17)  # only 16-wide here
  with pytest.warns(UserWarning, match=r"4 leaves .* take no part.*min_eigenvalues=17"):
    got, states = run(tx, [params])
  for k in MATRICES:
    assert float(got[0][k].squeeze()) == 1.0
    assert np.isnan(float(states[0].alphas.tree()[k].squeeze()))


def test_mapping_scope_label_maps_each_module_type_separately():
  params = make_params(1, heavy=("q_proj",))
  tx = llr_optax.scale_by_alpha_hill(total_steps=None, mapping_scope="label")
  got, _ = run(tx, [params])
  # Every label has one matrix here, so each is its own min and max: all at s_max.
  for k in MATRICES:
    assert float(got[0][k].squeeze()) == S_MAX


def test_recompute_lives_inside_one_cond():
  params = make_params(0)
  tx = llr_optax.scale_by_alpha_hill(total_steps=100)
  state = tx.init(params)
  jaxpr = jax.make_jaxpr(tx.update)(jax.tree.map(jnp.ones_like, params), state, params).jaxpr
  top = [e.primitive.name for e in jaxpr.eqns]
  assert top.count("cond") == 1
  solver = {"eigh", "tridiagonal", "svd", "while"}
  assert not solver & set(top), "no eigen-solver outside the cond"
  cond = next(e for e in jaxpr.eqns if e.primitive.name == "cond")
  inner = {e.primitive.name for br in cond.params["branches"] for e in br.jaxpr.eqns}
  assert "tridiagonal" in inner or "eigh" in inner


def test_update_without_params_is_a_clear_error():
  tx = llr_optax.scale_by_alpha_hill()
  params = make_params(0)
  with pytest.raises(ValueError, match="params"):
    tx.update(params, tx.init(params))


@pytest.mark.parametrize("kwargs,name", [
    (dict(s_min=0.0), "s_min"), (dict(s_min=-1.0), "s_min"), (dict(s_min=6.0), "s_min"),
    (dict(s_max=float("inf")), "s_max"), (dict(interval=0), "interval"),
    (dict(interval=2.5), "interval"), (dict(ramp_steps=-1), "ramp_steps"),
    (dict(total_steps=0), "total_steps"), (dict(active_fraction=0.0), "active_fraction"),
    (dict(active_fraction=1.5), "active_fraction"), (dict(min_eigenvalues=1), "min_eigenvalues"),
    (dict(mapping_scope="layer"), "mapping_scope"), (dict(estimator="qr"), "estimator"),
    (dict(fixed_scales={"embedding": 2.0}), "fixed_scales"),
    (dict(fixed_scales={"embed": -2.0}), "fixed_scales"),
])
def test_bad_hyperparameters_name_the_parameter(kwargs, name):
  with pytest.raises(ValueError, match=name):
    llr_optax.scale_by_alpha_hill(**kwargs)


def test_presets_build():
  for preset in (llr_optax.ALPHA_HILL_PAPER, llr_optax.ALPHA_HILL_RELEASED_130M):
    tx = llr_optax.scale_by_alpha_hill(total_steps=1000, **preset)
    assert isinstance(tx, optax.GradientTransformation)


def test_fixed_scales_group_name_pins_every_label_of_the_group():
  # "attn" covers q/k/v/o: the attention matrices here must be pinned and leave the alpha fit
  # (which then maps the others alone onto [s_min, s_max]).
  params = make_params(0)
  tx = llr_optax.scale_by_alpha_hill(interval=1, ramp_steps=0,
                                     fixed_scales={"attn": 2.0, "attn_q": 3.0, "embed": 4.0})
  _, state = tx.update(params, tx.init(params), params)
  scales = llr_optax.current_scales(state)
  assert np.asarray(scales["q_proj"]).item() == 3.0  # a single label wins over its group
  assert np.asarray(scales["k_proj"]).item() == 2.0
  assert np.asarray(scales["embed_tokens"]).item() == 4.0
  alphas = {k: np.asarray(v).item() for k, v in llr_optax.last_alphas(state).items()}
  assert np.isnan(alphas["k_proj"]) and np.isnan(alphas["q_proj"])
  # The head is no longer pinned (the default was replaced): it joins the fit.
  fitted = [np.asarray(scales[k]).item() for k in ("up_proj", "down_proj", "lm_head")]
  assert all(np.isfinite(alphas[k]) for k in ("up_proj", "down_proj", "lm_head"))
  assert min(fitted) == S_MIN and max(fitted) == S_MAX


# --- spread recompute: one slice of the matrices per step ---------------------------------------

def spread_params(same_gram_size):
  """Mixed Gram sizes (16, 24 and a stack), or every matrix with a 16 x 16 Gram matrix."""
  rng = np.random.default_rng(31)
  heavy = lambda *s: rng.standard_t(2.0, s) * 0.1
  gauss = lambda *s: rng.standard_normal(s) * 0.1
  p = {"embed_tokens": gauss(24, 16), "input_norm": np.ones(16),
       "layers": {"q_proj": np.concatenate([heavy(2, 16, 16), gauss(2, 16, 16)]),
                  "k_proj": gauss(16, 16)},
       "up_proj": heavy(16, 40)}
  p["down_proj"] = gauss(40, 16) if same_gram_size else heavy(40, 24)
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), p)


def expected_ramp_start(params, spread, first_step):
  """Per value: the step its slice is solved (`first_step + chunk index`); 0 for non-members."""
  plan = _recompute.make_plan(params, None, None, {"embed": S_MAX}, 8)
  out = np.zeros(plan.layout.size, np.int32)
  for k, chunk in enumerate(_recompute.chunks(params, plan, spread)):
    for leaf, lo, hi in chunk:
      out[plan.layout.offsets[leaf] + lo:plan.layout.offsets[leaf] + hi] = first_step + k
  return out, plan.members()


@pytest.mark.parametrize("same_gram_size", [False, True], ids=["mixed", "same_gram_size"])
def test_spread_recompute_equals_all_at_once_with_frozen_params(same_gram_size):
  params = spread_params(same_gram_size)
  interval, spread = 4, 3
  kw = dict(s_min=S_MIN, s_max=S_MAX, interval=interval, ramp_steps=2, total_steps=None,
            fixed_scales={"embed": S_MAX}, estimator="eigh")
  spread_tx = llr_optax.scale_by_alpha_hill(spread=spread, **kw)
  once_tx = llr_optax.scale_by_alpha_hill(**kw)
  grads = jax.tree.map(jnp.ones_like, params)

  @jax.jit
  def step(s_spread, s_once):
    return spread_tx.update(grads, s_spread, params)[1], once_tx.update(grads, s_once, params)[1]

  s_spread, s_once = spread_tx.init(params), once_tx.init(params)
  states = []
  for _ in range(interval + spread):   # two intervals' worth of slices: counts 0..6
    s_spread, s_once = step(s_spread, s_once)
    states.append((s_spread, s_once))
  for last in (spread - 1, interval + spread - 1):   # the last slice of each interval
    s_spread, s_once = states[last]
    # Frozen params: after the last slice every alpha and target is that of the all-at-once
    # recompute (the same solves, batched differently: <= 1e-6).
    np.testing.assert_allclose(np.asarray(s_spread.alphas.values), np.asarray(s_once.alphas.values),
                               rtol=1e-6, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(np.asarray(s_spread.targets), np.asarray(s_once.targets),
                               rtol=0, atol=1e-6)
    # ... and each slice's ramp started at the step its alpha was solved.
    want, members = expected_ramp_start(params, spread, last - (spread - 1))
    np.testing.assert_array_equal(np.asarray(s_spread.ramp_start)[members], want[members])
  # Before the last slice of the first interval some alphas are not computed yet.
  first_alphas = np.asarray(states[0][0].alphas.values)
  assert np.isnan(first_alphas[expected_ramp_start(params, spread, 0)[1]]).any()
  # The slices really are different steps, and the targets span [s_min, s_max].
  assert len(set(want[members].tolist())) == spread
  targets = np.asarray(states[-1][1].targets)[members]
  assert targets.min() == pytest.approx(S_MIN) and targets.max() == pytest.approx(S_MAX)
  # With frozen params the applied factors settle on the all-at-once ones.
  np.testing.assert_allclose(np.asarray(states[-1][0].scales.values),
                             np.asarray(states[-1][1].scales.values), rtol=0, atol=1e-6)


def test_spread_chunks_have_about_equal_cost():
  z = jnp.zeros
  params = {"layers": {"q_proj": z((6, 16, 16))}, "big_proj": z((32, 64)),
            "up_proj": z((16, 40)), "down_proj": z((40, 16)), "embed_tokens": z((24, 16))}
  plan = _recompute.make_plan(params, None, None, {"embed": 5.0}, 8)
  leaves = plan.layout.treedef.flatten_up_to(params)
  cost = lambda leaf: float(min(leaves[leaf].shape[-2:])) ** 3   # k^3 for a k x k Gram solve
  items = [(i, j) for i, a in enumerate(plan.axes) if a is not None
           for j in range(int(np.prod(leaves[i].shape[:-2])))]
  total = sum(cost(i) for i, _ in items)
  biggest = max(cost(i) for i, _ in items)
  for n in (2, 3, 4):
    parts = _recompute.chunks(params, plan, n)
    assert len(parts) == n
    covered = [(leaf, j) for chunk in parts for leaf, lo, hi in chunk for j in range(lo, hi)]
    assert covered == items   # every matrix once, in leaf order
    costs = [sum((hi - lo) * cost(leaf) for leaf, lo, hi in chunk) for chunk in parts]
    # Greedy contiguous split: each chunk within one matrix's cost of the even share.
    assert all(abs(c - total / n) <= biggest for c in costs), (n, costs, total / n)
  # Equal matrices split exactly evenly.
  same = {"layers": {"q_proj": z((8, 16, 16))}}
  plan = _recompute.make_plan(same, None, None, {}, 8)
  assert _recompute.chunks(same, plan, 4) == [[(0, 0, 2)], [(0, 2, 4)], [(0, 4, 6)], [(0, 6, 8)]]


@pytest.mark.parametrize("kwargs,match", [
    (dict(spread=5, interval=4), "spread must be <= interval"),
    (dict(spread=True), "spread"), (dict(spread=0), "spread"), (dict(spread=1.5), "spread"),
])
def test_bad_spread_raises(kwargs, match):
  with pytest.raises(ValueError, match=match):
    llr_optax.scale_by_alpha_hill(**kwargs)
