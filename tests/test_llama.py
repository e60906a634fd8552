"""Tests for the Flax NNX LLaMa in ``models/``."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import (LOGICAL_AXIS_RULES, PRESETS, LLaMa, LlamaConfig, RMSNorm,
                    apply_rope, llama_config, param_count, rope_tables)

BYTE_VOCAB = 259


def small_config(**overrides) -> LlamaConfig:
    kwargs = dict(vocab_size=61, hidden=32, intermediate=48, num_heads=4,
                  num_layers=2, max_seq_len=16)
    return LlamaConfig(**{**kwargs, **overrides})


def flat_params(model):
    """``{'a/b/c': Param}`` for every parameter of ``model``."""
    return {"/".join(map(str, path)): var
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def random_tokens(cfg, batch=2, length=None, seed=0):
    length = length or cfg.max_seq_len
    return jax.random.randint(jax.random.key(seed), (batch, length), 0,
                              cfg.vocab_size, dtype=jnp.int32)


# ---------------------------------------------------------------- param counts

@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": True}])
def test_param_count_matches_model(preset, overrides):
    cfg = llama_config(preset, BYTE_VOCAB, 128, **overrides)
    # eval_shape builds the model abstractly, so the 1b preset costs no memory.
    abstract = nnx.eval_shape(lambda: LLaMa(cfg, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert sum(math.prod(x.shape) for x in leaves) == param_count(cfg)


def test_param_count_with_gqa_matches_model():
    cfg = llama_config("20m", 1000, 64, num_kv_heads=2)
    abstract = nnx.eval_shape(lambda: LLaMa(cfg, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert sum(math.prod(x.shape) for x in leaves) == param_count(cfg)


def test_param_count_60m_by_hand():
    # GaLore's "60M" LLaMa: d=512, f=1376, 8 layers, vocab 32000, untied.
    embed = 32000 * 512                    # 16_384_000
    head = 512 * 32000                     # 16_384_000
    attn = 4 * 512 * 512                   # 1_048_576 (q, k, v, o)
    mlp = 3 * 512 * 1376                   # 2_113_536
    norms = 2 * 512                        # 1_024
    per_layer = attn + mlp + norms         # 3_163_136
    expected = embed + head + 8 * per_layer + 512
    assert expected == 58_073_600          # the paper's "58M"
    assert param_count(llama_config("60m", 32000, 256)) == expected


def test_tiny_preset_is_cpu_sized():
    n = param_count(llama_config("tiny", BYTE_VOCAB, 256))
    assert 1_000_000 <= n <= 3_000_000


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="'huge'.*tiny.*60m.*1b"):
        llama_config("huge", 256, 128)


# ------------------------------------------------------------------- structure

def test_parameter_paths_are_hf_style():
    model = LLaMa(small_config(num_layers=1), rngs=nnx.Rngs(0))
    expected = {"lm_head/kernel", "model/embed_tokens/embedding", "model/norm/scale"}
    expected |= {f"model/layers/0/{name}" for name in (
        "input_layernorm/scale", "post_attention_layernorm/scale",
        "self_attn/q_proj/kernel", "self_attn/k_proj/kernel",
        "self_attn/v_proj/kernel", "self_attn/o_proj/kernel",
        "mlp/gate_proj/kernel", "mlp/up_proj/kernel", "mlp/down_proj/kernel")}
    assert set(flat_params(model)) == expected
    # Nothing but parameters lives in the state (RoPE tables are constants).
    assert len(nnx.to_flat_state(nnx.state(model))) == len(expected)


def test_every_param_has_logical_sharding():
    model = LLaMa(small_config(num_kv_heads=2), rngs=nnx.Rngs(0))
    known = {name for name, _ in LOGICAL_AXIS_RULES}
    for path, var in flat_params(model).items():
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.ndim, path
        assert set(names) <= known, path
    specs = nnx.to_flat_state(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
    spec = dict(specs)[("model", "layers", 0, "self_attn", "q_proj", "kernel")]
    assert spec.get_value() == jax.sharding.PartitionSpec("embed", "heads")


def test_builds_sharded_under_mesh_and_rules():
    mesh = jax.make_mesh((1, 1), ("data", "fsdp"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_AXIS_RULES):
        model = LLaMa(small_config(), rngs=nnx.Rngs(0))
        sharding = model.model.embed_tokens.embedding[...].sharding
        assert sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
        assert model(random_tokens(model.config)).shape == (2, 16, 61)


def test_init_statistics():
    model = LLaMa(small_config(hidden=64, intermediate=256), rngs=nnx.Rngs(0))
    params = flat_params(model)
    for path, var in params.items():
        value = np.asarray(var[...])
        if path.endswith("scale"):
            np.testing.assert_array_equal(value, 1.0)
        else:
            assert abs(value.std() - 0.02) < 0.003, path


# --------------------------------------------------------------------- forward

def test_forward_shape_dtype_and_grad():
    cfg = small_config()
    model = LLaMa(cfg, rngs=nnx.Rngs(0))
    tokens = random_tokens(cfg)
    logits = model(tokens)
    assert logits.shape == (2, 16, cfg.vocab_size) and logits.dtype == jnp.float32

    def loss_fn(m):
        lp = jax.nn.log_softmax(m(tokens[:, :-1]))
        return -jnp.take_along_axis(lp, tokens[:, 1:, None], -1).mean()

    loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
    # Near-uniform predictions at init: loss ~ log(vocab).
    assert abs(float(loss) - math.log(cfg.vocab_size)) < 0.1
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_bfloat16_compute_returns_float32_logits():
    model = LLaMa(small_config(dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
    assert model(random_tokens(model.config)).dtype == jnp.float32


def test_causality():
    cfg = small_config()
    model = LLaMa(cfg, rngs=nnx.Rngs(0))
    tokens = random_tokens(cfg, batch=1)
    t = 9
    changed = tokens.at[0, t].set((tokens[0, t] + 1) % cfg.vocab_size)
    a, b = model(tokens), model(changed)
    np.testing.assert_allclose(a[:, :t], b[:, :t], atol=1e-6, rtol=0)
    assert float(jnp.abs(a[:, t] - b[:, t]).max()) > 1e-4


def test_too_long_sequence_raises():
    model = LLaMa(small_config(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(jnp.zeros((1, 17), jnp.int32))


# ------------------------------------------------------------------------- GQA

def test_gqa_shapes_and_forward():
    cfg = small_config(num_heads=4, num_kv_heads=2)
    model = LLaMa(cfg, rngs=nnx.Rngs(0))
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.kernel.shape == (32, 32)
    assert attn.k_proj.kernel.shape == (32, 2 * 8)
    assert attn.v_proj.kernel.shape == (32, 2 * 8)
    assert attn.o_proj.kernel.shape == (32, 32)
    assert model(random_tokens(cfg)).shape == (2, 16, cfg.vocab_size)


def test_mha_is_default_kv_heads():
    cfg = small_config(num_heads=4)
    assert cfg.num_kv_heads == 4
    attn = LLaMa(cfg, rngs=nnx.Rngs(0)).model.layers[0].self_attn
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
        assert proj.kernel.shape == (32, 32)


def _numpy_attention(attn, x, sin, cos):
    """Reference attention: explicit kv-head repeat and masked softmax."""
    b, t, _ = x.shape
    n, k, h = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = (x @ np.asarray(attn.q_proj.kernel[...])).reshape(b, t, n, h)
    kk = (x @ np.asarray(attn.k_proj.kernel[...])).reshape(b, t, k, h)
    v = (x @ np.asarray(attn.v_proj.kernel[...])).reshape(b, t, k, h)
    q = np.asarray(apply_rope(jnp.asarray(q), sin, cos))
    kk = np.asarray(apply_rope(jnp.asarray(kk), sin, cos))
    # Query head i reads kv head i // (n // k).
    kk, v = np.repeat(kk, n // k, axis=2), np.repeat(v, n // k, axis=2)
    scores = np.einsum("bqnh,bknh->bnqk", q, kk) / np.sqrt(h)
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bnqk,bknh->bqnh", probs, v).reshape(b, t, n * h)
    return out @ np.asarray(attn.o_proj.kernel[...])


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_attention_matches_numpy_reference(kv_heads):
    cfg = small_config(num_kv_heads=kv_heads)
    attn = LLaMa(cfg, rngs=nnx.Rngs(0)).model.layers[0].self_attn
    x = np.random.default_rng(0).normal(size=(2, 16, 32)).astype(np.float32)
    sin, cos = rope_tables(16, cfg.head_dim)
    out = attn(jnp.asarray(x), jnp.asarray(sin), jnp.asarray(cos))
    np.testing.assert_allclose(out, _numpy_attention(attn, x, sin, cos),
                               atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------ RoPE

def test_rope_matches_numpy_complex_rotation():
    head_dim, t, theta = 8, 6, 10000.0
    x = np.random.default_rng(1).normal(size=(2, t, 3, head_dim)).astype(np.float32)
    sin, cos = rope_tables(32, head_dim, theta)
    got = apply_rope(jnp.asarray(x), jnp.asarray(sin[:t]), jnp.asarray(cos[:t]))
    # Independent formulation: pair (x_i, x_{i+H/2}) as a complex number and
    # multiply by exp(i * pos * theta^(-2i/H)).
    half = head_dim // 2
    freqs = theta ** (-2.0 * np.arange(half) / head_dim)
    phase = np.exp(1j * np.arange(t)[:, None] * freqs)[None, :, None, :]
    z = (x[..., :half] + 1j * x[..., half:]) * phase
    want = np.concatenate([z.real, z.imag], axis=-1)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_rope_scores_depend_only_on_relative_position():
    head_dim = 16
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, head_dim)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, head_dim)), jnp.float32)
    sin, cos = map(jnp.asarray, rope_tables(64, head_dim))

    def score(i, j):
        qi = apply_rope(q, sin[i:i + 1], cos[i:i + 1])
        kj = apply_rope(k, sin[j:j + 1], cos[j:j + 1])
        return float(jnp.sum(qi * kj))

    for i, j, s in [(5, 2, 7), (3, 3, 20), (0, 4, 31)]:
        assert score(i, j) == pytest.approx(score(i + s, j + s), abs=1e-5)
    assert abs(score(5, 2) - score(5, 3)) > 1e-3  # but it does depend on i - j


# --------------------------------------------------------------------- RMSNorm

def test_rmsnorm_matches_numpy():
    x = np.random.default_rng(3).normal(size=(2, 5, 12)).astype(np.float32) * 3
    norm = RMSNorm(12, eps=1e-6, rngs=nnx.Rngs(0))
    scale = np.linspace(0.5, 2.0, 12).astype(np.float32)
    norm.scale[...] = jnp.asarray(scale)
    want = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(norm(jnp.asarray(x)), want * scale, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- tying

def test_tied_embeddings():
    cfg = small_config(tie_embeddings=True)
    model = LLaMa(cfg, rngs=nnx.Rngs(0))
    assert model.lm_head is None
    assert not any("lm_head" in p for p in flat_params(model))
    tokens = random_tokens(cfg)
    h = model.model(tokens)
    emb = model.model.embed_tokens.embedding[...]
    np.testing.assert_allclose(model(tokens), h @ emb.T, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------- configs

@pytest.mark.parametrize("overrides, field", [
    ({"hidden": 30, "num_heads": 4}, "num_heads"),
    ({"num_heads": 4, "num_kv_heads": 3}, "num_kv_heads"),
    ({"hidden": 36, "num_heads": 4}, "head_dim"),
    ({"num_layers": 0}, "num_layers"),
    ({"vocab_size": -1}, "vocab_size"),
])
def test_bad_config_names_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        small_config(**overrides)


def test_config_is_frozen_and_hashable():
    cfg = small_config()
    with pytest.raises(AttributeError):
        cfg.hidden = 64  # type: ignore[misc]
    assert hash(cfg) == hash(small_config())
