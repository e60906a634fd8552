"""The run directory (``--out``): what may be in it, and checks before anything is written.

A run directory holds only what a run writes (:data:`RUN_ENTRIES`) plus log files
(``*.log``, ``*.out``, ``*.err``, e.g. a scheduler's output redirected there). A
directory holding anything else is refused, never overwritten, and neither is a
``config.json`` that is not a run's config.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from train.errors import UserError

RUN_ENTRIES = frozenset({"config.json", "metrics.jsonl", "checkpoints", "tensorboard",
                         "profile", "damaged_checkpoints"})
LOG_SUFFIXES = (".log", ".out", ".err")
# Entries that --overwrite deletes (config.json is rewritten; logs are kept).
_OVERWRITTEN = ("metrics.jsonl", "checkpoints", "tensorboard", "profile",
                "damaged_checkpoints")


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds a run's metrics or checkpoints."""
    ckpt = out / "checkpoints"
    return (out / "metrics.jsonl").exists() or (ckpt.is_dir() and any(ckpt.iterdir()))


def check_out_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuses an unusable ``--out`` before the (slow) data and model are built.

    Raises:
      UserError: ``out`` is a file, cannot be written, holds something other than a
        run, or has a ``config.json`` that is not a run's.
      FileExistsError: ``out`` holds a run and neither ``resume`` nor ``overwrite``.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file, not a directory; choose a directory")
    if out.is_dir():
        strangers = sorted(e.name for e in out.iterdir()
                           if e.name not in RUN_ENTRIES and not (
                               e.is_file() and e.name.endswith(LOG_SUFFIXES)))
        if strangers:
            shown = ", ".join(strangers[:5]) + (", ..." if len(strangers) > 5 else "")
            raise UserError(
                f"--out {str(out)!r} holds files that are not a training run's ({shown}); "
                "choose an empty or new directory")
        config = out / "config.json"
        if config.exists() and not _is_run_config(config):
            raise UserError(f"--out {str(out)!r} has a config.json that is not a training "
                            "run's config; choose an empty or new directory")
    _check_writable(out)
    if holds_run(out) and not resume and not overwrite:
        raise FileExistsError(
            f"{str(out)!r} already holds a run; pass --resume to continue it, "
            "--overwrite to replace it, or choose another --out")


def clear_run(out: Path) -> None:
    """Deletes what a run wrote (for ``--overwrite``); only run entries, never others."""
    for name in _OVERWRITTEN:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _is_run_config(path: Path) -> bool:
    from train.config import TrainConfig  # pylint: disable=import-outside-toplevel

    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        TrainConfig.from_dict(values)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError):
        return False
    return True


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise UserError(f"cannot write to --out {str(out)!r}: {reason}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to --out {str(out)!r}: permission denied")
