"""The trainer on MoE LLaMa and GPT-2: the training loss is cross-entropy + the MoE
auxiliary loss (its parts logged), every chainable method runs on both families,
``relative`` on MoE applies RLRS's MoE table (or a ``--multipliers`` file's), and
init_grad trains from the paper's initialisation by default.

Micro models (1 block, width 32, 4 experts) keep compile times to a few seconds: the
file costs about 80 s of CPU time (measured on the 2-core machine, under load).
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llr_optax
from tests._micro import write_corpus
from train import __main__ as cli
from train import config as config_lib
from train import data as data_lib
from train import loop, optimizers, step
from train import multipliers as multipliers_lib
from train.config import TrainConfig
from train.metrics_log import read_metrics

MOE_MICRO = {"num_layers": 1, "hidden": 32, "intermediate": 32, "num_heads": 2,
             "num_experts": 4}
GPT2_MICRO = {"num_layers": 1, "hidden": 32, "intermediate": 64, "num_heads": 2}
FAMILIES = {"moe": ("moe-tiny", MOE_MICRO), "gpt2": ("gpt-tiny", GPT2_MICRO)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data") / "corpus.txt")


def micro(corpus, out_dir, family, **overrides) -> TrainConfig:
    preset, shape = FAMILIES[family]
    values = dict(
        preset=preset, model_overrides=shape, seq_len=32, batch_size=4, steps=8, lr=1e-2,
        warmup_fraction=0.0, eval_every=1000, eval_batches=2, log_every=1,
        checkpoint_every=0, data=corpus, out_dir=str(out_dir), progress=False,
        interval=2, ramp_steps=1, active_fraction=1.0, init_grad_batches=2,
        min_eigenvalues=4)
    return TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def data(corpus, tmp_path_factory):
    cfg = micro(corpus, tmp_path_factory.mktemp("x"), "moe")
    return data_lib.build_data(loop.data_config(cfg))


@nnx.jit
def forward(model, inputs):
    """``model(inputs, return_aux=True)``, compiled (eager dispatch is slower here)."""
    return model(inputs, return_aux=True)


def numpy_cross_entropy(logits, targets) -> float:
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return float(-np.take_along_axis(log_probs, np.asarray(targets)[..., None], -1).mean())


# ---------------------------------------------------------------- MoE: loss and logging


@pytest.mark.slow
def test_moe_run_logs_cross_entropy_plus_aux_and_its_parts(corpus, tmp_path, data):
    """python -m train on a MoE preset (alpha_hill on Muon): the logged step-1 loss is
    CE + 1e-3 z-loss + 1e-2 balance loss of the initial model on the first batch, and
    alpha_hill gives each expert matrix its own factor."""
    out = tmp_path / "run"
    argv = ["--preset", "moe-tiny", "--method", "alpha_hill", "--optimizer", "muon",
            "--num-layers", "1", "--hidden", "32", "--intermediate", "32", "--num-heads", "2",
            "--num-experts", "4", "--seq-len", "32", "--batch-size", "4", "--steps", "2",
            "--log-every", "1", "--eval-batches", "2", "--val-batch-size", "4",
            "--warmup-fraction", "0", "--checkpoint-every", "0", "--interval", "1",
            "--ramp-steps", "0", "--active-fraction", "1", "--min-eigenvalues", "4",
            "--data", corpus, "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    records = read_metrics(out / "metrics.jsonl")
    first = [r for r in records if r["kind"] == "train"][0]
    scale = [r for r in records if r["kind"] == "scale"][-1]["scale"]
    experts = [v for k, v in scale.items() if "/experts/" in k]
    assert len(experts) == 3 and all(len(v) == 4 and len(set(v)) > 1 for v in experts)

    cfg = micro(corpus, tmp_path, "moe")
    model = loop.build_model(cfg, data.vocab_size)
    batch = next(data.train_iter())
    logits, aux = forward(model, batch["inputs"])
    ce = numpy_cross_entropy(logits, batch["targets"])
    z, balance = float(aux["router_z_loss"]), float(aux["load_balance_loss"])
    load = np.asarray(aux["expert_load"])
    assert first["ce_loss"] == pytest.approx(ce, rel=1e-5)
    assert first["router_z_loss"] == pytest.approx(z, rel=1e-5)
    assert first["load_balance_loss"] == pytest.approx(balance, rel=1e-5)
    assert first["aux_loss"] == pytest.approx(1e-3 * z + 1e-2 * balance, rel=1e-5)
    assert first["loss"] == pytest.approx(ce + 1e-3 * z + 1e-2 * balance, rel=1e-6)
    assert first["loss"] - first["ce_loss"] > 5e-3  # the aux term is really in it
    np.testing.assert_allclose(first["expert_load"], load, atol=1e-6)
    assert first["expert_imbalance"] == pytest.approx(4 * load.max(), rel=1e-6)
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert "aux_loss" not in evals[-1]  # evaluation is cross-entropy only


def test_moe_training_gradient_includes_the_aux_loss(corpus, tmp_path, data):
    cfg = micro(corpus, tmp_path, "moe")
    graphdef, params, rest = nnx.split(loop.build_model(cfg, data.vocab_size), nnx.Param, ...)
    batch = next(data.train_iter())

    @jax.jit
    def router_grads(params):
        def grad_of(loss):
            grads = jax.grad(lambda p: loss(nnx.merge(graphdef, p, rest)))(params)
            return grads["model"]["layers"][0]["moe"]["router"]["kernel"][...]

        return (grad_of(lambda m: step.training_loss(m, batch)[0]),
                grad_of(lambda m: step.mean_loss(m, batch)),
                grad_of(lambda m: m(batch["inputs"], return_aux=True)[1]["aux_loss"]))

    total, ce_only, aux_only = (np.asarray(g) for g in router_grads(params))
    assert np.abs(aux_only).max() > 1e-3 * np.abs(ce_only).max()
    np.testing.assert_allclose(total, ce_only + aux_only, rtol=1e-4, atol=1e-7)


# -------------------------------------------------------- every method on both families

def _cfg_for(corpus, tmp_path, family, method, optimizer="adamw"):
    factors = {"mlp": 2.0, "expert": 2.0, "embed": 3.0} if method == "module_constant" else {}
    return micro(corpus, tmp_path, family, method=method, optimizer=optimizer,
                 module_factors=factors)


# The module-table methods label every leaf by family (expert/router, GPT-2's fused qkv,
# position embedding); they run their optax chain on the family's parameters (cheaper
# than train steps: the forward and backward are the same for every method). Real steps:
# alpha_hill on Muon for MoE (the python -m train run above), init_grad on Muon for GPT-2
# (below); tempbalance and alpha_decay share alpha_hill's per-matrix code.
CHAIN_ONLY = [(f, m) for f in sorted(FAMILIES) for m in ("relative", "blockwise",
                                                          "module_constant")]
CHAIN_ONLY += [("gpt2", "alpha_hill")]


@pytest.mark.parametrize("family, method", CHAIN_ONLY)
def test_method_chain_updates_every_leaf_of_the_family(family, method, corpus, tmp_path,
                                                       data):
    cfg = _cfg_for(corpus, tmp_path, family, method)
    params = nnx.state(loop.build_model(cfg, data.vocab_size), nnx.Param)
    tx = optimizers.build_optimizer(cfg)
    update = jax.jit(tx.update)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
    for _ in range(2):
        updates, state = update(grads, state, params)
        assert all(bool(jnp.all(jnp.isfinite(u)) & jnp.any(u != 0))
                   for u in jax.tree.leaves(updates)), method


# ------------------------------------------------------------------ relative on MoE


def _expected_module(path: str) -> str | None:
    """The MoE table's module of a parameter path, written out by hand (no label rules)."""
    for fragment, module in (("router", "router"), ("experts", "expert"),
                             ("self_attn", "attn"), ("embed_tokens", "embed"),
                             ("lm_head", "head")):
        if fragment in path:
            return module
    return None  # norms: not in the table, factor 1


