"""The trainer's schedules (cosine, WSD), the Lion and SGD base optimizers and the
module_constant method, against NumPy written here. Pure optax chains on small arrays: no
model, no data, a few seconds."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llr_optax
from train import optimizers
from train.config import TrainConfig

PARAMS = {"model": {"embed_tokens": {"embedding": jnp.full((6, 4), 0.5)},
                    "layers": {"0": {"mlp": {"up_proj": {"kernel": jnp.full((4, 8), -0.3)}},
                                     "self_attn": {"q_proj": {"kernel": jnp.full((4, 4), 0.2)}},
                                     "input_layernorm": {"scale": jnp.ones(4)}}}},
          "lm_head": {"kernel": jnp.full((4, 6), 0.1)}}


def cfg_for(**overrides) -> TrainConfig:
    values = dict(steps=100, lr=0.01, warmup_fraction=0.1, final_lr_fraction=0.1, clip=0.0)
    return TrainConfig(**{**values, **overrides})


def np_wsd(t, lr, steps, warmup, decay, f):
    """Warmup-stable-decay written out: linear warmup, flat, linear decay to f * lr."""
    if t < warmup:
        return lr * t / warmup
    start = steps - decay
    if t <= start:
        return lr
    return lr * (1.0 - (1.0 - f) * min((t - start) / decay, 1.0))


def np_cosine(t, lr, steps, warmup, f):
    if t < warmup:
        return lr * t / warmup
    p = min((t - warmup) / (steps - warmup), 1.0)
    return lr * (f + (1 - f) * 0.5 * (1 + math.cos(math.pi * p)))


@pytest.mark.parametrize("method", ["uniform", "relative", "blockwise", "alpha_hill"])
def test_wsd_base_schedule_matches_numpy(method):
    cfg = cfg_for(schedule="wsd", decay_fraction=0.25, method=method)
    f = llr_optax.DENSE_FINAL_FRACTION if method == "relative" else cfg.final_lr_fraction
    sched = optimizers.base_schedule(cfg)
    assert (cfg.warmup_steps, cfg.decay_steps) == (10, 25)
    for t in (0, 5, 10, 40, 75, 76, 90, 99, 100, 120):
        want = np_wsd(t, cfg.lr, cfg.steps, 10, 25, f)
        assert float(sched(t)) == pytest.approx(want, rel=1e-5, abs=1e-10), t
    cosine = optimizers.base_schedule(cfg.replace(schedule="cosine"))
    for t in (0, 5, 10, 40, 90, 100):
        assert float(cosine(t)) == pytest.approx(np_cosine(t, cfg.lr, 100, 10, f), rel=1e-5,
                                                 abs=1e-10)


def _scales_over(cfg, steps):
    tx = optimizers.build_optimizer(cfg)
    state = tx.init(PARAMS)
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    update = jax.jit(tx.update)
    out = []
    for _ in range(steps):
        _, state = update(grads, state, PARAMS)
        out.append(llr_optax.current_scales(state))
    return out


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_module_constant_applies_the_same_factors_at_every_step(schedule):
    factors = {"mlp": 2.5, "embed": 4.0, "attn_q": 0.5}
    cfg = cfg_for(method="module_constant", module_factors=factors, schedule=schedule, steps=40)
    for t, scales in enumerate(_scales_over(cfg, 42)):
        layer = scales["model"]["layers"]["0"]
        got = {"mlp": float(layer["mlp"]["up_proj"]["kernel"]),
               "embed": float(scales["model"]["embed_tokens"]["embedding"]),
               "attn_q": float(layer["self_attn"]["q_proj"]["kernel"]),
               "head": float(scales["lm_head"]["kernel"]),
               "norm": float(layer["input_layernorm"]["scale"])}
        want = {**factors, "head": 1.0, "norm": 1.0}
        for name, value in want.items():
            assert got[name] == pytest.approx(value, rel=1e-6), (t, name)


def test_relative_under_wsd_keeps_its_start_multipliers_until_the_decay():
    cfg = cfg_for(method="relative", schedule="wsd", decay_fraction=0.2, steps=50)
    scales = _scales_over(cfg, 51)
    f = llr_optax.DENSE_FINAL_FRACTION
    (a, b) = llr_optax.DENSE_MULTIPLIERS["embed"]
    for t in (0, 20, 40):   # warmup and stable phase: the start multiplier
        assert float(scales[t]["model"]["embed_tokens"]["embedding"]) == pytest.approx(a)
    # Half-way through the decay (c = 1/2): (a/2 + f b/2) / (1/2 + f/2).
    assert float(scales[45]["model"]["embed_tokens"]["embedding"]) == pytest.approx(
        (a + f * b) / (1 + f), rel=1e-5)
    assert float(scales[50]["model"]["embed_tokens"]["embedding"]) == pytest.approx(b, rel=1e-5)


def _run_base(cfg, grads_seq):
    tx = optimizers.build_optimizer(cfg)
    params = {"w": jnp.asarray([0.5, -1.0, 2.0], jnp.float32)}
    state = tx.init(params)
    history = [np.asarray(params["w"], np.float64)]
    for g in grads_seq:
        updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        params = {"w": params["w"] + updates["w"]}
        history.append(np.asarray(params["w"], np.float64))
    return history


GRADS = [np.array([0.3, -0.2, 0.05]), np.array([-0.1, -0.4, 0.2]), np.array([0.6, 0.1, -0.3])]


def test_sgd_is_heavy_ball_with_l2_decay():
    cfg = cfg_for(optimizer="sgd", lr=0.1, b1=0.9, weight_decay=0.01, warmup_fraction=0.0)
    got = _run_base(cfg, GRADS)
    w, m = got[0].copy(), np.zeros(3)
    for t, g in enumerate(GRADS):
        lr = np_cosine(t, 0.1, cfg.steps, 0, cfg.final_lr_fraction)
        m = 0.9 * m + (g + 0.01 * w)        # torch.optim.SGD: L2 term inside the momentum
        w = w - lr * m
        np.testing.assert_allclose(got[t + 1], w, rtol=1e-6, atol=1e-7)


def test_lion_is_sign_momentum_with_decoupled_decay():
    cfg = cfg_for(optimizer="lion", lr=0.01, b1=0.95, b2=0.98, weight_decay=1.0,
                  warmup_fraction=0.0)
    got = _run_base(cfg, GRADS)
    w, m = got[0].copy(), np.zeros(3)
    for t, g in enumerate(GRADS):
        lr = np_cosine(t, 0.01, cfg.steps, 0, cfg.final_lr_fraction)
        direction = np.sign(0.95 * m + 0.05 * g)    # Chen et al. 2023, Algorithm 2
        w = w - lr * (direction + 1.0 * w)
        m = 0.98 * m + 0.02 * g
        np.testing.assert_allclose(got[t + 1], w, rtol=1e-6, atol=1e-7)


def test_adamw_only_methods_refuse_lion_and_sgd():
    for optimizer in ("lion", "sgd"):
        with pytest.raises(ValueError, match="alpha_decay"):
            cfg_for(method="alpha_decay", optimizer=optimizer)
        with pytest.raises(ValueError, match="own base optimizer"):
            cfg_for(method="lars", optimizer=optimizer)
