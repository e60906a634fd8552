"""Never lose work, never resume from something broken: signals (in child processes),
damaged checkpoints, the checkpoint fingerprint, user errors as one line with status 2."""

from __future__ import annotations

import gc
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from tests._micro import MICRO_FLAGS, micro_config, write_corpus
from train import __main__ as cli
from train import checkpoints, loop
from train.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data") / "corpus.txt")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "train", *MICRO_FLAGS, *args]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}


# -------------------------------------------------------------------------- signals


def _train_until_signal(argv: list[str], sig: int) -> tuple[int, str, str]:
    """Runs the CLI, sends ``sig`` once it has logged step 3, returns (status, out, err)."""
    proc = subprocess.Popen(argv, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines, deadline = [], time.monotonic() + 300
    try:
        for line in proc.stdout:  # the CLI flushes every log line
            lines.append(line)
            if line.startswith("step 3/"):
                proc.send_signal(sig)
                break
            assert time.monotonic() < deadline, "no training progress"
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, "".join(lines) + out, err


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_saves_and_resumes(sig, corpus, tmp_path):
    out, cache = tmp_path / "run", tmp_path / "xla_cache"
    argv = _cli("--data", corpus, "--out", str(out), "--steps", "100000", "--log-every", "1",
                "--eval-every", "100000", "--checkpoint-every", "0", "--no-progress",
                "--compilation-cache-dir", str(cache))
    status, stdout, stderr = _train_until_signal(argv, sig)
    assert status == cli.EXIT_SIGNAL, stderr[-3000:]
    assert "Traceback" not in stderr
    stopped = [l for l in stdout.splitlines() if l.startswith("stopped at step")]
    assert len(stopped) == 1, stdout[-2000:]
    step = int(stopped[0].split()[3].rstrip(";"))
    assert f"stopped at step {step}; continue with --resume" in stopped[0]
    assert signal.Signals(sig).name in stopped[0]
    assert step >= 3
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [step]
    train_steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert train_steps == list(range(1, step + 1))  # every finished step was logged
    assert list(cache.iterdir()), "the compilation cache should hold the compiled programs"
    if sig == signal.SIGTERM:  # one resume is enough
        resumed = subprocess.run(argv + ["--resume", "--stop-after", str(step + 2)], cwd=ROOT,
                                 env=_env(), capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"stopped at step {step + 2}; continue with --resume" in resumed.stdout
        records = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
        assert [r["step"] for r in records] == list(range(1, step + 3))


# -------------------------------------------------------------- damaged checkpoints


def _flip_bytes(path: Path, n: int = 400) -> None:
    data = bytearray(path.read_bytes())
    for i in random.Random(0).sample(range(len(data)), min(n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _largest_chunk(step_dir: Path) -> Path:
    chunks = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(chunks, key=lambda p: p.stat().st_size)


def _damage(kind: str, step_dir: Path) -> None:
    if kind == "flipped bytes":
        _flip_bytes(_largest_chunk(step_dir))
    elif kind == "truncated chunk":
        chunk = _largest_chunk(step_dir)
        chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    elif kind == "missing _METADATA":
        (step_dir / "state" / "_METADATA").unlink()
    elif kind == "missing item":
        shutil.rmtree(step_dir / "data")
    elif kind == "values changed":  # readable, but not what was written
        meta = step_dir / "checksum" / "metadata"
        values = json.loads(meta.read_text())
        name = sorted(values["leaves"])[0]
        values["leaves"][name] = "0" * 16
        meta.write_text(json.dumps(values))


@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory):
    """An 6-step alpha_hill run with checkpoints at 2, 4 and 6, and its final params."""
    root = tmp_path_factory.mktemp("reference")
    cfg = micro_config(corpus, root / "run", method="alpha_hill", steps=6,
                       checkpoint_every=2, keep_checkpoints=3)
    loop.train(cfg)
    return cfg, root / "run"


def _final_params(out: Path, step: int) -> list[np.ndarray]:
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager((out / "checkpoints").absolute())
    tree = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    mngr.close()
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree["params"])]


# Each resume damages the newest checkpoint(s) in one way each: (kind of step 6, kind of
# step 4 or None); two kinds per run keep the test quick and also check a double fallback.
DAMAGE = [("flipped bytes", "truncated chunk"), ("missing _METADATA", "missing item"),
          ("values changed", None)]


# A failed read can make orbax abandon other shard reads still in flight (timing decides;
# about half of these runs have some): their coroutines, closed by the garbage collector, and
# TensorStore callbacks that find orbax's event loop closed report "Exception ignored" through
# Python's unraisable hook. That is orbax's noise about a failure provoked here on purpose.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("kinds", DAMAGE, ids=lambda k: " + ".join(filter(None, k)))
def test_damaged_latest_checkpoints_fall_back(kinds, reference_run, tmp_path, capfd):
    cfg, reference = reference_run
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for step, kind in zip((6, 4), kinds):
        if kind:
            _damage(kind, out / "checkpoints" / str(step))
    damaged = [6, 4][:len(list(filter(None, kinds)))]
    result = loop.train(cfg.replace(out_dir=str(out)), resume=True)
    gc.collect()  # the abandoned coroutines report now, under this test's filter
    err = capfd.readouterr().err
    warnings = [l for l in err.splitlines() if "damaged" in l]
    assert len(warnings) == len(damaged), err[-3000:]
    for line, step in zip(warnings, damaged):
        assert line.startswith(f"warning: checkpoint {step} in ") and "falling back" in line
        assert (out / "damaged_checkpoints" / str(step)).is_dir()
    # Resumed from the newest intact checkpoint and recomputed the rest exactly.
    assert result["step"] == 6 and result["saved"] == 6
    for a, b in zip(_final_params(out, 6), _final_params(reference, 6)):
        np.testing.assert_array_equal(a, b)
    assert [r["step"] for r in result["train"]] == list(range(1, 7))


def test_no_intact_checkpoint_is_a_one_line_error(reference_run, tmp_path, capsys):
    cfg, reference = reference_run
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for step in (2, 4, 6):
        _damage("missing item", out / "checkpoints" / str(step))
    status = cli.main([*MICRO_FLAGS, "--method", "alpha_hill", "--data", cfg.data, "--out",
                       str(out), "--steps", "6", "--checkpoint-every", "2",
                       "--keep-checkpoints", "3", "--interval", "2", "--ramp-steps", "1",
                       "--active-fraction", "1", "--eval-every", "1000", "--log-every", "1",
                       "--init-grad-batches", "2",
                       "--no-progress", "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err[-1].startswith("error: no intact checkpoint in ") and "6, 4, 2" in err[-1]
    assert len([l for l in err if l.startswith("error")]) == 1
    assert len([l for l in err if "damaged" in l and l.startswith("warning")]) == 3


def _fmix32(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def test_fingerprint_matches_a_numpy_reference_and_sees_one_bit():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 11)).astype(np.float32)
    with np.errstate(over="ignore"):
        bits = x.view(np.uint32).ravel()
        index = np.arange(bits.size, dtype=np.uint32)
        expected = [np.sum(_fmix32(bits ^ _fmix32(index * np.uint32(0x9E3779B9)
                                                  + np.uint32(seed))), dtype=np.uint32)
                    for seed in (0x1234567, 0x7654321)]
    got = np.asarray(checkpoints._leaf_fingerprint(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.array(expected, np.uint32))
    flipped = x.copy()
    flipped.view(np.uint32)[5, 3] ^= np.uint32(1 << 7)  # one mantissa bit
    assert not np.array_equal(np.asarray(checkpoints._leaf_fingerprint(jnp.asarray(flipped))),
                              got)
    moved = x.copy()
    moved[0, 0], moved[0, 1] = x[0, 1], x[0, 0]  # same values, other places
    assert not np.array_equal(np.asarray(checkpoints._leaf_fingerprint(jnp.asarray(moved))), got)
    bf16 = np.asarray(checkpoints._leaf_fingerprint(jnp.asarray(x, jnp.bfloat16)))
    assert bf16.shape == (2,) and not np.array_equal(bf16, got)


# ------------------------------------------------------------------------ user errors


def _one_line_error(capsys, argv, message):
    try:
        status = cli.main(argv)
    except SystemExit as e:
        status = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2, (status, err)
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert message in err[0], err
    return err[0]


def test_user_errors_are_one_line_with_status_2(corpus, tmp_path, capsys):
    base = [*MICRO_FLAGS, "--data", corpus, "--steps", "2", "--no-progress"]
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    _one_line_error(capsys, base + ["--out", str(a_file)], "is a file, not a directory")
    _one_line_error(capsys, base + ["--mesh", "data=²"], "must be a positive integer, got '²'")
    _one_line_error(capsys, base + ["--stop-after", "0"], "--stop-after must be >= 1")
    _one_line_error(capsys, base + ["--profile", "3"], "expected START:N")

    unrelated = tmp_path / "project"
    unrelated.mkdir()
    (unrelated / "config.json").write_text('{"name": "my web app"}')
    _one_line_error(capsys, base + ["--out", str(unrelated), "--overwrite"],
                    "config.json that is not a training run's")
    assert (unrelated / "config.json").read_text() == '{"name": "my web app"}'
    (unrelated / "config.json").unlink()
    (unrelated / "notes.md").write_text("mine")
    _one_line_error(capsys, base + ["--out", str(unrelated)], "not a training run's (notes.md)")
    assert (unrelated / "notes.md").read_text() == "mine"

    if os.geteuid() == 0:  # root writes anywhere; /sys refuses even root
        read_only = Path("/sys/llr_optax_test_out")
    else:
        parent = tmp_path / "read_only"
        parent.mkdir()
        parent.chmod(0o555)
        read_only = parent / "run"
    _one_line_error(capsys, base + ["--out", str(read_only)], "cannot write to --out")
    _one_line_error(capsys, base + ["--out", str(tmp_path / "v"), "--val-fraction", "0"],
                    "is empty, but the trainer evaluates on it")


def test_stop_after_reached_claims_no_checkpoint(corpus, tmp_path, capsys):
    argv = [*MICRO_FLAGS, "--data", corpus, "--steps", "4", "--no-progress", "--log-every", "1",
            "--eval-every", "1000", "--out", str(tmp_path / "run")]
    assert cli.main(argv + ["--stop-after", "2"]) == 0
    assert "stopped at step 2; continue with --resume" in capsys.readouterr().out
    # Again with --resume: nothing to train, nothing saved, and it says so.
    assert cli.main(argv + ["--stop-after", "2", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "nothing to do" in out and "no checkpoint written" in out
    assert "checkpoint saved" not in out
    # A half-written last metrics line (a kill mid-write) does not block the resume.
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "st')
    assert cli.main(argv + ["--resume"]) == 0
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # every line complete again
