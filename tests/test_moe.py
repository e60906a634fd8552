"""MoE LLaMa (models/moe.py): routing and router losses against NumPy, dense dispatch against
per-token sparse dispatch, gradients, labels, per-expert alpha_hill and Muon, presets."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import llr_optax
from models import (LOGICAL_AXIS_RULES, MOE_PRESETS, MoeConfig, MoeLLaMa, active_param_count,
                    create_model, llama_config, model_config, param_count)
from models.moe import MoeBlock, Router, load_balance_loss, route, router_z_loss


def small_config(**overrides) -> MoeConfig:
    kwargs = dict(vocab_size=37, hidden=16, intermediate=24, num_heads=2, num_layers=2,
                  max_seq_len=8, num_experts=4, top_k=1)
    return MoeConfig(**{**kwargs, **overrides})


@nnx.jit
def forward(model, tokens):
    """``model(tokens, return_aux=True)``, compiled (eager NNX runs op by op: slow)."""
    return model(tokens, return_aux=True)


def flat(tree):
    return {llr_optax._labels.path_to_str(p): x
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ----------------------------------------------------------- NumPy reference of the router

def np_route(logits, top_k, normalize=False):
    """Softmax, top-k by sorting, weights = chosen probabilities; z and balance losses."""
    logits = np.asarray(logits, np.float64)
    n, e = logits.shape
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    combine = np.zeros((n, e))
    dispatch = np.zeros((n, e))
    for i in range(n):
        chosen = np.argsort(-probs[i], kind="stable")[:top_k]
        weights = probs[i, chosen] / (probs[i, chosen].sum() if normalize else 1.0)
        combine[i, chosen] = weights
        dispatch[i, chosen] = 1.0
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    z_loss = np.mean(lse ** 2)
    f = dispatch.sum(0) / (n * top_k)       # fraction of assignments per expert
    p_mean = probs.mean(0)                  # mean router probability per expert
    balance = e * np.sum(f * p_mean)
    return combine, probs, dispatch, z_loss, balance


# Fixed logits: 6 tokens, 4 experts, no ties within a row.
LOGITS = np.array([[2.0, -1.0, 0.5, 0.1],
                   [0.3, 1.7, -0.2, 0.0],
                   [-0.5, 0.2, 0.9, 3.1],
                   [1.1, 1.0, -2.0, 0.4],
                   [0.0, -0.3, 2.2, 1.9],
                   [4.0, 0.1, 0.2, -1.0]], np.float32)


@pytest.mark.parametrize("top_k,normalize", [(1, False), (2, False), (2, True)])
def test_routing_and_router_losses_match_numpy(top_k, normalize):
    combine, probs, dispatch = route(jnp.asarray(LOGITS), top_k, normalize)
    want = np_route(LOGITS, top_k, normalize)
    # float32 softmax/logsumexp against float64 NumPy: 1e-6 relative is ample.
    np.testing.assert_allclose(np.asarray(combine), want[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(probs), want[1], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(dispatch), want[2])
    np.testing.assert_allclose(float(router_z_loss(jnp.asarray(LOGITS))), want[3], rtol=1e-6)
    np.testing.assert_allclose(float(load_balance_loss(probs, dispatch)), want[4], rtol=1e-6)


def test_top1_choices_by_hand():
    # Row maxima of LOGITS: experts 0, 1, 3, 0, 2, 0 -> loads 3/6, 1/6, 1/6, 1/6.
    _, _, dispatch = route(jnp.asarray(LOGITS), 1)
    assert np.argmax(np.asarray(dispatch), axis=1).tolist() == [0, 1, 3, 0, 2, 0]


def test_balance_loss_extremes():
    # Uniform router and uniform assignments: 1. All tokens to expert 0 with p -> 1: E.
    e, n = 4, 8
    uniform = load_balance_loss(jnp.full((n, e), 1 / e), jnp.tile(jnp.eye(e), (2, 1)))
    one_hot = jnp.eye(e)[jnp.zeros(n, jnp.int32)]
    collapsed = load_balance_loss(one_hot, one_hot)
    assert float(uniform) == pytest.approx(1.0, rel=1e-6)
    assert float(collapsed) == pytest.approx(e, rel=1e-6)


# ------------------------------------------------ dense dispatch == per-token sparse dispatch

def np_moe_block(x, router, gate, up, down, top_k):
    """Per token: route, then run only the chosen experts (sparse dispatch), in float64."""
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    combine, *_ = np_route(x @ np.asarray(router, np.float64), top_k)
    silu = lambda v: v / (1 + np.exp(-v))
    out = np.zeros_like(x)
    for i in range(x.shape[0]):
        for e in np.nonzero(combine[i])[0]:
            h = silu(x[i] @ gate[e]) * (x[i] @ up[e])
            out[i] += combine[i, e] * (h @ down[e])
    return out


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_block_matches_sparse_numpy(top_k):
    cfg = small_config(top_k=top_k)
    block = MoeBlock(cfg, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(0)
    # O(1) router weights so the routing is decisive and varied across tokens.
    block.router.kernel[...] = jnp.asarray(rng.standard_normal((16, 4)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32)
    out, stats = block(x)
    e = block.experts
    want = np_moe_block(np.asarray(x), np.asarray(block.router.kernel[...]),
                        np.asarray(e.gate_proj[...]), np.asarray(e.up_proj[...]),
                        np.asarray(e.down_proj[...]), top_k)
    assert out.shape == x.shape
    np.testing.assert_allclose(np.asarray(out).reshape(-1, 16), want, rtol=1e-4, atol=1e-6)
    logits = np.asarray(x).reshape(-1, 16) @ np.asarray(block.router.kernel[...])
    _, _, dispatch, z_loss, balance = np_route(logits, top_k)
    np.testing.assert_allclose(float(stats["router_z_loss"]), z_loss, rtol=1e-5)
    np.testing.assert_allclose(float(stats["load_balance_loss"]), balance, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(stats["expert_load"]),
                               dispatch.sum(0) / dispatch.sum(), rtol=1e-6)


def test_router_runs_in_float32_under_bfloat16():
    cfg = small_config(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    router = Router(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (3, 16), jnp.bfloat16)
    logits = router(x)
    assert logits.dtype == jnp.float32
    # The product is formed from the bf16 values upcast to float32, not rounded to bf16.
    want = np.asarray(x, np.float64) @ np.asarray(router.kernel[...], np.float64)
    np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ the whole model

def test_forward_shapes_and_aux_dict():
    cfg = small_config()
    model = MoeLLaMa(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)
    logits, aux = forward(model, tokens)
    assert logits.shape == (2, 8, cfg.vocab_size) and logits.dtype == jnp.float32
    assert set(aux) == {"router_z_loss", "load_balance_loss", "aux_loss", "expert_load"}
    assert aux["expert_load"].shape == (2, 4)
    np.testing.assert_allclose(np.asarray(aux["expert_load"]).sum(1), 1.0, rtol=1e-6)
    want = 1e-3 * float(aux["router_z_loss"]) + 1e-2 * float(aux["load_balance_loss"])
    assert float(aux["aux_loss"]) == pytest.approx(want, rel=1e-6)
    # Balance loss lies in [1/E-ish, E]; at a 0.02 init the router is near-uniform.
    assert 0.25 <= float(aux["load_balance_loss"]) <= 4.0
    with pytest.raises(ValueError, match="max_seq_len"):
        model(jnp.zeros((1, 9), jnp.int32))


def test_gradients_reach_exactly_the_experts_that_get_tokens():
    cfg = small_config()
    model = MoeLLaMa(cfg, rngs=nnx.Rngs(0))
    # 3 tokens, 4 experts, top-1: at least one expert per layer gets no token.
    tokens = jnp.array([[3, 17, 5]], jnp.int32)
    targets = jnp.array([[17, 5, 30]], jnp.int32)

    def loss_fn(m):
        logits, aux = m(tokens, return_aux=True)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        return ce + aux["aux_loss"], aux

    (loss, aux), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model)
    assert np.isfinite(float(loss))
    g = flat(nnx.to_pure_dict(grads))
    assert all(np.all(np.isfinite(np.asarray(v))) for v in g.values())
    load = np.asarray(aux["expert_load"])
    for layer in range(cfg.num_layers):
        used = load[layer] > 0
        assert 1 <= used.sum() <= 3
        for name in ("gate_proj", "up_proj", "down_proj"):
            per_expert = np.abs(np.asarray(g[f"model/layers/{layer}/moe/experts/{name}"]))
            per_expert = per_expert.reshape(4, -1).max(1)
            assert np.all(per_expert[used] > 0), (layer, name, per_expert)
            assert np.all(per_expert[~used] == 0), (layer, name, per_expert)
        assert np.abs(np.asarray(g[f"model/layers/{layer}/moe/router/kernel"])).max() > 0


def test_labels_of_moe_params():
    cfg = small_config()
    params = nnx.state(MoeLLaMa(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    labels = flat(llr_optax.label_params(params))
    shapes = {k: v.shape for k, v in flat(params).items()}
    want_by_suffix = {
        "moe/router/kernel": "router", "moe/experts/gate_proj": "expert",
        "moe/experts/up_proj": "expert", "moe/experts/down_proj": "expert",
        "self_attn/q_proj/kernel": "attn_q", "self_attn/k_proj/kernel": "attn_k",
        "self_attn/v_proj/kernel": "attn_v", "self_attn/o_proj/kernel": "attn_o",
        "input_layernorm/scale": "norm", "post_attention_layernorm/scale": "norm",
        "model/norm/scale": "norm", "model/embed_tokens/embedding": "embed",
        "lm_head/kernel": "head"}
    for path, label in labels.items():
        suffix = next(s for s in want_by_suffix if path.endswith(s))
        assert label == want_by_suffix[suffix], path
    assert shapes["model/layers/0/moe/experts/gate_proj"] == (4, 16, 24)
    assert shapes["model/layers/0/moe/experts/down_proj"] == (4, 24, 16)
    assert shapes["model/layers/0/moe/router/kernel"] == (16, 4)
    assert sorted(set(labels.values())) == sorted(
        {"router", "expert", "attn_q", "attn_k", "attn_v", "attn_o", "norm", "embed", "head"})


def test_expert_axis_has_a_logical_sharding_name():
    specs = flat(nnx.get_partition_spec(nnx.state(MoeLLaMa(small_config(), rngs=nnx.Rngs(0)),
                                                  nnx.Param)))
    assert tuple(specs["model/layers/0/moe/experts/gate_proj"]) == ("expert", "embed", "mlp")
    assert tuple(specs["model/layers/0/moe/experts/down_proj"]) == ("expert", "mlp", "embed")
    assert tuple(specs["model/layers/0/moe/router/kernel"]) == ("embed", None)


# ------------------------------------------------------- per-expert alpha_hill and Muon

def np_hill_alpha(w):
    """SPEC.md section 1: eigenvalues of the Gram matrix, median xmin, top half."""
    w = np.asarray(w, np.float64)
    lam = np.sort(np.linalg.eigvalsh(w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T))
    i = len(lam) // 2
    return 1 + (len(lam) - i) / np.sum(np.log(lam[i:] / lam[i]))


def test_alpha_hill_fits_one_alpha_per_expert():
    model = MoeLLaMa(small_config(num_layers=1), rngs=nnx.Rngs(0))
    # Give each expert its own spectrum: scale expert e's columns by a power law of its own.
    rng = np.random.default_rng(1)
    for name in ("gate_proj", "up_proj", "down_proj"):
        var = getattr(model.model.layers[0].moe.experts, name)
        w = rng.standard_normal(var[...].shape)
        decay = np.linspace(0.1, 1.5, 4)[:, None, None]  # expert e: columns ~ j^-decay_e
        w *= (1.0 + np.arange(w.shape[-1]))[None, None, :] ** -decay
        var[...] = jnp.asarray(w, jnp.float32)
    params = nnx.state(model, nnx.Param)
    # estimator="eigh": the same alphas as the CPU default "tridiagonal", which takes ~15 s to
    # compile here; the per-expert batching under test is the same for both.
    tx = llr_optax.scale_by_alpha_hill(total_steps=10, min_eigenvalues=8, estimator="eigh")
    state = tx.init(params)
    _, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
    alphas = flat(llr_optax.last_alphas(state))
    scales = flat(llr_optax.current_scales(state))
    weights = flat(params)
    for name in ("gate_proj", "up_proj", "down_proj"):
        path = f"model/layers/0/moe/experts/{name}"
        a = np.asarray(alphas[path])
        assert a.shape == (4, 1, 1), a.shape  # one alpha per expert matrix
        want = [np_hill_alpha(w) for w in np.asarray(weights[path])]
        # float32 eigvalsh vs NumPy's float64: alpha agrees to ~1e-4.
        np.testing.assert_allclose(a.ravel(), want, rtol=2e-3)
        assert len(np.unique(np.round(a.ravel(), 4))) == 4
        assert np.asarray(scales[path]).shape == (4, 1, 1)


def test_muon_orthogonalises_each_expert_separately():
    g = jax.random.normal(jax.random.key(0), (4, 16, 24))
    g = g * jnp.array([0.01, 1.0, 10.0, 100.0])[:, None, None]  # very different scales
    stacked = optax.contrib.muon(1.0, muon_weight_dimension_numbers={
        "w": optax.contrib.MuonDimensionNumbers(reduction_axis=1, output_axis=2)})
    upd, _ = jax.jit(stacked.update)({"w": g}, stacked.init({"w": g}), {"w": g})
    single = optax.contrib.muon(1.0, muon_weight_dimension_numbers={
        "w": optax.contrib.MuonDimensionNumbers(reduction_axis=0, output_axis=1)})
    single_update = jax.jit(single.update)
    for e in range(4):
        one, _ = single_update({"w": g[e]}, single.init({"w": g[e]}), {"w": g[e]})
        # Same Newton-Schulz iteration on the same matrix: float32 agreement.
        np.testing.assert_allclose(np.asarray(upd["w"][e]), np.asarray(one["w"]), atol=1e-5)
    # Orthogonalised per expert: every expert's update has the same spectral scale,
    # whatever its gradient's scale.
    norms = [float(jnp.linalg.norm(upd["w"][e], 2)) for e in range(4)]
    assert max(norms) / min(norms) < 1.5


# ------------------------------------------------------------------ config and presets

def test_config_validation():
    with pytest.raises(ValueError, match="top_k"):
        small_config(top_k=5)
    with pytest.raises(ValueError, match="top_k >= 2"):
        small_config(normalize_top_k=True)
    with pytest.raises(ValueError, match="num_experts"):
        small_config(num_experts=0)
    with pytest.raises(ValueError, match="router_z_loss_weight"):
        small_config(router_z_loss_weight=-1.0)
    with pytest.raises(TypeError, match="MoeConfig"):
        MoeLLaMa(llama_config("tiny", 37, 8), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("preset", sorted(MOE_PRESETS))
def test_param_count_matches_model(preset):
    cfg = model_config(preset, 257, 64)
    model = nnx.eval_shape(lambda: create_model(cfg, rngs=nnx.Rngs(0)))
    assert isinstance(model, MoeLLaMa)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert sum(math.prod(x.shape) for x in leaves) == param_count(cfg)


def test_moe_8x34m_matches_rlrs_table():
    # RLRS appendix: MoE 8x34M has 33.6M active and 210M total parameters (without
    # embeddings, as its compute-optimal token counts are), d_model 512, 8 layers, 8 experts.
    cfg = model_config("moe-8x34m", 50257, 512)
    assert (cfg.hidden, cfg.num_layers, cfg.num_experts, cfg.top_k) == (512, 8, 8, 1)
    assert active_param_count(cfg, embeddings=False) == pytest.approx(33.6e6, rel=0.005)
    total = param_count(cfg) - 2 * 50257 * 512
    assert total == pytest.approx(210e6, rel=0.005)


def test_every_param_has_known_logical_names():
    known = {name for name, _ in LOGICAL_AXIS_RULES} | {None}
    for var in jax.tree.leaves(nnx.state(MoeLLaMa(small_config(), rngs=nnx.Rngs(0)), nnx.Param),
                               is_leaf=lambda x: isinstance(x, nnx.Variable)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.ndim and set(names) <= known
