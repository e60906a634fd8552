"""relative_schedule: effective per-module LR equals the RLRS formula eta_m(t) (SPEC.md section 2)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import llr_optax

PEAK = 3e-3
TOTAL, WARMUP, F = 200, 10, 0.06


def np_eta_m(t, a, b, peak=PEAK, total=TOTAL, warmup=WARMUP, f=F):
  """RLRS per-module LR, written from the paper's formula: warmup linear to a*peak, then cosine."""
  if t < warmup:
    return peak * t / warmup * a
  p = min((t - warmup) / (total - warmup), 1.0)
  c = 0.5 * (1 + math.cos(math.pi * p))
  return peak * (a * c + f * b * (1 - c))


PARAMS = {
    "model": {"embed_tokens": {"embedding": jnp.zeros((8, 4))},
              "layers": [{"self_attn": {"q_proj": {"kernel": jnp.zeros((4, 4))},
                                        "o_proj": {"kernel": jnp.zeros((4, 4))}},
                          "mlp": {"up_proj": {"kernel": jnp.zeros((4, 8))}},
                          "input_layernorm": {"scale": jnp.zeros(4)}}]},
    "lm_head": {"kernel": jnp.zeros((4, 8))}}


def effective_lrs(multipliers, steps):
  """With SGD on the matching base schedule and unit gradients, -update is the effective LR."""
  base = llr_optax.relative_base_schedule(PEAK, TOTAL, F, WARMUP)
  tx = optax.chain(optax.sgd(base),
                   llr_optax.relative_schedule(multipliers, TOTAL, F, WARMUP))
  state = tx.init(PARAMS)
  update = jax.jit(tx.update)
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  out = []
  for _ in range(steps):
    updates, state = update(grads, state, PARAMS)
    out.append(jax.tree.map(lambda u: -float(u.reshape(-1)[0]), updates))
  return out


def test_effective_lr_matches_rlrs_formula_at_every_step():
  lrs = effective_lrs(llr_optax.DENSE_MULTIPLIERS, TOTAL + 5)
  table = {"embed": (5.0, 0.6), "head": (1.0, 0.4), "mlp": (1.0, 0.6), "attn": (1.0, 0.2)}
  for t, lr in enumerate(lrs):
    layer = lr["model"]["layers"][0]
    checks = [(lr["model"]["embed_tokens"]["embedding"], table["embed"]),
              (lr["lm_head"]["kernel"], table["head"]),
              (layer["mlp"]["up_proj"]["kernel"], table["mlp"]),
              (layer["self_attn"]["q_proj"]["kernel"], table["attn"]),
              (layer["self_attn"]["o_proj"]["kernel"], table["attn"])]
    for got, (a, b) in checks:
      np.testing.assert_allclose(got, np_eta_m(t, a, b), rtol=2e-5, atol=1e-10, err_msg=f"t={t}")
    # A leaf without a multiplier (the norm) follows the base schedule: factor 1.
    np.testing.assert_allclose(layer["input_layernorm"]["scale"], np_eta_m(t, 1.0, 1.0),
                               rtol=2e-5, atol=1e-10)
  # End of the run: embedding at f * 0.6 * peak.
  np.testing.assert_allclose(lrs[TOTAL]["model"]["embed_tokens"]["embedding"], PEAK * F * 0.6,
                             rtol=1e-5)


def test_single_label_overrides_its_group():
  lrs = effective_lrs({"attn": (1.0, 0.2), "attn_q": (2.0, 1.0)}, 30)
  for t in (0, 5, 20, 29):
    layer = lrs[t]["model"]["layers"][0]["self_attn"]
    np.testing.assert_allclose(layer["q_proj"]["kernel"], np_eta_m(t, 2.0, 1.0), rtol=2e-5,
                               atol=1e-10)
    np.testing.assert_allclose(layer["o_proj"]["kernel"], np_eta_m(t, 1.0, 0.2), rtol=2e-5,
                               atol=1e-10)


def test_moe_table_and_warmup_helper():
  assert llr_optax.MOE_MULTIPLIERS["expert"] == (0.3, 1.125)
  assert llr_optax.MOE_FINAL_FRACTION == 0.04
  assert llr_optax.warmup_steps_for(1000) == 10
  tx = llr_optax.relative_schedule(llr_optax.MOE_MULTIPLIERS, 100, llr_optax.MOE_FINAL_FRACTION)
  params = {"moe": {"router": {"kernel": jnp.zeros((4, 2))},
                    "experts": {"wi_0": jnp.zeros((2, 4, 8))}}}
  state = tx.init(params)
  _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  scales = llr_optax.current_scales(state)
  assert float(scales["moe"]["router"]["kernel"]) == pytest.approx(0.6)
  assert float(scales["moe"]["experts"]["wi_0"]) == pytest.approx(0.3)


