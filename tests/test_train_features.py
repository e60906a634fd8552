"""Trainer features: gradient accumulation, bfloat16, metrics as JSON, TensorBoard, log lines,
MFU, profiling. Micro model (tests/_micro.py); each loop run compiles one small step."""

from __future__ import annotations

import json
import math
import re
import struct

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import llr_optax
from models import llama_config, param_count
from tests._micro import MICRO, micro_config, write_corpus
from train import loop, optimizers
from train.config import TrainConfig
from train.metrics_log import MetricsLog, read_metrics


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data") / "corpus.txt")


def _saved_params(out_dir) -> dict:
    mngr = ocp.CheckpointManager(f"{out_dir}/checkpoints")
    restored = mngr.restore(mngr.latest_step(),
                            args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    mngr.close()
    return restored.state["params"]


# ------------------------------------------------------------------------ accumulation


def _llr_counts(opt_state) -> list[int]:
    """The update counters of the llr_optax states inside an optax state."""
    types = (llr_optax.ScaleByAlphaHillState, llr_optax.RelativeScheduleState)
    nodes = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, types))
    return [int(n.count) for n in nodes if isinstance(n, types)]


@pytest.mark.parametrize("method", ["alpha_hill", "relative"])
@pytest.mark.parametrize("pass_apply", [True, False])
def test_accumulation_counts_real_updates(method, pass_apply):
    # Params with HF key paths (so the layer labels apply) and fixed random "gradients";
    # 2 micro-steps of gradients g1, g2 must give the update of one step on (g1 + g2) / 2.
    rng = np.random.default_rng(0)
    shapes = {"lm_head": {"kernel": (12, 20)},
              "model": {"layers": {"0": {"mlp": {"up_proj": {"kernel": (12, 24)}},
                                         "self_attn": {"q_proj": {"kernel": (12, 12)}}}}}}
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                          is_leaf=lambda x: isinstance(x, tuple))
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32),
                          params) for _ in range(12)]
    cfg = TrainConfig(method=method, steps=6, lr=1e-2, warmup_fraction=0.2, interval=2,
                      ramp_steps=1, active_fraction=1.0, min_eigenvalues=4)
    plain = optimizers.build_optimizer(cfg)
    accumulated = optimizers.build_optimizer(cfg.replace(accumulate=2))
    p_plain, s_plain = params, plain.init(params)
    p_acc, s_acc = params, accumulated.init(params)
    update_plain, update_acc = jax.jit(plain.update), jax.jit(accumulated.update)
    for update in range(6):
        for micro in range(2):
            extra = {"apply": s_acc.mini_step == 1} if pass_apply else {}
            u, s_acc = update_acc(grads[2 * update + micro], s_acc, p_acc, **extra)
            p_acc = optax.apply_updates(p_acc, u)
            # The counters advance on the second micro-step only: real updates.
            assert _llr_counts(s_acc) == [update + micro]
        mean = jax.tree.map(lambda a, b: (a + b) / 2, grads[2 * update], grads[2 * update + 1])
        u, s_plain = update_plain(mean, s_plain, p_plain)
        p_plain = optax.apply_updates(p_plain, u)
        assert _llr_counts(s_plain) == [update + 1]
        # Same factors as the unaccumulated run at the same update count, same params.
        for a, b in zip(jax.tree.leaves(llr_optax.current_scales(s_acc)),
                        jax.tree.leaves(llr_optax.current_scales(s_plain))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)
        for a, b in zip(jax.tree.leaves(p_acc), jax.tree.leaves(p_plain)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    moved = [float(np.max(np.abs(x - 1))) for x in
             jax.tree.leaves(llr_optax.current_scales(s_plain))]
    assert max(moved) > 0.01, "the factors should have moved away from 1"


@pytest.mark.slow
def test_accumulated_run_matches_the_larger_batch(corpus, tmp_path):
    # The training windows are shuffled before batching, so two micro-batches of 2
    # are exactly the rows of one batch of 4: the same trajectory up to float rounding.
    base = micro_config(corpus, tmp_path / "big", method="alpha_hill", steps=4,
                        batch_size=4, checkpoint_every=0)
    big = loop.train(base)
    acc = loop.train(base.replace(batch_size=2, accumulate=2, out_dir=str(tmp_path / "acc")))
    np.testing.assert_allclose([r["loss"] for r in acc["train"]],
                               [r["loss"] for r in big["train"]], rtol=2e-6)
    np.testing.assert_allclose([r["grad_norm"] for r in acc["train"]],
                               [r["grad_norm"] for r in big["train"]], rtol=2e-5)
    assert [r["step"] for r in acc["alphas"]] == [0, 2]
    for a, b in zip(acc["alphas"], big["alphas"]):
        for k, v in b["alpha"].items():
            assert (v is None) == (a["alpha"][k] is None)
            if v is not None:
                assert a["alpha"][k] == pytest.approx(v, rel=1e-4), k
    # Adam divides by sqrt(v): a weight whose gradient is rounding noise can move by up to
    # ~lr (1e-2) either way, so rounding alone moves a rare element further than the rest
    # (one of 2048 by 6.4e-5 on jax 0.11.2; none past 2e-5 on 0.10.2). A wrong average of
    # the micro-batches would move most elements by ~lr.
    for a, b in zip(jax.tree.leaves(_saved_params(tmp_path / "acc")),
                    jax.tree.leaves(_saved_params(tmp_path / "big"))):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-4)
        assert np.mean(np.abs(a - b) > 2e-5) < 0.01
    # A larger batch per update: half the updates of the same tokens would differ.
    assert acc["train"][-1]["loss"] < acc["train"][0]["loss"]


