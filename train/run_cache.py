"""One training run per configuration, kept on disk: the cache behind ``python -m train.results``.

A run is named by what determines its numbers (:func:`config_key`: every ``TrainConfig``
field except where it is written and how it is displayed), so asking for the same
configuration twice trains once. Layout under the cache root::

    <name>/                 the run directory (metrics.jsonl, checkpoints/, train.log)
    <name>.json             its outcome: status, config, wall and CPU seconds, device
                            and package versions
    <name>.lock             locked while a process trains it (the run directory holds
                            nothing but the trainer's own files)
    requests/<name>.json    the config handed to ``python -m train --config``

Given a ledger (:mod:`train.run_ledger`, a folder meant for git), the cache copies every done
run it looks up into it and reads from it the runs it lacks, so that its results outlive it.

Each run is a child process (``python -m train --config ... --resume``), so a crash or a
leak in one run cannot take the others with it, and an interrupted run continues from its
last checkpoint when asked for again. Only finished and diverged runs count as done; a
diverged run is a result (that LR is too high), not an error.

Several processes may share one cache (``python -m train.results`` started twice, or on
two machines over a shared file system that supports ``flock``): a run being trained
holds an exclusive lock on ``<name>.lock``, so the others see it as busy and never train
it twice. The child process holds the lock too, and the OS drops it when both are gone,
so a killed worker leaves no stale lock. A SIGTERM to a worker is passed on to its run,
which saves a checkpoint and stops (recorded as interrupted); a worker killed outright
(SIGKILL) leaves its run training on to the end, holding the lock, and the next worker
that asks for it records it from its final checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from train import run_ledger
from train.config import METHOD_ONLY_FIELDS, TrainConfig
from train.metrics_log import read_metrics

# Fields that change where a run is written or how it is shown, not its numbers. The
# evaluation cadence (eval_every, eval_batches) and log_every DO count: they decide which
# points of the curves exist.
_NOT_IN_KEY = frozenset({"out_dir", "progress", "compilation_cache_dir", "checkpoint_every",
                         "keep_checkpoints", "tensorboard", "profile", "peak_tflops", "mesh"})
# Cached runs keep their names when fields are added or defaults move. A field added
# later is left out of the key at its default (its value then, in effect). A field that
# acts on one method only (config.METHOD_ONLY_FIELDS) is keyed, for every other method,
# at the value the first cached runs had, whatever it is: there it changes nothing.
_ADDED_LATER = {"fan_in_start": False}
_KEYED_AS_FOR_OTHER_METHODS = {"init_grad_train_init": "paper"}
FINISHED, DIVERGED = "finished", "diverged"
# python -m train's exit statuses (train/__main__.py); 1 is also a crash's.
_EXIT_FINISHED, _EXIT_DIVERGED, _EXIT_SIGNAL, _EXIT_INTERRUPTED = 0, 1, 3, 130


class RunInterrupted(RuntimeError):
    """A run was stopped by a signal (its checkpoint is kept: asking again resumes it)."""


class RunFailed(RuntimeError):
    """A run ended with an error that is not divergence (bad config, crash)."""


class RunBusy(RuntimeError):
    """Another process is training this run now."""


@contextlib.contextmanager
def _exclusive(path: Path):
    """Yields the open lock file if no other process holds its lock, else ``None``."""
    with path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        try:
            yield f
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def config_key(cfg: TrainConfig) -> str:
    """12 hex digits naming everything that determines the run's numbers."""
    values = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_IN_KEY
              and not (k in _ADDED_LATER and v == _ADDED_LATER[k])}
    for field, keyed_as in _KEYED_AS_FOR_OTHER_METHODS.items():
        if cfg.method != METHOD_ONLY_FIELDS[field]:
            values[field] = keyed_as
    text = json.dumps(values, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_name(cfg: TrainConfig) -> str:
    """A readable, unique directory name: optimizer, method, schedule, lr, seed, key."""
    return (f"{cfg.optimizer}-{cfg.method}-{cfg.schedule}-lr{cfg.lr:.4g}-seed{cfg.seed}-"
            f"{config_key(cfg)}")


@dataclasses.dataclass
class RunRecord:
    """A done run as the report needs it.

    Attributes:
      config: The run's ``TrainConfig`` as a dict.
      status: ``"finished"`` or ``"diverged"``.
      evals: ``(step, tokens seen, validation loss)`` of every evaluation, in order.
      wall_seconds: The child process's wall time (start-up and compiling included).
      cpu_seconds: Its user + system CPU time.
      directory: The run directory in the cache (absent if the run came from the ledger).
      device: What it ran on (e.g. ``"CPU (2 cores, AMD EPYC, family 26 model 2, AVX-512)"``,
        ``"1 x NVIDIA H200"``).
      software: The versions it ran with (:func:`software_versions`); ``""`` for runs
        recorded before runs kept them.
      metrics: Its ``metrics.jsonl`` records (the ledger keeps the kinds the page reads).
    """

    config: dict[str, Any]
    status: str
    evals: list[tuple[int, int, float]]
    wall_seconds: float
    cpu_seconds: float
    directory: Path
    device: str = ""
    software: str = ""
    metrics: list[dict] = dataclasses.field(default_factory=list)

    @property
    def final_loss(self) -> float | None:
        """The validation loss at the last step (``None`` if diverged)."""
        if self.status != FINISHED or not self.evals:
            return None
        step, _, loss = self.evals[-1]
        return loss if step == self.config["steps"] else None

    def records(self, kind: str) -> list[dict]:
        """The run's ``metrics.jsonl`` records of one kind (e.g. ``"scale"``)."""
        return [r for r in self.metrics if r["kind"] == kind]


def tokens_per_step(config: dict[str, Any]) -> int:
    return int(config["batch_size"]) * int(config["seq_len"]) * int(config.get("accumulate", 1))


def device_name() -> str:
    """The first JAX device of this machine, in words (the child trains on the same one)."""
    import jax  # pylint: disable=import-outside-toplevel

    device = jax.devices()[0]
    if device.platform == "cpu":
        model = _cpu_model()
        return f"CPU ({os.cpu_count()} cores{', ' + model if model else ''})"
    return f"{jax.device_count()} x {device.device_kind}"


def _cpu_model() -> str:
    """This machine's processor (:func:`describe_cpu` of /proc/cpuinfo on Linux), else ``""``."""
    try:
        return describe_cpu(Path("/proc/cpuinfo").read_text(encoding="utf-8"))
    except OSError:
        return ""


# Widest first: the vector instruction sets XLA's CPU backend may compile for.
_VECTOR_ISAS = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"))


def describe_cpu(cpuinfo: str) -> str:
    """``"AMD EPYC, family 26 model 2, AVX-512"`` from the text of /proc/cpuinfo.

    The model name alone is not enough: a virtual machine may report only "AMD EPYC" for
    several generations, and XLA compiles for the host's widest vector instruction set, which
    changes how sums are split (on an AMD family 26 machine, capping XLA at AVX2 moves a Muon
    run's training loss in its 7th digit by step 20), so runs on two such CPUs can differ.
    """
    fields: dict[str, str] = {}
    for line in cpuinfo.split("\n\n")[0].splitlines():   # the first processor's block
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), " ".join(value.split()))
    parts = [fields.get("model name", "")]
    if "cpu family" in fields and "model" in fields:
        parts.append(f"family {fields['cpu family']} model {fields['model']}")
    flags = set(fields.get("flags", "").split())
    parts.append(next((name for flag, name in _VECTOR_ISAS if flag in flags), ""))
    return ", ".join(part for part in parts if part)


