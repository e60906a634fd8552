"""The contract every llr_optax transformation keeps, checked on all three.

* chained after adamw / muon it equals per-leaf adamw / muon with LR `lr * s_l(t)` (PyTorch
  param-group semantics), using the factors `current_scales` reports;
* jit gives the same result as eager; state survives an orbax save/restore;
* update dtype is kept; nothing NaN.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import llr_optax

LR = 1e-2
STEPS = 8


def make_params():
  rng = np.random.default_rng(0)
  p = {"embed_tokens": rng.standard_normal((24, 16)) * 0.5,
       "q_proj": rng.standard_t(2.0, (16, 16)) * 0.1,
       "up_proj": rng.standard_normal((16, 40)) * 0.1,
       "down_proj": rng.standard_t(4.0, (40, 16)) * 0.1,
       "input_norm": np.ones(16),
       "lm_head": rng.standard_normal((16, 24)) * 0.1}
  return {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}


def grads_at(step, params):
  key = jax.random.fold_in(jax.random.key(7), step)
  keys = jax.random.split(key, len(params))
  return {k: jax.random.normal(kk, v.shape) + 0.1 * v for kk, (k, v) in zip(keys, params.items())}


def init_grad_tx():
  return llr_optax.scale_by_init_grad(
      {"embed_tokens": 2.0, "q_proj": 0.5, "up_proj": 1.5, "down_proj": 0.7, "input_norm": 3.0,
       "lm_head": 1.2})


METHODS = {
    "alpha_hill": lambda: llr_optax.scale_by_alpha_hill(interval=3, ramp_steps=2, total_steps=STEPS,
                                                        active_fraction=0.8),
    "relative": lambda: llr_optax.relative_schedule(llr_optax.DENSE_MULTIPLIERS, STEPS, 0.1, 2),
    "init_grad": init_grad_tx,
}

BASES = {
    "adamw": lambda lr: optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=0.1),
    "muon": lambda lr: optax.contrib.muon(lr, weight_decay=0.1, adam_weight_decay=0.1),
}


def run_chain(base, method):
  tx = optax.chain(base(LR), method())
  params = make_params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  updates_seq, scales_seq = [], []
  for t in range(STEPS):
    updates, state = update(grads_at(t, params), state, params)
    updates_seq.append(updates)
    scales_seq.append(llr_optax.current_scales(state))
    params = optax.apply_updates(params, updates)
  return updates_seq, scales_seq


def run_per_leaf_reference(base, scales_seq):
  """Each leaf its own base optimizer whose LR at step t is LR * (reported factor at t)."""
  table = {k: np.array([float(np.asarray(s[k]).reshape(())) for s in scales_seq])
           for k in scales_seq[0]}
  transforms = {k: base(lambda count, f=table[k]: LR * jnp.asarray(f)[count]) for k in table}
  tx = optax.partition(transforms, {k: k for k in table})
  params = make_params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for t in range(STEPS):
    updates, state = update(grads_at(t, params), state, params)
    out.append(updates)
    params = optax.apply_updates(params, updates)
  return out


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("method", list(METHODS))
def test_chain_equals_per_group_learning_rates(base, method):
  got, scales = run_chain(BASES[base], METHODS[method])
  want = run_per_leaf_reference(BASES[base], scales)
  varied = set()
  for t in range(STEPS):
    for k in got[t]:
      np.testing.assert_allclose(np.asarray(got[t][k]), np.asarray(want[t][k]), rtol=1e-5,
                                 atol=1e-6, err_msg=f"{base}/{method} step {t} leaf {k}")
      varied.add(round(float(np.asarray(scales[t][k]).reshape(())), 4))
  assert len(varied) > 2, "the factors must differ across leaves/steps for this test to bite"


def _flat(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("method", list(METHODS))
def test_jit_equals_eager_and_dtype_is_kept(method):
  tx = optax.chain(optax.adamw(LR), METHODS[method]())
  params = make_params()
  s_eager = s_jit = tx.init(params)
  for t in range(4):
    g = grads_at(t, params)
    u_eager, s_eager = tx.update(g, s_eager, params)
    u_jit, s_jit = jax.jit(tx.update)(g, s_jit, params)
    for a, b in zip(_flat(u_eager), _flat(u_jit)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  g16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), grads_at(0, params))
  u16, _ = METHODS[method]().update(g16, METHODS[method]().init(params), params)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u16))
  # (alphas are NaN by design for leaves that take no part; the factors never are)
  scales = llr_optax.current_scales(s_jit)
  assert all(np.all(np.isfinite(x)) for x in _flat(u_jit) + _flat(scales))


@pytest.mark.parametrize("method", list(METHODS))
def test_state_can_be_donated_and_init_twice(method):
  # A jitted step that donates the optimizer state (as every trainer does) must accept a fresh
  # init: no two state leaves may share a buffer, and no leaf may be the factory's own array
  # (donating it would delete it for the next init).
  tx = optax.chain(optax.adamw(LR), METHODS[method]())
  params = make_params()
  step = jax.jit(lambda g, s, p: tx.update(g, s, p), donate_argnums=(1,))
  for _ in range(2):
    state = tx.init(params)
    leaves = jax.tree.leaves(state)
    assert len({id(x) for x in leaves}) == len(leaves)
    for t in range(2):
      _, state = step(grads_at(t, params), state, params)
    assert not any(x.is_deleted() for x in jax.tree.leaves(state))


@pytest.mark.parametrize("method", list(METHODS))
def test_state_survives_orbax_round_trip(method, tmp_path):
  tx = optax.chain(optax.adamw(LR), METHODS[method]())
  params = make_params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(4):   # stop mid-ramp for alpha_hill (recompute at 3, ramp of 2)
    updates, state = update(grads_at(t, params), state, params)
    params = optax.apply_updates(params, updates)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "state", {"params": params, "opt_state": state})
  ckpt.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": state})
  restored = ckpt.restore(tmp_path / "state", abstract)
  p2, s2 = restored["params"], restored["opt_state"]
  assert type(s2) is type(state)
  for t in range(4, STEPS):
    u1, state = update(grads_at(t, params), state, params)
    u2, s2 = update(grads_at(t, p2), s2, p2)
    for a, b in zip(_flat(u1), _flat(u2)):
      np.testing.assert_array_equal(a, b)
    params, p2 = optax.apply_updates(params, u1), optax.apply_updates(p2, u2)


def test_current_scales_multiplies_several_methods_and_errors_without_any():
  params = make_params()
  tx = optax.chain(optax.sgd(1.0), init_grad_tx(),
                   llr_optax.relative_schedule({"embed": (3.0, 1.0)}, 10, 0.1))
  state = tx.init(params)
  updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  scales = llr_optax.current_scales(state)
  assert float(scales["embed_tokens"]) == pytest.approx(2.0 * 3.0)
  assert float(scales["q_proj"]) == pytest.approx(0.5)
  np.testing.assert_allclose(np.asarray(updates["embed_tokens"]), -6.0, rtol=1e-6)
  with pytest.raises(ValueError, match="no llr_optax"):
    llr_optax.current_scales(optax.adam(1.0).init(params))
  with pytest.raises(ValueError, match="alpha_hill"):
    llr_optax.last_alphas(state)


def test_works_inside_nnx_optimizer():
  from flax import nnx
  from models import LLaMa, llama_config
  model = LLaMa(llama_config("tiny", vocab_size=32, max_seq_len=8, num_layers=1, hidden=32,
                             intermediate=64, num_heads=2), rngs=nnx.Rngs(0))
  tx = optax.chain(optax.adamw(1e-3), llr_optax.scale_by_alpha_hill(total_steps=None))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 32

  @nnx.jit
  def step(model, opt):
    loss = lambda m: jnp.mean(m(tokens) ** 2)
    grads = nnx.grad(loss)(model)
    opt.update(model, grads)

  step(model, opt)
  scales = llr_optax.current_scales(opt.opt_state)
  alphas = llr_optax.last_alphas(opt.opt_state)
  q = scales["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"]
  assert np.asarray(q).shape == (1, 1) and 1.0 <= float(np.asarray(q).squeeze()) <= 5.0
  assert np.isfinite(float(np.asarray(alphas["model"]["layers"][0]["mlp"]["up_proj"]["kernel"]).squeeze()))
  assert float(np.asarray(scales["lm_head"]["kernel"]).squeeze()) == 5.0