# ------------------------------------------------------------------------------ bf16


def test_bfloat16_computes_in_bf16_and_keeps_float32_state(corpus, tmp_path):
    cfg = micro_config(corpus, tmp_path / "bf16", dtype="bfloat16", steps=3)
    model = loop.build_model(cfg, 257)
    assert model.config.dtype == jnp.bfloat16
    assert {x.dtype for x in jax.tree.leaves(model)} == {jnp.dtype(jnp.float32)}
    tokens = jnp.zeros((2, 8), jnp.int32)
    assert model.model.embed_tokens(tokens).dtype == jnp.bfloat16
    hlo = jax.jit(lambda t: model(t)).lower(tokens).as_text()
    assert re.search(r"dot_general.*bf16", hlo), "the matmuls should run in bf16"

    result = loop.train(cfg)
    f32 = loop.train(cfg.replace(dtype="float32", out_dir=str(tmp_path / "f32")))
    saved = _saved_params(tmp_path / "bf16")
    assert {np.asarray(x).dtype for x in jax.tree.leaves(saved)} == {np.dtype(np.float32)}
    losses = [r["loss"] for r in result["train"]]
    reference = [r["loss"] for r in f32["train"]]
    assert losses != reference  # computed differently...
    np.testing.assert_allclose(losses, reference, atol=0.05)  # ... to bf16 precision


# -------------------------------------------------------------- metrics file as JSON


def test_metrics_are_strict_json_and_a_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.write({"kind": "train", "step": 1, "loss": 2.5, "grad_norm": float("nan"),
               "scale": {"a": [1.0, float("inf")]}})
    log.close()

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))

    record = strict(path.read_text().splitlines()[0])
    assert record["grad_norm"] is None and record["scale"] == {"a": [1.0, None]}
    with path.open("a") as f:
        f.write('{"kind": "train", "step": 2, "lo')  # killed mid-write
    assert [r["step"] for r in read_metrics(path)] == [1]
    path.write_text('{"kind": "x", "step": 1}\nnot json\n{"kind": "x", "step": 3}\n')
    with pytest.raises(ValueError, match=r"line 2 is not valid JSON"):
        read_metrics(path)


# ----------------------------------------- log lines, MFU, TensorBoard, profile trace


def _events(directory) -> list:
    """All events of the TensorBoard files under ``directory`` (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(directory.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12:pos + 12 + length])
            events.append(event)
            pos += 12 + length + 4
    return events


def test_log_lines_mfu_tensorboard_and_profile(corpus, tmp_path, capsys):
    pytest.importorskip("tensorboardX")  # a test extra: installed in CI
    cfg = micro_config(corpus, tmp_path / "run", method="alpha_hill", steps=4,
                       log_every=2, eval_every=4, progress=True, tensorboard=True,
                       peak_tflops=1e-3, profile="1:2")
    result = loop.train(cfg)
    out = capsys.readouterr().out
    records = result["train"]

    # The data it trains on, first (corpus, tokenizer, sizes, content hash).
    assert re.match(r"corpus: .*; tokenizer: byte .*; data sha256 [0-9a-f]{12}$",
                    out.splitlines()[0])
    # Plain lines (stdout is not a terminal here, although progress=True).
    lines = [l for l in out.splitlines() if re.match(r"step \d+/4: loss", l)]
    assert [int(l.split()[1].split("/")[0]) for l in lines] == [2, 4]
    for line, record in zip(lines, records):
        assert f"loss {record['loss']:.4f}" in line and "tok/s" in line and "MFU" in line
    assert "step 4: val loss" in out
    assert "profile of updates 2-3 written" in out

    # MFU: the compiled step's FLOPs x steps/s over the peak given.
    flops = result["flops_per_step"]
    n = param_count(llama_config("tiny", 257, 32, **MICRO))
    model_flops = 6 * (n - 2 * 257 * 32) * 4 * 32  # 6 N T without embedding and head
    assert model_flops < flops < 3 * (model_flops + 6 * 2 * 257 * 32 * 4 * 32)
    for r in records:
        steps_per_sec = r["tokens_per_sec"] / (4 * 32)
        assert r["mfu"] == pytest.approx(flops * steps_per_sec / 1e9, rel=1e-9)

    # TensorBoard: the same numbers as metrics.jsonl, per-layer alphas and factors.
    scalars, histograms = {}, set()
    for event in _events(tmp_path / "run" / "tensorboard"):
        for v in event.summary.value:
            if v.HasField("histo"):
                histograms.add(v.tag)
            else:
                scalars.setdefault(v.tag, {})[event.step] = v.simple_value
    for r in records:
        assert scalars["train/loss"][r["step"]] == pytest.approx(r["loss"], rel=1e-6)
        assert scalars["train/lr"][r["step"]] == pytest.approx(r["lr"], rel=1e-6)
        assert scalars["train/tokens_per_sec"][r["step"]] == pytest.approx(
            r["tokens_per_sec"], rel=1e-6)
    assert scalars["eval/val_loss"][4] == pytest.approx(result["final"]["val_loss"], rel=1e-6)
    q = "model/layers/0/self_attn/q_proj/kernel"
    for a in result["alphas"]:
        assert scalars[f"alpha/{q}"][a["step"]] == pytest.approx(a["alpha"][q], rel=1e-6)
    assert f"factor/{q}" in scalars
    assert {"alpha_histogram", "factor_histogram"} <= histograms

    # The profiler wrote a trace.
    assert list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))
    assert math.isfinite(result["tokens_per_sec"])
