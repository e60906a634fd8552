"""Tests of the trainer (train/config, optimizers, step, loop, CLI).

Everything runs on a micro model (1 block, width 32) over a small text file, so the
whole file takes well under a minute and a half on two CPU cores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import llr_optax
from train import __main__ as cli
from train import config as config_lib
from train import data as data_lib
from train import loop, optimizers, step
from train import state as state_lib
from train.config import TrainConfig

# One block: compile time dominates every test, and one block has every kind of leaf.
MICRO = {"num_layers": 1, "hidden": 32, "intermediate": 64, "num_heads": 2}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A ~150 KB English text file (Python's own help topics), blank-line separated."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k].strip() for k in sorted(topics))[:150_000]
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


def micro(corpus, tmp_path, **overrides) -> TrainConfig:
    """A config that trains in about a second."""
    values = dict(
        preset="tiny", model_overrides=MICRO, seq_len=32, batch_size=4, steps=8, lr=1e-2,
        warmup_fraction=0.0, eval_every=1000, eval_batches=2, log_every=1,
        checkpoint_every=0, data=corpus, out_dir=str(tmp_path / "run"), progress=False,
        interval=2, ramp_steps=1, active_fraction=1.0, init_grad_batches=2)
    return TrainConfig(**{**values, **overrides})


def latest_params(out_dir) -> tuple[int, dict]:
    """(step, params) of the latest checkpoint of a run, read back with orbax."""
    mngr = ocp.CheckpointManager(f"{out_dir}/checkpoints")
    s = mngr.latest_step()
    restored = mngr.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    mngr.close()
    return s, restored.state["params"]


# ------------------------------------------------------------------------------ config


def test_config_round_trip_and_presets():
    from models import ALL_PRESETS

    # Every model family's presets, and a run setting for each.
    assert set(config_lib.MODEL_PRESETS) == set(ALL_PRESETS) == set(config_lib.PRESETS)
    cfg = config_lib.from_preset("tiny", method="alpha_hill", model_overrides={"num_layers": 2})
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert cfg.trajectory_diff(cfg.replace(out_dir="elsewhere", eval_every=7)) == {}
    assert set(cfg.trajectory_diff(cfg.replace(lr=0.5, seed=3))) == {"lr", "seed"}


def test_field_of_another_method_does_not_block_resume():
    # Checkpoints of other methods were written when init_grad_train_init defaulted to
    # "paper"; the field changes nothing there, so they must still resume.
    from train.checkpoints import ConfigMismatchError, check_config

    other = config_lib.from_preset("tiny", method="blockwise")
    written_before = other.replace(init_grad_train_init="paper").to_dict()
    assert other.trajectory_diff(TrainConfig.from_dict(written_before)) == {}
    check_config(written_before, other, step=1, directory=Path("ckpt"))
    init_grad = config_lib.from_preset("tiny", method="init_grad")
    with pytest.raises(ConfigMismatchError, match="init_grad_train_init: checkpoint has 'paper'"):
        check_config(init_grad.replace(init_grad_train_init="paper").to_dict(), init_grad,
                     step=1, directory=Path("ckpt"))


@pytest.mark.parametrize("bad, match", [
    (dict(preset="huge"), "Unknown preset 'huge'"),
    (dict(method="sgd_magic"), "Unknown method 'sgd_magic'"),
    (dict(optimizer="adagrad"), "Unknown optimizer 'adagrad'"),
    (dict(method="lamb", optimizer="muon"), "own base optimizer"),
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(s_min=6.0), "s_min must be <= s_max"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)
    with pytest.raises(ValueError, match="Unknown preset"):
        config_lib.from_preset("huge")


# ------------------------------------------------------------------------- optimizers

# Lion and SGD: the init-grad paper's pairings (uniform, init_grad) only, to keep this file
# fast; their update rules are checked against NumPy in test_train_schedules.py.
COMBINATIONS = [(m, o) for o in config_lib.OPTIMIZERS for m in config_lib.METHODS
                if not (m in config_lib.ADAMW_ONLY_METHODS and o != "adamw")
                and (o in ("adamw", "muon") or m in ("uniform", "init_grad"))]


@pytest.fixture(scope="module")
def micro_data(corpus, tmp_path_factory):
    cfg = micro(corpus, tmp_path_factory.mktemp("x"))
    return loop.data_config(cfg), data_lib.build_data(loop.data_config(cfg))


@pytest.mark.parametrize("method, optimizer", COMBINATIONS)
def test_every_method_takes_three_jitted_steps(method, optimizer, corpus, tmp_path, micro_data):
    factors = {"mlp": 2.0, "embed": 3.0} if method == "module_constant" else {}
    cfg = micro(corpus, tmp_path, method=method, optimizer=optimizer, module_factors=factors)
    data = micro_data[1]
    model = loop.build_model(cfg, data.vocab_size)
    scales = loop.measure_init_scales(cfg, model, data) if method == "init_grad" else None
    optimizer_ = nnx.Optimizer(model, optimizers.build_optimizer(cfg, init_scales=scales), wrt=nnx.Param)
    before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
    it = data.train_iter()
    losses = [float(step.train_step(model, optimizer_, next(it))["loss"]) for _ in range(3)]
    after = nnx.state(model, nnx.Param)
    assert all(math.isfinite(l) for l in losses), losses
    assert bool(state_lib.all_finite(after))
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, after))
    assert all(moved), "every parameter should have been updated"
    assert int(optimizer_.step[...]) == 3


def test_muon_only_on_hidden_matrices():
    # The trainer routes Muon with llr_optax.muon_dimension_numbers (tested in the library's
    # tests too); here on the trainer's own key paths.
    params = {"model": {"embed_tokens": {"embedding": jnp.zeros((10, 4))},
                        "layers": {"0": {"self_attn": {"q_proj": {"kernel": jnp.zeros((4, 4))}},
                                         "input_layernorm": {"scale": jnp.zeros(4)}}}},
              "lm_head": {"kernel": jnp.zeros((4, 10))}}
    dims = llr_optax.muon_dimension_numbers(params)
    assert dims["model"]["embed_tokens"]["embedding"] is None
    assert dims["lm_head"]["kernel"] is None
    assert dims["model"]["layers"]["0"]["input_layernorm"]["scale"] is None
    assert dims["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"] is not None


def test_schedules(corpus, tmp_path):
    cfg = micro(corpus, tmp_path, steps=100, warmup_fraction=0.1, lr=1.0)
    sched = optimizers.base_schedule(cfg)
    assert float(sched(0)) == 0.0 and float(sched(10)) == pytest.approx(1.0)
    assert float(sched(100)) == pytest.approx(cfg.final_lr_fraction)
    rel = optimizers.base_schedule(cfg.replace(method="relative"))
    assert float(rel(100)) == pytest.approx(llr_optax.DENSE_FINAL_FRACTION)
    up = optimizers.base_schedule(cfg.replace(method="upper_bound"))
    assert float(up(10)) == pytest.approx(cfg.s_max)
    # blockwise: the run's own floor, so its base schedule is uniform's.
    block = optimizers.base_schedule(cfg.replace(method="blockwise"))
    for t in (0, 5, 10, 60, 100):
        assert float(block(t)) == pytest.approx(float(sched(t)), rel=1e-6, abs=1e-9)
    with pytest.raises(ValueError, match="alpha_decay.*adamw"):
        cfg.replace(method="alpha_decay", optimizer="muon")
    # TrainConfig already refuses lars + muon; build_optimizer checks on its own too.
    bad = cfg.replace(method="lars")
    object.__setattr__(bad, "optimizer", "muon")
    with pytest.raises(ValueError, match="own base optimizer"):
        optimizers.build_optimizer(bad)


def test_init_grad_scales_match_independent_recomputation(corpus, tmp_path, micro_data):
    cfg = micro(corpus, tmp_path, method="init_grad", init_grad_batches=3)
    data = micro_data[1]
    model = loop.build_model(cfg, data.vocab_size)
    scales = loop.measure_init_scales(cfg, model, data)

    # Independently: a fan-in copy, nnx.grad on a model object, the SPEC formula in numpy.
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    key = jax.random.fold_in(jax.random.key(cfg.seed), 0x1A17)
    copy = loop.build_model(cfg, data.vocab_size)
    nnx.update(copy, llr_optax.fan_in_init(params, key))
    batches = iter(data_lib.train_dataset(
        data.train_tokens, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
        seed=cfg.seed + loop._INIT_GRAD_SEED_OFFSET))
    first_train_batch = next(data.train_iter())
    grad = nnx.jit(nnx.grad(step.mean_loss))
    total = None
    for _ in range(cfg.init_grad_batches):
        batch = next(batches)
        assert not np.array_equal(batch["inputs"], first_train_batch["inputs"])
        g = grad(copy, batch)
        g = [float(np.mean(np.abs(np.asarray(x)))) for x in jax.tree.leaves(g)]
        total = g if total is None else [a + b for a, b in zip(total, g)]
    sizes = np.array([x.size for x in jax.tree.leaves(params)], np.float64)
    u = 1.0 / np.sqrt(np.array(total))
    expected = u / (np.sum(sizes * u) / np.sum(sizes))
    got = np.array([float(s) for s in jax.tree.leaves(scales)])
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert np.std(got) > 0.05, "the factors should differ between leaves"

    # ... and they are what the optimizer applies.
    opt = nnx.Optimizer(model, optimizers.build_optimizer(cfg, init_scales=scales), wrt=nnx.Param)
    applied = [float(s) for s in jax.tree.leaves(llr_optax.current_scales(opt.opt_state))]
    np.testing.assert_allclose(applied, expected, rtol=1e-5)


# ------------------------------------------------------------------------------- loop


def test_short_run_lowers_the_loss(corpus, tmp_path):
    cfg = micro(corpus, tmp_path, steps=40, eval_every=40, eval_batches=None)
    result = loop.train(cfg)
    losses = [r["loss"] for r in result["train"]]
    assert len(losses) == 40
    assert losses[0] == pytest.approx(math.log(257), abs=0.3)  # uniform guess at init
    assert np.mean(losses[-5:]) < losses[0] - 1.5
    final = result["final"]
    assert final["step"] == 40 and final["val_loss"] < losses[0] - 1.5
    # Whole validation split: every validation target scored exactly once.
    data = data_lib.build_data(loop.data_config(cfg))
    assert final["val_tokens"] == data.num_val_targets
    nats = final["val_loss"] * final["val_tokens"]
    assert final["val_bpb"] == pytest.approx(data.bits_per_byte(nats))
    assert final["val_ppl"] == pytest.approx(math.exp(final["val_loss"]))


@pytest.mark.slow
def test_resume_reaches_the_uninterrupted_trajectory(corpus, tmp_path):
    # alpha_hill has the most optimizer state (counts, ramps, alphas) to carry over.
    cfg = micro(corpus, tmp_path, method="alpha_hill", steps=8, checkpoint_every=2,
                out_dir=str(tmp_path / "split"))
    first = loop.train(cfg, stop_after=4)
    assert first["step"] == 4 and first["final"] is None
    resumed = loop.train(cfg, resume=True)
    assert resumed["step"] == 8

    straight = loop.train(cfg.replace(out_dir=str(tmp_path / "straight")))
    s1, p1 = latest_params(tmp_path / "split")
    s2, p2 = latest_params(tmp_path / "straight")
    assert s1 == s2 == 8
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
    # Same data order and step count: identical loss records, no duplicates.
    assert [r["loss"] for r in resumed["train"]] == [r["loss"] for r in straight["train"]]
    assert [r["step"] for r in resumed["alphas"]] == [0, 2, 4, 6]


def test_resume_refuses_a_different_config(corpus, tmp_path):
    cfg = micro(corpus, tmp_path, steps=4)
    loop.train(cfg, stop_after=2)
    with pytest.raises(loop.ConfigMismatchError,
                       match=r"lr: checkpoint has 0.01, this run has 0.02"):
        loop.train(cfg.replace(lr=2e-2), resume=True)
    with pytest.raises(FileExistsError, match="--resume"):
        loop.train(cfg)


def test_bad_data_inputs(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        loop.train(micro(corpus, tmp_path, data=str(tmp_path / "missing.txt")))
    short = tmp_path / "short.txt"
    short.write_text("only a few bytes of text", encoding="utf-8")
    with pytest.raises(ValueError, match="seq_len=32 is too long"):
        loop.train(micro(corpus, tmp_path, data=str(short), val_fraction=0.0))


# -------------------------------------------------------------------------------- CLI


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    for argv, message in [
        (["--preset", "huge"], "invalid choice: 'huge'"),
        (["--method", "magic"], "invalid choice: 'magic'"),
        (["--optimizer", "adagrad"], "invalid choice: 'adagrad'"),
        (["--method", "lars", "--optimizer", "muon"], "own base optimizer"),
        (["--data", str(tmp_path / "nope.txt")], "does not exist"),
        (["--steps", "0"], "steps must be an integer >= 1"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_cli_stops_on_nan_and_keeps_last_good_checkpoint(corpus, tmp_path, capsys):
    out = tmp_path / "nan"
    argv = ["--data", corpus, "--out", str(out), "--lr", "1e6", "--warmup-fraction", "0",
            "--steps", "20", "--checkpoint-every", "1", "--batch-size", "4", "--seq-len", "32",
            "--no-progress"]
    # The CLI has no model-size flag; shrink the tiny preset for speed.
    original = config_lib.PRESETS["tiny"]
    config_lib.PRESETS["tiny"] = {**original, "model_overrides": MICRO}
    try:
        code = cli.main(argv)
    finally:
        config_lib.PRESETS["tiny"] = original
    err = capsys.readouterr().err
    assert code == 1
    assert "diverged" in err and "at step" in err
    records = loop.read_metrics(out / "metrics.jsonl")
    bad_step = records[-1]["step"]
    assert records[-1]["kind"] == "diverged" and bad_step < 20
    saved, params = latest_params(out)
    assert saved < bad_step
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))
