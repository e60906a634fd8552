"""GPT-2 (models/gpt2.py): forward pass against a NumPy GPT-2, tied embedding/head, labels,
initialisation, presets."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import llr_optax
from models import (ALL_PRESETS, GPT2, GPT2_PRESETS, LOGICAL_AXIS_RULES, MOE_PRESETS,
                    PRESETS, GPT2Config, LLaMa, MoeLLaMa, create_model, model_config,
                    param_count)


def small_config(**overrides) -> GPT2Config:
    kwargs = dict(vocab_size=29, hidden=16, num_heads=2, num_layers=2, max_seq_len=8)
    return GPT2Config(**{**kwargs, **overrides})


@nnx.jit
def forward(model, tokens):
    """``model(tokens, return_aux=True)``, compiled once per shape (eager NNX is slow)."""
    return model(tokens, return_aux=True)


def flat(tree):
    return {llr_optax._labels.path_to_str(p): np.asarray(x, np.float64)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def randomize(model, seed=0, scale=0.3):
    """O(1)-ish random values in every parameter (biases and norms included), so the
    reference comparison exercises every term."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    new = [jnp.asarray(rng.standard_normal(x.shape) * scale + (1.0 if x.ndim == 1 else 0.0),
                       jnp.float32) for x in leaves]
    nnx.update(model, jax.tree.unflatten(treedef, new))


# ----------------------------------------------------------------- NumPy reference GPT-2

