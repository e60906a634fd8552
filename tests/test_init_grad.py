"""init_grad_scales / fan_in_init / scale_by_init_grad against NumPy (SPEC.md section 3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llr_optax


def np_init_grad_scales(grads):
  """Reference: G_l = sum_t mean|g|, u = 1/sqrt(G), normalised by the count-weighted mean."""
  names = list(grads[0])
  g = {k: sum(np.mean(np.abs(np.asarray(gr[k], np.float64))) for gr in grads) for k in names}
  n = {k: np.asarray(grads[0][k]).size for k in names}
  u = {k: 1.0 / np.sqrt(g[k]) for k in names}
  mean = sum(n[k] * u[k] for k in names) / sum(n.values())
  return {k: u[k] / mean for k in names}


def random_grads(seed, t):
  rng = np.random.default_rng(seed)
  scales = {"embed": 0.01, "q_proj": 1e-4, "up_proj": 0.05, "norm": 0.3, "bias": 2.0}
  shapes = {"embed": (50, 8), "q_proj": (8, 8), "up_proj": (8, 32), "norm": (8,), "bias": (32,)}
  return [{k: jnp.asarray(rng.standard_normal(shapes[k]) * scales[k], jnp.float32)
           for k in shapes} for _ in range(t)]


@pytest.mark.parametrize("t", [1, 5])
def test_scales_match_numpy_and_weighted_mean_is_one(t):
  grads = random_grads(t, t)
  got = llr_optax.init_grad_scales(grads)
  want = np_init_grad_scales(grads)
  for k in want:
    np.testing.assert_allclose(float(got[k]), want[k], rtol=1e-6)
  sizes = {k: grads[0][k].size for k in want}
  mean = sum(sizes[k] * float(got[k]) for k in want) / sum(sizes.values())
  assert mean == pytest.approx(1.0, abs=1e-6)
  # Small gradients at init (q_proj) -> the largest LR.
  assert max(want, key=want.get) == "q_proj"


def test_fan_in_init():
  params = {"model": {"embed_tokens": {"embedding": jnp.full((100, 64), 0.3)},
                      "q_proj": {"kernel": jnp.zeros((512, 256))},
                      "stacked": {"up_proj": jnp.zeros((3, 128, 512))},
                      "input_norm": {"scale": jnp.full((64,), 7.0)},
                      "o_proj": {"bias": jnp.ones((64,))}},
            "lm_head": {"kernel": jnp.zeros((64, 100))}}
  out = llr_optax.fan_in_init(params, jax.random.key(0), rule="kernels")
  m = out["model"]
  # Sample std of 131k N(0, 1/fan_in) draws is within 1% of 1/sqrt(fan_in) (6 sigma ~ 1.2%).
  np.testing.assert_allclose(float(jnp.std(m["q_proj"]["kernel"])), 1 / np.sqrt(512), rtol=0.015)
  np.testing.assert_allclose(float(jnp.std(m["stacked"]["up_proj"])), 1 / np.sqrt(128), rtol=0.015)
  np.testing.assert_allclose(float(jnp.std(out["lm_head"]["kernel"])), 1 / np.sqrt(64), rtol=0.05)
  assert abs(float(jnp.mean(m["q_proj"]["kernel"]))) < 5e-4
  np.testing.assert_array_equal(np.asarray(m["input_norm"]["scale"]), 1.0)
  np.testing.assert_array_equal(np.asarray(m["o_proj"]["bias"]), 0.0)
  np.testing.assert_array_equal(np.asarray(m["embed_tokens"]["embedding"]), np.float32(0.3))


def test_scale_by_init_grad_applies_static_scales():
  grads = random_grads(0, 2)
  scales = llr_optax.init_grad_scales(grads)
  tx = llr_optax.scale_by_init_grad(scales)
  state = tx.init(grads[0])
  for t in range(3):
    updates, state = jax.jit(tx.update)(grads[0], state)
    for k in grads[0]:
      np.testing.assert_allclose(np.asarray(updates[k]),
                                 np.asarray(grads[0][k]) * float(scales[k]), rtol=1e-6)
  reported = llr_optax.current_scales(state)
  assert all(float(reported[k]) == float(scales[k]) for k in scales)


def test_errors():
  with pytest.raises(ValueError, match="grads"):
    llr_optax.init_grad_scales([])
  with pytest.raises(ValueError, match="structure"):
    llr_optax.init_grad_scales([{"a": jnp.ones(2)}, {"b": jnp.ones(2)}])
  with pytest.raises(ValueError, match="'dead'"):
    llr_optax.init_grad_scales([{"a": jnp.ones(2), "dead": jnp.zeros(3)}])
  for bad in (-1.0, 0.0, float("nan"), float("inf")):
    with pytest.raises(ValueError, match="scales\\['w'\\]"):
      llr_optax.scale_by_init_grad({"w": bad, "v": 1.0})
  tx = llr_optax.scale_by_init_grad({"w": 1.0})
  with pytest.raises(ValueError, match="2 leaves but the factors were made for 1"):
    tx.update({"w": jnp.ones(2), "v": jnp.ones(2)}, tx.init(None))
  with pytest.raises(ValueError, match="scales must have the params. tree structure.*'v'"):
    tx.init({"w": jnp.ones(2), "v": jnp.ones(2)})
  with pytest.raises(ValueError, match="list of gradient pytrees.*dict"):
    llr_optax.init_grad_scales({"q_proj": jnp.ones(2)})
  with pytest.raises(ValueError, match="no leaves"):
    llr_optax.init_grad_scales([{}])


def gpt2_like_params(d=256, vocab=512, ctx=128, stack_experts=False):
  """GPT-2 key paths (tied: no head), with non-trivial values everywhere."""
  fill = lambda shape, v: jnp.full(shape, v, jnp.float32)
  p = {"wte": {"embedding": fill((vocab, d), 0.02)},
       "wpe": {"embedding": fill((ctx, d), 0.02)},
       "h": {"0": {"ln_1": {"scale": fill((d,), 3.0), "bias": fill((d,), 0.5)},
                   "attn": {"c_attn": {"kernel": fill((d, 3 * d), 0.1),
                                       "bias": fill((3 * d,), 0.5)},
                            "c_proj": {"kernel": fill((d, d), 0.1), "bias": fill((d,), 0.5)}},
                   "mlp": {"c_fc": {"kernel": fill((d, 4 * d), 0.1), "bias": fill((4 * d,), 0.5)},
                           "c_proj": {"kernel": fill((4 * d, d), 0.1),
                                      "bias": fill((d,), 0.5)}}}},
       "ln_f": {"scale": fill((d,), 3.0), "bias": fill((d,), 0.5)}}
  if stack_experts:
    p["moe"] = {"experts": {"gate_proj": fill((4, d, 64), 0.1), "down_proj": fill((4, 64, d), 0.1)},
                "router": {"kernel": fill((d, 4), 0.1)}}
  return p


def test_fan_in_init_paper_rule():
  d = 256
  params = gpt2_like_params(d, stack_experts=True)
  out = llr_optax.fan_in_init(params, jax.random.key(0), rule="paper")
  std = lambda x: float(jnp.std(x))
  # Tied embedding/head: std (1 + sqrt(1/f_in)) / 2 with f_in = d = 256 -> 0.53125.
  # 131k draws: the sample std is within 0.4% (1 sigma ~ 0.2%); we allow 1.5%.
  np.testing.assert_allclose(std(out["wte"]["embedding"]), (1 + np.sqrt(1 / d)) / 2, rtol=0.015)
  assert abs(float(jnp.mean(out["wte"]["embedding"]))) < 0.01
  np.testing.assert_array_equal(np.asarray(out["wpe"]["embedding"]), 0.0)  # like a bias
  block = out["h"]["0"]
  np.testing.assert_allclose(std(block["attn"]["c_attn"]["kernel"]), 1 / np.sqrt(d), rtol=0.015)
  np.testing.assert_allclose(std(block["attn"]["c_proj"]["kernel"]), 1 / np.sqrt(d), rtol=0.015)
  np.testing.assert_allclose(std(block["mlp"]["c_fc"]["kernel"]), 1 / np.sqrt(d), rtol=0.015)
  np.testing.assert_allclose(std(block["mlp"]["c_proj"]["kernel"]), 1 / np.sqrt(4 * d), rtol=0.015)
  # Stacked experts: the fan-in of each expert matrix (its rows), not of the stack.
  experts = out["moe"]["experts"]
  np.testing.assert_allclose(std(experts["gate_proj"]), 1 / np.sqrt(d), rtol=0.015)
  np.testing.assert_allclose(std(experts["down_proj"]), 1 / np.sqrt(64), rtol=0.015)
  np.testing.assert_allclose(std(out["moe"]["router"]["kernel"]), 1 / np.sqrt(d), rtol=0.05)
  for norm in (block["ln_1"], out["ln_f"]):
    np.testing.assert_array_equal(np.asarray(norm["scale"]), 1.0)
    np.testing.assert_array_equal(np.asarray(norm["bias"]), 0.0)
  for layer in (block["attn"]["c_attn"], block["mlp"]["c_proj"]):
    np.testing.assert_array_equal(np.asarray(layer["bias"]), 0.0)


def test_fan_in_init_paper_rule_untied_and_explicit():
  d = 256
  params = gpt2_like_params(d)
  params["lm_head"] = {"kernel": jnp.zeros((d, 512))}
  out = llr_optax.fan_in_init(params, jax.random.key(1), rule="paper")
  # Untied: the embedding gets unit variance, the head the fan-in init like any matrix.
  np.testing.assert_allclose(float(jnp.std(out["wte"]["embedding"])), 1.0, rtol=0.015)
  np.testing.assert_allclose(float(jnp.std(out["lm_head"]["kernel"])), 1 / np.sqrt(d), rtol=0.015)
  # An explicit tied_embedding wins over the inference.
  forced = llr_optax.fan_in_init(params, jax.random.key(1), rule="paper", tied_embedding=True)
  np.testing.assert_allclose(float(jnp.std(forced["wte"]["embedding"])), (1 + 1 / 16) / 2,
                             rtol=0.015)


def test_fan_in_init_kernels_rule_keeps_embeddings_and_paper_is_the_default():
  params = gpt2_like_params(64, vocab=100, ctx=32)
  default = llr_optax.fan_in_init(params, jax.random.key(2))
  paper = llr_optax.fan_in_init(params, jax.random.key(2), rule="paper")
  kernels = llr_optax.fan_in_init(params, jax.random.key(2), rule="kernels")
  for a, b in zip(jax.tree.leaves(default), jax.tree.leaves(paper)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(kernels["wte"]["embedding"]), np.float32(0.02))
  np.testing.assert_array_equal(np.asarray(kernels["wpe"]["embedding"]), np.float32(0.02))
  np.testing.assert_array_equal(np.asarray(kernels["h"]["0"]["ln_1"]["bias"]), 0.0)
  with pytest.raises(ValueError, match="rule"):
    llr_optax.fan_in_init(params, jax.random.key(2), rule="fan_out")


def test_fan_in_init_paper_rule_on_the_gpt2_model():
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from models import GPT2, GPT2Config  # pylint: disable=import-outside-toplevel
  cfg = GPT2Config(vocab_size=300, hidden=128, num_heads=4, num_layers=1, max_seq_len=64)
  params = nnx.to_pure_dict(nnx.state(GPT2(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  out = llr_optax.fan_in_init(params, jax.random.key(0), rule="paper")
  np.testing.assert_allclose(float(jnp.std(out["wte"]["embedding"])),
                             (1 + np.sqrt(1 / 128)) / 2, rtol=0.02)  # 38k draws
  np.testing.assert_array_equal(np.asarray(out["wpe"]["embedding"]), 0.0)
  np.testing.assert_allclose(float(jnp.std(out["h"][0]["mlp"]["c_proj"]["kernel"])),
                             1 / np.sqrt(512), rtol=0.02)
