"""benchmarks/gpu_evidence.sh: its shell parses, and without an accelerator it stops at once
with a one-line reason instead of starting hours of CPU training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_evidence.sh"


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_without_an_accelerator_it_refuses_before_training(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable, PRESETS="20m")
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "runs")], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode != 0
    assert "no accelerator found" in done.stderr
    assert not (tmp_path / "runs").exists()   # no run cache: nothing was started


def test_a_bad_number_is_a_one_line_error_before_anything_runs(tmp_path):
    for var, value, said in (("WORKERS", "six", "WORKERS must be a whole number, got 'six'"),
                             ("WORKERS", "0", "WORKERS must be >= 1"),
                             ("SEEDS", "three", "SEEDS must be a whole number"),
                             ("DEADLINE", "4.5", "DEADLINE must be a whole number"),
                             ("GRACE", "-1", "GRACE must be a whole number")):
        # PYTHON points nowhere: the check must come before any Python is started.
        env = dict(os.environ, PYTHON=str(tmp_path / "no-python"), **{var: value})
        done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "runs")], env=env,
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 2, (var, value, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"gpu_evidence.sh: {said}"), lines