# The packages whose versions decide a run's numbers: two runs of one config on one kind of
# machine agree bit for bit only under the same versions (XLA's kernels change between
# jaxlib releases), so a retrained run that differs from its ledger entry can be told apart
# from a change in our code.
SOFTWARE = ("jax", "jaxlib", "flax", "optax", "numpy")


def software_versions() -> str:
    """``"jax 0.10.2, jaxlib 0.10.2, ..."``: the installed versions of :data:`SOFTWARE`
    (the child trains with this interpreter, so with these)."""
    from importlib import metadata  # pylint: disable=import-outside-toplevel

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "absent"

    return ", ".join(f"{name} {version(name)}" for name in SOFTWARE)


Launcher = Callable[[Path, Path], int]


def subprocess_launcher(request: Path, log: Path) -> int:
    """Runs ``python -m train --config request --resume`` with its output in ``log``."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    with log.open("a", encoding="utf-8") as out:
        # close_fds=False passes only the descriptors marked inheritable: the run's lock
        # (RunCache.run), so that the child keeps holding it if this process is killed.
        return run_passing_sigterm(
            [sys.executable, "-m", "train", "--config", str(request), "--resume",
             "--no-progress"], cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
            close_fds=False)


def run_passing_sigterm(argv: list[str], **popen_kwargs: Any) -> int:
    """Runs ``argv`` to its end and returns its exit status; a SIGTERM this process gets
    meanwhile is passed on to it (from the main thread, where Python delivers signals).

    Without this, stopping a worker with ``kill`` (SIGTERM's default action) would leave
    its run training on, orphaned, and no outcome written; passed on, the trainer saves
    a checkpoint and exits, and the worker records the run as interrupted.
    """
    proc = subprocess.Popen(argv, **popen_kwargs)
    if threading.current_thread() is not threading.main_thread():
        return proc.wait()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


class RunCache:
    """Runs keyed by configuration under ``root``.

    Args:
      root: The cache directory (keep it outside a git checkout: every run keeps its
        metrics and its checkpoints there, ~7 MB per checkpoint of a ``tiny`` run).
      launcher: ``(request file, log file) -> exit status`` (tests pass a fake one).
      ledger: A :mod:`train.run_ledger` folder, or ``None``. Every done run the cache
        looks up is copied into it, and a run the cache lacks is read from it (a done run
        there is never trained again).
    """

    def __init__(self, root: str | os.PathLike, launcher: Launcher = subprocess_launcher,
                 ledger: str | os.PathLike | None = None):
        self.root = Path(root)
        self.launcher = launcher
        self.ledger = None if ledger is None else Path(ledger)

    def paths(self, cfg: TrainConfig) -> tuple[Path, Path, Path]:
        """``(run directory, outcome file, request file)`` of ``cfg``."""
        name = run_name(cfg)
        return self.root / name, self.root / f"{name}.json", self.root / "requests" / f"{name}.json"

    def lookup(self, cfg: TrainConfig) -> RunRecord | None:
        """The done run of ``cfg`` (from the cache, else the ledger), or ``None`` if it was
        never run or did not finish."""
        directory, outcome, _ = self.paths(cfg)
        name = directory.name
        info = json.loads(outcome.read_text(encoding="utf-8")) if outcome.is_file() else {}
        if info.get("status") in (FINISHED, DIVERGED):
            metrics = read_metrics(directory / "metrics.jsonl")
            if self.ledger is not None:
                run_ledger.keep(self.ledger, name, info, metrics)
        elif self.ledger is not None and (kept := run_ledger.read(self.ledger, name)):
            info, metrics = kept
        else:
            return None
        per_step = tokens_per_step(info["config"])
        evals = [(int(r["step"]), int(r["step"]) * per_step, float(r["val_loss"]))
                 for r in metrics if r["kind"] == "eval" and r.get("val_loss") is not None]
        return RunRecord(config=info["config"], status=info["status"], evals=evals,
                         wall_seconds=info["wall_seconds"], cpu_seconds=info["cpu_seconds"],
                         directory=directory, device=info.get("device", ""),
                         software=info.get("software", ""), metrics=metrics)

    def lock_path(self, cfg: TrainConfig) -> Path:
        """The file a process training ``cfg`` holds locked."""
        return self.root / f"{run_name(cfg)}.lock"

    def busy(self, cfg: TrainConfig) -> bool:
        """Whether another process is training ``cfg`` now."""
        lock = self.lock_path(cfg)
        if not lock.is_file():
            return False
        with _exclusive(lock) as held:
            return held is None

    def run(self, cfg: TrainConfig) -> RunRecord:
        """Trains ``cfg`` (resuming a run of it that was interrupted) and records the outcome.

        Raises:
          RunBusy: Another process is training it now (nothing was done).
          RunInterrupted: The child was stopped by SIGTERM/SIGINT (resumable).
          RunFailed: It exited with any other error; the message ends with its log's tail.
        """
        lock_path = self.lock_path(cfg)
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(lock_path) as lock:
            if lock is None:
                raise RunBusy(f"{lock_path.stem} is being trained by another process")
            done = self.lookup(cfg)   # another process may have finished it meanwhile
            if done is not None:
                return done
            os.set_inheritable(lock.fileno(), True)
            return self._run_locked(cfg)

    def _run_locked(self, cfg: TrainConfig) -> RunRecord:
        directory, outcome, request = self.paths(cfg)
        cfg = cfg.replace(out_dir=str(directory), progress=False)
        directory.mkdir(parents=True, exist_ok=True)
        request.parent.mkdir(parents=True, exist_ok=True)
        request.write_text(json.dumps(cfg.to_dict(), indent=1) + "\n", encoding="utf-8")
        log = directory / "train.log"
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        code = self.launcher(request, log)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        # A resumed run adds to the time of the attempts before it.
        previous = json.loads(outcome.read_text()) if outcome.is_file() else {}
        info = {"config": cfg.to_dict(), "returncode": code,
                "wall_seconds": wall + previous.get("wall_seconds", 0.0),
                "cpu_seconds": cpu + previous.get("cpu_seconds", 0.0),
                "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), "device": device_name(),
                "software": software_versions()}
        # Exit status 1 is also Python's for a crash: divergence is the one with a record.
        diverged = code == _EXIT_DIVERGED and any(
            r["kind"] == "diverged" for r in read_metrics(directory / "metrics.jsonl"))
        if code == _EXIT_FINISHED:
            info["status"] = FINISHED
        elif diverged:
            info["status"] = DIVERGED
        elif code in (_EXIT_SIGNAL, _EXIT_INTERRUPTED) or code < 0:
            info["status"] = "interrupted"
        else:
            info["status"] = "failed"
        tmp = outcome.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        tmp.replace(outcome)
        if info["status"] == "interrupted":
            raise RunInterrupted(f"{directory.name}: stopped (exit status {code}); asking for "
                                 "it again resumes from its last checkpoint")
        if info["status"] == "failed":
            tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
            raise RunFailed(f"{directory.name}: python -m train exited with {code}: "
                            + " | ".join(tail))
        record = self.lookup(cfg)
        assert record is not None
        return record
