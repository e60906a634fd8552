"""train.run_cache: runs keyed by configuration, outcomes, resumption; one real child run."""

import gzip
import hashlib
import json
import math
import os
from importlib import metadata
from pathlib import Path

import numpy as np

import pytest

from train import run_cache, run_ledger
from train.config import TrainConfig
from train.run_cache import RunCache, RunFailed, RunInterrupted


def cfg(**overrides):
    return TrainConfig(**{"steps": 4, "eval_every": 2, **overrides})


def test_key_names_what_determines_the_numbers():
    base = cfg()
    key = run_cache.config_key(base)
    for changed in (dict(lr=1e-2), dict(seed=1), dict(eval_every=1), dict(eval_batches=2),
                    dict(schedule="wsd"), dict(method="alpha_hill")):
        assert run_cache.config_key(base.replace(**changed)) != key, changed
    for same in (dict(out_dir="elsewhere"), dict(progress=False), dict(checkpoint_every=1),
                 dict(compilation_cache_dir="/tmp/x"), dict(keep_checkpoints=5)):
        assert run_cache.config_key(base.replace(**same)) == key, same
    assert run_cache.run_name(base).startswith("adamw-uniform-cosine-lr0.003-seed0-")


def _key_as_first_cached(config, **keyed_as) -> str:
    """The key computed in the test: every field in the key but fan_in_start (added later),
    with ``keyed_as`` replacing values."""
    values = {k: v for k, v in config.to_dict().items()
              if k not in run_cache._NOT_IN_KEY and k != "fan_in_start"}
    values.update(keyed_as)
    text = json.dumps(values, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def test_a_field_added_later_keeps_old_keys_at_its_default():
    """fan_in_start came after the grid's first runs: at False the key is the one computed
    without it (so cached runs are found); True is a different run."""
    base = cfg(method="alpha_hill")
    before = _key_as_first_cached(base, init_grad_train_init="paper")   # see the next test
    assert run_cache.config_key(base) == before
    assert run_cache.config_key(base.replace(fan_in_start=True)) != before


def test_init_grad_train_init_names_init_grad_runs_only():
    """Its default moved from "paper" to "model" after the grid's first runs: other methods
    are keyed with "paper" whatever it is (it does nothing there), init_grad with its own."""
    other, init_grad = cfg(method="alpha_hill"), cfg(method="init_grad")
    before = _key_as_first_cached(other, init_grad_train_init="paper")
    assert other.init_grad_train_init == "model" and run_cache.config_key(other) == before
    assert run_cache.config_key(other.replace(init_grad_train_init="paper")) == before
    assert run_cache.config_key(init_grad) == _key_as_first_cached(init_grad)
    assert run_cache.config_key(init_grad) != run_cache.config_key(
        init_grad.replace(init_grad_train_init="paper"))


class FakeLauncher:
    """Writes what python -m train would (metrics.jsonl) and returns a chosen status."""

    def __init__(self, codes, diverge=False):
        self.codes, self.diverge, self.calls = list(codes), diverge, 0

    def __call__(self, request: Path, log: Path) -> int:
        self.calls += 1
        config = json.loads(request.read_text())
        out = Path(config["out_dir"])
        records = [{"kind": "eval", "step": s, "val_loss": 3.0 - 0.1 * s}
                   for s in range(2, config["steps"] + 1, 2)]
        if self.diverge:
            records = records[:1] + [{"kind": "diverged", "step": 3, "loss": "nan"}]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        log.write_text("line one\nTraceback: boom\n")
        return self.codes.pop(0)


def test_finished_run_is_recorded_and_read_back_without_rerunning(tmp_path):
    launcher = FakeLauncher([0])
    cache = RunCache(tmp_path, launcher)
    assert cache.lookup(cfg()) is None
    record = cache.run(cfg())
    assert record.status == "finished" and record.final_loss == pytest.approx(2.6)
    tokens = 16 * 128
    assert record.evals == [(2, 2 * tokens, 2.8), (4, 4 * tokens, pytest.approx(2.6))]
    again = cache.lookup(cfg(out_dir="anywhere"))
    assert again.evals == record.evals and launcher.calls == 1
    assert again.cpu_seconds >= 0 and again.wall_seconds > 0


def test_divergence_is_a_result_but_a_crash_is_an_error(tmp_path):
    cache = RunCache(tmp_path, FakeLauncher([1], diverge=True))
    record = cache.run(cfg(lr=10.0))
    assert record.status == "diverged" and record.final_loss is None
    crash = RunCache(tmp_path, FakeLauncher([1]))
    with pytest.raises(RunFailed, match="exited with 1: line one | Traceback: boom"):
        crash.run(cfg(lr=20.0))
    assert crash.lookup(cfg(lr=20.0)) is None


def test_interrupted_run_is_not_done_and_its_time_adds_to_the_retry(tmp_path):
    launcher = FakeLauncher([3, 0])
    cache = RunCache(tmp_path, launcher)
    with pytest.raises(RunInterrupted, match="resumes"):
        cache.run(cfg())
    _, outcome, _ = cache.paths(cfg())
    first = json.loads(outcome.read_text())
    assert first["status"] == "interrupted" and cache.lookup(cfg()) is None
    record = cache.run(cfg())
    assert record.status == "finished" and record.wall_seconds > first["wall_seconds"]


def test_ledger_keeps_what_the_page_reads_and_a_fresh_cache_trains_nothing_it_has(tmp_path):
    launcher = FakeLauncher([0, 3])
    ledger = tmp_path / "ledger"
    cache = RunCache(tmp_path / "a", launcher, ledger)
    record = cache.run(cfg())
    directory, _, _ = cache.paths(cfg())
    with (directory / "metrics.jsonl").open("a") as f:   # a kind the ledger leaves out
        f.write(json.dumps({"kind": "train", "step": 4, "loss": 2.5}) + "\n")
    with pytest.raises(RunInterrupted):
        cache.run(cfg(seed=1))
    entries = sorted(p.name for p in ledger.iterdir())
    assert entries == [run_cache.run_name(cfg()) + ".json.gz"]   # not the interrupted run
    text = gzip.decompress((ledger / entries[0]).read_bytes()).decode()
    assert len(text.splitlines()) == 2 + 2 + 1   # outcome, "records", 2 evals, the end
    entry = json.loads(text)
    assert [r["kind"] for r in entry["records"]] == ["eval", "eval"]
    assert entry["outcome"]["status"] == "finished" and "returncode" not in entry["outcome"]

    fresh = RunCache(tmp_path / "b", FakeLauncher([]), ledger)   # another machine
    again = fresh.run(cfg(out_dir="elsewhere"))
    assert fresh.launcher.calls == 0 and not (tmp_path / "b" / directory.name).exists()
    assert (again.evals, again.status, again.config) == (record.evals, "finished",
                                                         record.config)
    assert (again.wall_seconds, again.cpu_seconds) == (record.wall_seconds, record.cpu_seconds)
    assert again.records("eval") == record.records("eval") and again.records("train") == []
    assert RunCache(tmp_path / "b", FakeLauncher([])).lookup(cfg()) is None   # no ledger


def test_describe_cpu_names_model_family_and_widest_vector_isa():
    # Two processors as a 2-core VM reports them: only the first block is read.
    text = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
            "model name\t: AMD  EPYC\nflags\t\t: fpu sse2 avx avx2 avx512f avx512bw\n\n"
            "processor\t: 1\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: other\n"
            "flags\t\t: avx\n")
    assert run_cache.describe_cpu(text) == "AMD EPYC, family 26 model 2, AVX-512"
    no_avx512 = text.replace(" avx512f avx512bw", "")
    assert run_cache.describe_cpu(no_avx512) == "AMD EPYC, family 26 model 2, AVX2"
    # An ARM machine's cpuinfo has none of these fields: nothing rather than a guess.
    assert run_cache.describe_cpu("processor\t: 0\nFeatures\t: fp asimd\nCPU part\t: 0xd0c\n") == ""


