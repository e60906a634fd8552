"""XLA flags that make the suite's many small compiles faster (installed by the root conftest.py).

The suite's time is mostly XLA compiling small programs (tiny models, a few steps each), not
running them. XLA's CPU backend at optimisation level 0, without LLVM's expensive passes,
compiles them about 1.5x faster (measured on `test_every_method_takes_three_jitted_steps`:
29 s -> 19 s for three of its cases). The flags change how the compiled code is optimised,
not what it computes: the HLO program is the same, and every tolerance in the suite holds.
They go into the environment before anything imports jax, so child processes (the trainer
CLI, the 8-device checks, the notebook kernels) inherit them.

`LLR_TEST_FULL_XLA_OPT=1` runs the suite with XLA's default optimisation; a flag already
given in `XLA_FLAGS` is kept as given.
"""

from __future__ import annotations

import os

FLAGS = {
    "--xla_backend_optimization_level": "0",
    "--xla_llvm_disable_expensive_passes": "true",
}


def with_fast_compile(xla_flags: str) -> str:
    """`xla_flags` plus every flag of `FLAGS` it does not already set."""
    flags = xla_flags.split()
    given = {flag.split("=", 1)[0] for flag in flags}
    flags += [f"{name}={value}" for name, value in FLAGS.items() if name not in given]
    return " ".join(flags)


def install() -> None:
    """Extends this process's `XLA_FLAGS` (unless `LLR_TEST_FULL_XLA_OPT=1`)."""
    opt_out = os.environ.get("LLR_TEST_FULL_XLA_OPT", "")
    if opt_out not in ("", "0", "1"):
        raise ValueError(f"LLR_TEST_FULL_XLA_OPT must be 0 or 1, got {opt_out!r}")
    if opt_out != "1":
        os.environ["XLA_FLAGS"] = with_fast_compile(os.environ.get("XLA_FLAGS", ""))