@pytest.mark.parametrize("kwargs,name", [
    (dict(multipliers={"embedding": (1.0, 1.0)}), "multipliers"),
    (dict(multipliers={"embed": (1.0,)}), "multipliers"),
    (dict(multipliers={"embed": (0.0, 1.0)}), "multipliers"),
    (dict(multipliers={}), "multipliers"),
    (dict(final_fraction=0.0), "final_fraction"),
    (dict(final_fraction=-0.1), "final_fraction"),
    (dict(total_steps=0), "total_steps"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(warmup_steps=100), "warmup_steps"),
])
def test_bad_hyperparameters_name_the_parameter(kwargs, name):
  args = dict(multipliers=llr_optax.DENSE_MULTIPLIERS, total_steps=100, final_fraction=0.06)
  args.update(kwargs)
  with pytest.raises(ValueError, match=name):
    llr_optax.relative_schedule(**args)


def test_custom_label_tree_allows_custom_labels():
  params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
  tx = llr_optax.relative_schedule({"mine": (2.0, 2.0)}, 10, 0.5,
                                   labels={"a": "mine", "b": "other"})
  state = tx.init(params)
  updates, _ = tx.update({"a": jnp.ones(2), "b": jnp.ones(2)}, state)
  np.testing.assert_allclose(np.asarray(updates["a"]), 2.0)
  np.testing.assert_allclose(np.asarray(updates["b"]), 1.0)


# --- Blockwise LR (Wang et al. 2025, "The Sharpness Disparity Principle") ------------------------

BLOCK_PARAMS = {
    "embed_tokens": jnp.zeros((8, 4)),
    "layers": {"q_proj": jnp.zeros((4, 4)), "k_proj": jnp.zeros((4, 4)),
               "v_proj": jnp.zeros((4, 4)),
               "o_proj": {"kernel": jnp.zeros((4, 4)), "bias": jnp.zeros(4)},
               "gate_proj": jnp.zeros((4, 8)), "up_proj": jnp.zeros((4, 8)),
               "down_proj": jnp.zeros((8, 4)), "input_layernorm": jnp.zeros(4)},
    "lm_head": jnp.zeros((4, 8))}
# Their tuned peak ratios, written out here (not read from the library): norm 1, value/output 4,
# FFN 6, query/key 8, embedding 10; an untied head and biases are not in their table (ratio 1).
BLOCK_RATIOS = {"embed_tokens": 10.0, "q_proj": 8.0, "k_proj": 8.0, "v_proj": 4.0,
                "o_proj/kernel": 4.0, "gate_proj": 6.0, "up_proj": 6.0, "down_proj": 6.0,
                "input_layernorm": 1.0, "o_proj/bias": 1.0, "lm_head": 1.0}


def np_blockwise_lr(t, ratio, base, total, warmup, final_fraction):
  """A port of the Blockwise authors' `get_lr` for one block (nanoGPT-style): linear warmup to
  `ratio * base`, then cosine down to the floor `min_lr = base * final_fraction`, shared by all
  blocks; `min_lr` after `total`."""
  min_lr = base * final_fraction
  peak = ratio * base
  if t < warmup:
    return peak * t / warmup
  if t > total:
    return min_lr
  decay_ratio = (t - warmup) / (total - warmup)
  return min_lr + 0.5 * (1.0 + math.cos(math.pi * decay_ratio)) * (peak - min_lr)