@pytest.mark.parametrize("source", ["paper", "file"])
def test_relative_on_moe_applies_the_moe_table(source, corpus, tmp_path, data):
    """With plain SGD (no momentum, decay or clipping) and unit gradients, an update is
    minus the module's effective LR eta (a c + f b (1 - c)), c = (1 + cos(pi t / T)) / 2."""
    if source == "paper":
        table = {"embed": (5.0, 0.6), "head": (0.6, 0.4), "router": (0.6, 1.0),
                 "expert": (0.3, 1.125), "attn": (1.0, 1.0)}  # RLRS Table 4
        fraction, overrides = 0.04, {}
    else:
        table = {"expert": (2.0, 0.5), "attn": (0.25, 4.0)}
        fraction = 0.1
        path = tmp_path / "found.json"
        path.write_text(json.dumps({"multipliers": table, "final_fraction": fraction}))
        overrides = {"multipliers": multipliers_lib.load_multipliers_file(str(path))[0]}
    cfg = micro(corpus, tmp_path, "moe", method="relative", optimizer="sgd", b1=0.0,
                weight_decay=0.0, clip=0.0, steps=10, **overrides)
    params = nnx.state(loop.build_model(cfg, data.vocab_size), nnx.Param)
    tx = optimizers.build_optimizer(cfg)
    state = tx.init(params)
    ones = jax.tree.map(jnp.ones_like, params)
    update = jax.jit(tx.update)
    for t in range(7):
        updates, state = update(ones, state, params)
        if t not in (0, 6):
            continue
        c = (1 + math.cos(math.pi * t / cfg.steps)) / 2
        for key_path, value in jax.tree_util.tree_leaves_with_path(updates):
            module = _expected_module(jax.tree_util.keystr(key_path))
            a, b = table.get(module, (1.0, 1.0))
            expected = cfg.lr * (a * c + fraction * b * (1 - c)) if module in table else \
                cfg.lr * (c + fraction * (1 - c))
            np.testing.assert_allclose(np.asarray(value), -expected, rtol=1e-5,
                                       err_msg=f"{jax.tree_util.keystr(key_path)}, t={t}")


