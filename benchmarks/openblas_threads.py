"""`--openblas-threads env|1|both` for the benchmarks that time LAPACK/BLAS kernels on CPU.

OpenBLAS reads OPENBLAS_NUM_THREADS once, when NumPy, SciPy or jaxlib first load it, so the
setting must be applied before any of them is imported, and comparing two settings needs two
processes. Import this module (it imports nothing heavy) and call `apply` first thing.
"""

from __future__ import annotations

import os
import subprocess
import sys

CHOICES = ("env", "1", "both")
FLAG = "--openblas-threads"


def argv_without_flag(argv: list[str]) -> list[str]:
  """`argv` less every `--openblas-threads X` and `--openblas-threads=X` in it."""
  kept, skip_value = [], False
  for arg in argv:
    if not skip_value and not arg.startswith(FLAG):
      kept.append(arg)
    skip_value = arg == FLAG
  return kept


def apply(choice: str, script: str) -> None:
  """Sets OPENBLAS_NUM_THREADS for `choice`; for "both", runs `script` twice and exits.

  "both" runs the script's own command line again in a fresh process, once with the
  environment's value and once with 1, then exits with 0 (a failing run raises).
  """
  if choice == "both":
    argv = argv_without_flag(sys.argv[1:])
    for threads in ("env", "1"):
      subprocess.run([sys.executable, os.path.abspath(script), *argv, FLAG, threads],
                     check=True)
    sys.exit(0)
  if choice == "1":
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