def test_blockwise_effective_lr_matches_the_authors_schedule():
  base_lr, total, warmup = 6e-4, 120, 12
  frac = llr_optax.BLOCKWISE_FINAL_FRACTION
  base = llr_optax.relative_base_schedule(base_lr, total, frac, warmup)
  relative = llr_optax.relative_schedule(llr_optax.BLOCKWISE_MULTIPLIERS, total, frac, warmup)
  tx = optax.chain(optax.sgd(base), relative)
  state = tx.init(BLOCK_PARAMS)
  update = jax.jit(tx.update)
  grads = jax.tree.map(jnp.ones_like, BLOCK_PARAMS)
  checked = (0, 1, 6, 11, 12, 13, 40, 66, 100, 119, 120, 123)
  lrs = {}
  for t in range(max(checked) + 1):
    updates, state = update(grads, state, BLOCK_PARAMS)
    if t in checked:   # -update is the effective LR (SGD, unit gradients)
      flat = jax.tree_util.tree_flatten_with_path(updates)[0]
      lrs[t] = {llr_optax._labels.path_to_str(path).removeprefix("layers/"): -float(u.ravel()[0])
                for path, u in flat}
  for t in checked:
    for name, ratio in BLOCK_RATIOS.items():
      want = np_blockwise_lr(t, ratio, base_lr, total, warmup, frac)
      # float32 schedule arithmetic: ~1e-6 relative (atol covers the 0 at t = 0).
      np.testing.assert_allclose(lrs[t][name], want, rtol=1e-5, atol=1e-12,
                                 err_msg=f"t={t} {name}")
  # The schedule is not trivial: at the peak the embedding runs 10x the norm, at the end every
  # block sits on the same floor.
  assert lrs[12]["embed_tokens"] == pytest.approx(10 * lrs[12]["input_layernorm"], rel=1e-5)
  assert lrs[120]["embed_tokens"] == pytest.approx(base_lr * frac, rel=1e-5)
  assert lrs[120]["q_proj"] == pytest.approx(base_lr * frac, rel=1e-5)


# --- Other base schedules: relative_schedule(progress=...), e.g. warmup-stable-decay ------------


def np_wsd_lr(t, peak, total, warmup, decay, f, a=1.0, b=1.0):
  """A module's LR on warmup-stable-decay, written out: linear warmup to a*peak, a*peak until the
  decay starts, then linear from a*peak to f*b*peak over the last `decay` steps."""
  if t < warmup:
    return a * peak * t / warmup
  start = total - decay
  p = min(max((t - start) / decay, 0.0), 1.0)
  return peak * (a * (1 - p) + f * b * p)


def test_wsd_progress_moves_every_module_during_the_decay_only():
  total, warmup, decay, f = 100, 5, 20, 0.1
  progress = lambda t: llr_optax.wsd_progress(t, total, decay)
  base = llr_optax.relative_base_schedule(PEAK, total, f, warmup, progress=progress)
  relative = llr_optax.relative_schedule({"embed": (5.0, 0.6), "attn": (2.0, 0.2)}, total, f,
                                         warmup, progress=progress)
  tx = optax.chain(optax.sgd(base), relative)
  state = tx.init(PARAMS)
  update = jax.jit(tx.update)
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  for t in range(total + 3):
    updates, state = update(grads, state, PARAMS)
    lr = jax.tree.map(lambda u: -float(u.reshape(-1)[0]), updates)
    layer = lr["model"]["layers"][0]
    for got, a, b in ((lr["model"]["embed_tokens"]["embedding"], 5.0, 0.6),
                      (layer["self_attn"]["q_proj"]["kernel"], 2.0, 0.2),
                      (layer["mlp"]["up_proj"]["kernel"], 1.0, 1.0)):
      np.testing.assert_allclose(got, np_wsd_lr(t, PEAK, total, warmup, decay, f, a, b),
                                 rtol=2e-5, atol=1e-10, err_msg=f"t={t}")
  # The base schedule alone: the stable phase is flat, the end is f * peak.
  assert float(base(50)) == pytest.approx(PEAK) and float(base(80)) == pytest.approx(PEAK)
  assert float(base(total)) == pytest.approx(f * PEAK, rel=1e-6)
  with pytest.raises(ValueError, match="progress"):
    llr_optax.relative_schedule(llr_optax.DENSE_MULTIPLIERS, 10, 0.1, progress=0.5)


def test_default_progress_is_the_cosine():
  """progress=cosine_progress written out gives the same factors as the default."""
  total, warmup = 60, 6
  explicit = lambda t: llr_optax.cosine_progress(t, total, warmup)
  for progress in (None, explicit):
    base = llr_optax.relative_base_schedule(PEAK, total, F, warmup, progress=progress)
    for t in (0, 3, 6, 30, 59, 60):
      assert float(base(t)) == pytest.approx(np_eta_m(t, 1.0, 1.0, total=total, warmup=warmup),
                                             rel=1e-5, abs=1e-12)