def np_layer_norm(x, scale, bias, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def np_gpt2(p, tokens, cfg):
    """GPT-2 forward in float64 from a flat ``{path: array}`` dict of our parameter names."""
    b, t = tokens.shape
    d, nh = cfg.hidden, cfg.num_heads
    hd = d // nh
    x = p["wte/embedding"][tokens] + p["wpe/embedding"][:t][None]
    bias = lambda name, n: p.get(name, np.zeros(n))
    mask = np.tril(np.ones((t, t), bool))
    for i in range(cfg.num_layers):
        pre = f"h/{i}/"
        h = np_layer_norm(x, p[pre + "ln_1/scale"], bias(pre + "ln_1/bias", d))
        qkv = h @ p[pre + "attn/c_attn/kernel"] + bias(pre + "attn/c_attn/bias", 3 * d)
        q, k, v = (a.reshape(b, t, nh, hd).transpose(0, 2, 1, 3) for a in np.split(qkv, 3, -1))
        att = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
        att = np.where(mask, att, -np.inf)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        out = (att @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
        x = x + out @ p[pre + "attn/c_proj/kernel"] + bias(pre + "attn/c_proj/bias", d)
        h = np_layer_norm(x, p[pre + "ln_2/scale"], bias(pre + "ln_2/bias", d))
        f = cfg.intermediate
        h = np_gelu_tanh(h @ p[pre + "mlp/c_fc/kernel"] + bias(pre + "mlp/c_fc/bias", f))
        x = x + h @ p[pre + "mlp/c_proj/kernel"] + bias(pre + "mlp/c_proj/bias", d)
    x = np_layer_norm(x, p["ln_f/scale"], bias("ln_f/bias", d))
    head = p["wte/embedding"].T if cfg.tie_embeddings else p["lm_head/kernel"]
    return x @ head


@pytest.mark.parametrize("overrides", [{}, {"use_bias": False, "tie_embeddings": False}])
def test_forward_matches_numpy_gpt2(overrides):
    cfg = small_config(**overrides)
    model = GPT2(cfg, rngs=nnx.Rngs(0))
    randomize(model)
    tokens = np.array([[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]])
    logits, aux = forward(model, jnp.asarray(tokens))
    assert aux == {} and logits.dtype == jnp.float32
    params = flat(nnx.state(model, nnx.Param))
    assert any(k.endswith("bias") for k in params) == cfg.use_bias
    want = np_gpt2(params, tokens, cfg)
    # float32 model vs float64 reference through 2 blocks of O(1) weights.
    np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-4, atol=2e-4)
    # Causal: logits at position 3 do not depend on later tokens.
    changed = tokens.copy()
    changed[:, 4:] = 0
    again, _ = forward(model, jnp.asarray(changed))
    np.testing.assert_allclose(np.asarray(again[:, :4]), np.asarray(logits[:, :4]), atol=1e-5)


def test_shorter_sequences_and_length_check():
    model = GPT2(small_config(), rngs=nnx.Rngs(0))
    assert forward(model, jnp.zeros((1, 3), jnp.int32))[0].shape == (1, 3, 29)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(jnp.zeros((1, 9), jnp.int32))


# ------------------------------------------------------------------ tied embedding and head

def test_tied_embedding_is_one_leaf_whose_gradient_has_both_uses():
    cfg = small_config()
    tied = GPT2(cfg, rngs=nnx.Rngs(0))
    randomize(tied, scale=0.2)
    params = flat(nnx.state(tied, nnx.Param))
    assert tied.lm_head is None
    assert [k for k, v in params.items() if v.shape == (29, 16)] == ["wte/embedding"]

    # The same weights untied: lm_head = wte^T. The tied gradient must be the sum of the
    # embedding's and the head's gradients of the untied model.
    untied = GPT2(small_config(tie_embeddings=False), rngs=nnx.Rngs(0))
    nnx.update(untied, nnx.state(tied, nnx.Param))
    untied.lm_head.kernel[...] = tied.wte.embedding[...].T
    tokens = jnp.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    targets = jnp.array([[2, 3, 4, 5, 6, 7, 8, 9]])

    def loss(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(tokens), targets).mean()

    grad = nnx.jit(nnx.grad(loss))
    g_tied, g_untied = flat(grad(tied)), flat(grad(untied))
    np.testing.assert_allclose(
        g_tied["wte/embedding"], g_untied["wte/embedding"] + g_untied["lm_head/kernel"].T,
        rtol=1e-4, atol=1e-7)

    # One SGD step moves the lookup table and the output head together: after the step the
    # model equals the NumPy GPT-2 whose embedding AND head are the updated table.
    optimizer = nnx.Optimizer(tied, optax.sgd(0.5), wrt=nnx.Param)
    nnx.jit(lambda m, o, g: o.update(m, g))(tied, optimizer, grad(tied))
    new = flat(nnx.state(tied, nnx.Param))
    np.testing.assert_allclose(new["wte/embedding"],
                               params["wte/embedding"] - 0.5 * g_tied["wte/embedding"],
                               rtol=1e-5, atol=1e-7)
    logits, _ = forward(tied, tokens)
    np.testing.assert_allclose(np.asarray(logits), np_gpt2(new, np.asarray(tokens), cfg),
                               rtol=1e-4, atol=2e-4)


# ----------------------------------------------------------------------- labels, sharding

def test_labels_of_gpt2_params():
    params = nnx.state(GPT2(small_config(), rngs=nnx.Rngs(0)), nnx.Param)
    labels = {llr_optax._labels.path_to_str(p): l for p, l in
              jax.tree_util.tree_flatten_with_path(llr_optax.label_params(params))[0]}
    want = {"wte/embedding": "embed", "wpe/embedding": "pos_embed",
            "ln_f/scale": "norm", "ln_f/bias": "bias"}
    for i in range(2):
        want.update({
            f"h/{i}/ln_1/scale": "norm", f"h/{i}/ln_1/bias": "bias",
            f"h/{i}/ln_2/scale": "norm", f"h/{i}/ln_2/bias": "bias",
            f"h/{i}/attn/c_attn/kernel": "attn_qkv", f"h/{i}/attn/c_attn/bias": "bias",
            f"h/{i}/attn/c_proj/kernel": "attn_o", f"h/{i}/attn/c_proj/bias": "bias",
            f"h/{i}/mlp/c_fc/kernel": "mlp_up", f"h/{i}/mlp/c_fc/bias": "bias",
            f"h/{i}/mlp/c_proj/kernel": "mlp_down", f"h/{i}/mlp/c_proj/bias": "bias"})
    assert labels == want
    untied = nnx.state(GPT2(small_config(tie_embeddings=False), rngs=nnx.Rngs(0)), nnx.Param)
    assert llr_optax.label_params(untied)["lm_head"]["kernel"] == "head"


def test_logical_sharding_names():
    specs = nnx.get_partition_spec(nnx.state(GPT2(small_config(), rngs=nnx.Rngs(0)), nnx.Param))
    specs = {llr_optax._labels.path_to_str(p): tuple(s) for p, s in
             jax.tree_util.tree_flatten_with_path(
                 specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]}
    assert specs["wte/embedding"] == ("vocab", "embed")
    assert specs["wpe/embedding"] == (None, "embed")
    assert specs["h/0/attn/c_attn/kernel"] == ("embed", "heads")
    assert specs["h/0/attn/c_attn/bias"] == ("heads",)
    assert specs["h/0/mlp/c_proj/kernel"] == ("mlp", "embed")
    assert specs["h/0/ln_1/scale"] == ("embed",)


# ------------------------------------------------------------------- init, config, presets

def test_gpt2_initialisation():
    cfg = small_config(hidden=128, num_heads=4, num_layers=6, vocab_size=512, max_seq_len=256)
    p = flat(nnx.state(GPT2(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    # Sample stds of >= 32k N(0, s^2) draws are within 3% of s (> 5 sigma).
    for name, std in (("wte/embedding", 0.02), ("wpe/embedding", 0.02),
                      ("h/0/attn/c_attn/kernel", 0.02), ("h/0/mlp/c_fc/kernel", 0.02),
                      ("h/0/attn/c_proj/kernel", 0.02 / math.sqrt(12)),
                      ("h/0/mlp/c_proj/kernel", 0.02 / math.sqrt(12))):
        assert p[name].std() == pytest.approx(std, rel=0.03), name
    for name, value in p.items():
        if name.endswith("bias"):
            assert np.all(value == 0), name
        elif name.endswith("scale"):
            assert np.all(value == 1), name


def test_config_validation_and_defaults():
    assert small_config().intermediate == 64
    with pytest.raises(ValueError, match="num_heads"):
        small_config(num_heads=3)
    with pytest.raises(ValueError, match="hidden"):
        small_config(hidden=0)


@pytest.mark.parametrize("preset", sorted(GPT2_PRESETS))
@pytest.mark.parametrize("overrides", [{}, {"use_bias": False, "tie_embeddings": False}])
def test_param_count_matches_model(preset, overrides):
    cfg = model_config(preset, 257, 128, **overrides)
    model = nnx.eval_shape(lambda: create_model(cfg, rngs=nnx.Rngs(0)))
    assert isinstance(model, GPT2)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert sum(math.prod(x.shape) for x in leaves) == param_count(cfg)


def test_gpt2_124m_by_hand():
    cfg = model_config("gpt2-124m", 50257, 1024)
    d, v, t, layers = 768, 50257, 1024, 12
    per_layer = (2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d)
                 + (4 * d * d + d))
    assert param_count(cfg) == v * d + t * d + layers * per_layer + 2 * d == 124_439_808
    assert (cfg.hidden, cfg.num_heads, cfg.num_layers, cfg.intermediate) == (768, 12, 12, 3072)


def test_every_param_has_known_logical_names_and_builds_under_a_mesh():
    known = {name for name, _ in LOGICAL_AXIS_RULES} | {None}
    for var in jax.tree.leaves(nnx.state(GPT2(small_config(), rngs=nnx.Rngs(0)), nnx.Param),
                               is_leaf=lambda x: isinstance(x, nnx.Variable)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.ndim and set(names) <= known
    mesh = jax.make_mesh((1, 1), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_AXIS_RULES):
        model = GPT2(small_config(), rngs=nnx.Rngs(0))
        assert model.wte.embedding[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")


def test_model_config_and_create_model_cover_every_family():
    assert set(ALL_PRESETS) == set(PRESETS) | set(MOE_PRESETS) | set(GPT2_PRESETS)
    assert len(ALL_PRESETS) == len(set(ALL_PRESETS))
    for preset, cls in (("tiny", LLaMa), ("moe-tiny", MoeLLaMa), ("gpt-tiny", GPT2)):
        model = nnx.eval_shape(lambda p=preset: create_model(model_config(p, 257, 16),
                                                             rngs=nnx.Rngs(0)))
        assert type(model) is cls
    with pytest.raises(ValueError, match="unknown preset 'gpt3'.*gpt2-124m"):
        model_config("gpt3", 257, 16)
    with pytest.raises(TypeError):
        model_config("gpt-tiny", 257, 16, num_experts=8)  # not a GPT-2 field
    with pytest.raises(TypeError, match="not a model config"):
        create_model(object(), rngs=nnx.Rngs(0))