def test_a_run_records_its_package_versions_and_machine_and_the_ledger_keeps_them(tmp_path):
    ledger = tmp_path / "ledger"
    record = RunCache(tmp_path / "a", FakeLauncher([0]), ledger).run(cfg())
    # Read independently of run_cache: what pip installed, and the CPU Linux reports.
    installed = {name: metadata.version(name) for name in ("jax", "jaxlib", "flax", "optax")}
    assert record.software == (
        f"jax {installed['jax']}, jaxlib {installed['jaxlib']}, flax {installed['flax']}, "
        f"optax {installed['optax']}, numpy {np.__version__}")
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = run_cache.describe_cpu(cpuinfo.read_text())
        assert record.device == f"CPU ({os.cpu_count()} cores{', ' + cpu if cpu else ''})"
    again = RunCache(tmp_path / "b", FakeLauncher([]), ledger).lookup(cfg())
    assert (again.software, again.device) == (record.software, record.device)

    # An entry kept before runs recorded versions reads back as "" (not an error).
    name = run_cache.run_name(cfg(seed=5))
    outcome = {"config": cfg(seed=5).to_dict(), "status": "finished", "wall_seconds": 1.0,
               "cpu_seconds": 1.0, "finished_at": "2026-11-30 10:00:00", "device": "CPU (2 cores)"}
    run_ledger.keep(ledger, name, outcome, [{"kind": "eval", "step": 4, "val_loss": 2.5}])
    old = RunCache(tmp_path / "c", FakeLauncher([]), ledger).lookup(cfg(seed=5))
    assert (old.software, old.device, old.final_loss) == ("", "CPU (2 cores)", 2.5)


def test_a_real_child_run_through_python_m_train(tmp_path):
    """The request file, the CLI and the metrics: a 4-step micro model in a child process."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i}: " + "the quick brown fox jumps. " * 40
                                  for i in range(60)))
    config = cfg(data=str(corpus), seq_len=16, batch_size=2, val_batch_size=2, eval_batches=2,
                 model_overrides={"num_layers": 1, "hidden": 16, "intermediate": 32,
                                  "num_heads": 2}, checkpoint_every=0, log_every=1,
                 warmup_fraction=0.0)
    cache = RunCache(tmp_path / "cache")
    record = cache.run(config)
    assert record.status == "finished", (record.directory / "train.log").read_text()[-2000:]
    assert [s for s, _, _ in record.evals] == [2, 4]
    assert all(math.isfinite(l) for _, _, l in record.evals)
    assert record.config["out_dir"] == str(record.directory)
    assert cache.lookup(config) is not None
