"""benchmarks/openblas_threads.py: the flag is stripped and each setting reaches a fresh process."""

import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import openblas_threads  # noqa: E402


def test_argv_without_flag_drops_both_spellings_and_their_values():
    argv = ["--a", "--openblas-threads", "1", "--b", "--openblas-threads=env", "x"]
    assert openblas_threads.argv_without_flag(argv) == ["--a", "--b", "x"]
    assert openblas_threads.argv_without_flag(["--n", "1"]) == ["--n", "1"]


def test_both_runs_the_script_twice_with_the_environment_and_with_one_thread(tmp_path):
    script = tmp_path / "bench.py"
    script.write_text(
        "import argparse, os, sys\n"
        f"sys.path.insert(0, {str(BENCHMARKS)!r})\n"
        "import openblas_threads\n"
        "p = argparse.ArgumentParser(); p.add_argument('--tag')\n"
        "p.add_argument('--openblas-threads', choices=openblas_threads.CHOICES)\n"
        "args = p.parse_args()\n"
        "openblas_threads.apply(args.openblas_threads, __file__)\n"
        "print(args.tag, args.openblas_threads, os.environ.get('OPENBLAS_NUM_THREADS'))\n")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "7"}
    out = subprocess.run([sys.executable, str(script), "--openblas-threads", "both",
                          "--tag", "t"], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["t env 7", "t 1 1"]
