"""Several processes sharing one run cache: a run being trained is locked, the others leave it
alone, and python -m train.results started twice shares the grid (fake training, no JAX)."""

import fcntl
import subprocess
import sys

import pytest

from tests.test_results import FakeTrain, fake_loss
from train import config as config_lib
from train import results
from train import run_cache as run_cache_lib
from train.run_cache import RunBusy, RunCache


def _config(lr=3e-3, seed=0):
    return config_lib.from_preset("tiny", steps=60, eval_every=30, lr=lr, seed=seed)


class OtherProcess:
    """Holds a run's lock as another process would: flock conflicts between separate opens
    of the file, in one process as across processes."""

    def __init__(self, cache, cfg):
        path = cache.lock_path(cfg)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a")
        fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def release(self):
        self.file.close()


def test_a_run_another_process_trains_is_busy_and_not_trained_twice(tmp_path):
    fake = FakeTrain()
    cache, cfg = RunCache(tmp_path, fake), _config()
    assert not cache.busy(cfg)
    other = OtherProcess(cache, cfg)
    assert cache.busy(cfg)
    with pytest.raises(RunBusy, match="being trained by another process"):
        cache.run(cfg)
    assert fake.runs == []
    other.release()
    assert not cache.busy(cfg)
    record = cache.run(cfg)
    assert record.final_loss == pytest.approx(fake_loss(cfg.to_dict()))
    assert not cache.busy(cfg) and len(fake.runs) == 1   # the lock went with the run
    # Asked again (another process finished it while this one waited for the lock): read
    # back, not trained again.
    assert cache.run(cfg).final_loss == record.final_loss and len(fake.runs) == 1


def test_the_training_child_inherits_the_lock(tmp_path, monkeypatch):
    """The real launcher starts its child so that the child holds the run's lock as well
    (a killed parent must not free a run that is still training)."""
    real_run, seen = subprocess.run, {}   # the probe runs with the launcher's close_fds
    probe = ("import os\n"
             "def target(fd):\n"
             "    try:\n"
             "        return os.readlink(f'/proc/self/fd/{fd}')\n"
             "    except OSError:\n"
             "        return ''\n"
             "print(sorted(t.rsplit('/', 1)[-1] for t in map(target, os.listdir('/proc/self/fd'))"
             " if t.endswith('.lock')))\n")

    def child(argv, **kwargs):
        out = real_run([sys.executable, "-c", probe], capture_output=True, text=True,
                       check=True, close_fds=kwargs.get("close_fds", True))
        seen["locks"] = out.stdout.strip()
        request = argv[argv.index("--config") + 1]
        return FakeTrain()(run_cache_lib.Path(request), None)

    monkeypatch.setattr(run_cache_lib, "run_passing_sigterm", child)
    if not run_cache_lib.Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc (Linux)")
    record = RunCache(tmp_path).run(_config())
    assert seen["locks"] == f"['{run_cache_lib.run_name(_config())}.lock']"
    assert record.status == "finished"


def test_two_builders_share_the_grid_and_wait_for_each_other(tmp_path, monkeypatch, capsys):
    fake = FakeTrain()
    monkeypatch.setattr(results, "RunCache",
                        lambda root, ledger=None: RunCache(root, fake, ledger))
    cache = RunCache(tmp_path / "cache", fake)
    g = results.Grid("tiny", cache, seeds=3)
    # Another builder is training uniform's first rung.
    other = OtherProcess(cache, g.config(g.cell("adamw/uniform"), 7.5e-4, 0))
    waits = []

    def sleep(seconds):   # the other builder finishes while this one waits
        waits.append(seconds)
        other.release()

    monkeypatch.setattr(results.time, "sleep", sleep)
    argv = ["--runs", str(tmp_path / "cache"), "--report", str(tmp_path / "r.md"),
            "--cells", "adamw/uniform"]
    assert results.main(argv) == 0
    runs = [(lr, seed) for _, lr, seed in fake.runs]
    # The other rungs first, then (nothing else left) one wait, then the released rung
    # (its loss decides the best LR), then the seeds at the best, 3e-3.
    assert runs == [(1.5e-3, 0), (3e-3, 0), (6e-3, 0), (1.2e-2, 0), (7.5e-4, 0),
                    (3e-3, 1), (3e-3, 2)]
    assert len(waits) == 1
    out = capsys.readouterr().out
    assert out.count("waiting: what is left is being trained by another process") == 1
    assert "= adamw/uniform: complete (best lr 0.003)" in out


_CHILD = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: (print("child got SIGTERM", flush=True), sys.exit(75)))
print("ready", flush=True)
time.sleep(30)
"""
_WORKER = f"""
import sys
from train.run_cache import run_passing_sigterm
print("child exit", run_passing_sigterm([sys.executable, "-c", {_CHILD!r}]), flush=True)
"""


def test_sigterm_to_a_worker_reaches_its_run():
    # `kill <worker>` must stop the run it trains (which checkpoints on SIGTERM), not leave
    # it training on, orphaned, with no outcome recorded.
    worker = subprocess.Popen([sys.executable, "-c", _WORKER], stdout=subprocess.PIPE, text=True)
    assert worker.stdout.readline().strip() == "ready"
    worker.terminate()
    out, _ = worker.communicate(timeout=20)
    assert out.split("\n")[:2] == ["child got SIGTERM", "child exit 75"]
    assert worker.returncode == 0