# -------------------------------------------------------------- init_grad's start point


@pytest.mark.slow
@pytest.mark.parametrize("method, extra, start", [
    ("init_grad", {}, "model"), ("init_grad", {"init_grad_train_init": "paper"}, "paper"),
    ("uniform", {"fan_in_start": True}, "paper")])
def test_where_init_grad_and_its_control_start(corpus, tmp_path, data, method, extra, start):
    """GPT-2 on Muon: init_grad's first logged loss is the model's own init's by default and
    with "paper" the paper-initialised model's (fan-in N(0, 1/f_in), tied embedding
    (1 + sqrt(1/f_in)) / 2); so is uniform's with fan_in_start (the same weights for the
    same seed)."""
    cfg = micro(corpus, tmp_path / "run", "gpt2", method=method, optimizer="muon",
                steps=2, **extra)
    result = loop.train(cfg, data=data)
    first = result["train"][0]["loss"]
    assert math.isfinite(result["train"][1]["loss"]) and math.isfinite(
        result["final"]["val_loss"])

    model = loop.build_model(cfg, data.vocab_size)
    batch = next(data.train_iter())
    own = numpy_cross_entropy(forward(model, batch["inputs"])[0], batch["targets"])
    params = nnx.state(model, nnx.Param)
    # The measurement's documented key (train.optimizers.measure_init_grad).
    key = jax.random.fold_in(jax.random.key(cfg.seed), 0x1A17)
    nnx.update(model, llr_optax.fan_in_init(params, key, rule="paper"))
    paper = numpy_cross_entropy(forward(model, batch["inputs"])[0], batch["targets"])
    assert abs(own - paper) > 0.05
    assert first == pytest.approx(paper if start == "paper" else own, rel=1e-5)


# --------------------------------------------------------------- --multipliers errors


def test_table_keys_are_the_library_labels_and_groups():
    assert set(multipliers_lib.TABLE_KEYS) == set(llr_optax.LABELS) | set(
        llr_optax.LABEL_GROUPS)


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"multipliers": {"embed": [1, 1]}}', "missing: final_fraction"),
    ('{"multipliers": {"ffn": [1, 1]}, "final_fraction": 0.1}', "unknown module 'ffn'"),
    ('{"multipliers": {"embed": [1, -1]}, "final_fraction": 0.1}', "two positive finite"),
    ('{"multipliers": {"embed": [1]}, "final_fraction": 0.1}', "must be [start, end]"),
    ('{"multipliers": {}, "final_fraction": 0.1}', "non-empty object"),
    ('{"multipliers": {"embed": [1, 1]}, "final_fraction": 1.5}', "in (0, 1]"),
    ('{"multipliers": {"embed": [1, 1]}, "final_fraction": 0.1, "lr": "fast"}',
     '"lr" must be a positive finite number'),
    ('{"multipliers": {"embed": [1, 1]}, "final_fraction": 0.1, "beta": 1}',
     "unknown: beta"),
])
def test_bad_multipliers_files_are_one_line_errors(content, message, tmp_path, capsys):
    path = tmp_path / "table.json"
    path.write_text(content)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--method", "relative", "--multipliers", str(path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_multipliers_need_relative_and_a_readable_file(tmp_path, capsys):
    path = tmp_path / "table.json"
    path.write_text('{"multipliers": {"embed": [1, 1]}, "final_fraction": 0.1}')
    for argv, message in ((["--method", "uniform", "--multipliers", str(path)],
                           "apply to --method relative only"),
                          (["--method", "relative", "--multipliers", str(tmp_path / "no")],
                           "cannot be read")):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
