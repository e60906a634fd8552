"""Trainer benchmark: `train.loop.train`'s steps/s against a bare jitted loop, side by side.

Both sides train the same model (`train.loop.build_model`) with the same optax chain
(`train.optimizers.build_optimizer`) on the same data (`train.data`, the preset's batch and
sequence length, the trainer's grain iterator):

* trainer: `train.loop.train(cfg, data=...)` for `--steps` updates (no evaluation or
  checkpoint inside the timed window; `log_every` 10, so it writes metrics records and log
  lines as usual). Its own timing is used: from just before the first update is dispatched
  (after compiling) until the last update's metrics are read, i.e. everything the loop does
  per step: batch assembly, dispatch, reading metrics one step late, logging. The first
  update of a run is not timed (one-time costs: a freshly loaded executable, the data
  pipeline's threads starting); timing starts when its metrics arrive.
* bare: the least a JAX user can write: the same update as a pure function of two flat
  lists of arrays (`jax.jit`, donated), `next(iterator)` and the call, no metric read;
  compiled before the rounds, then timed like the trainer: from the initial state and a
  fresh iterator, one untimed update, then the others until the last update's loss is ready.

Per preset, `--repeats` rounds alternate the order (trainer first, then bare first, ...), so
that a change in machine load hits both sides alike. Reported: median steps/s of each side,
the median over rounds of the per-round ratio trainer / bare (with min and max), and host ms
per step: the CPU time of the Python thread that runs the loop, per step (`time.thread_time`:
its own work, i.e. data hand-over, dispatch, bookkeeping; not its waits for the device or the
data loader's thread). The A/A control
(unless `--no-control`) times a second, independent bare loop in each round: its ratio to the
first shows the noise floor of the machine. The CPU-time ratio (informational) is the
median over rounds of bare / trainer CPU time of the whole process per step (all threads,
XLA's included): less disturbed by other processes than wall time on a shared machine.
Target: trainer / bare >= 0.97 (steps/s, wall time).

Dispatch cost (unless `--no-dispatch`): the host CPU time of one call of the update, called
back to back (`time.thread_time`, median of `--dispatch-calls` calls after warm-up), three ways
on the same model, optimizer and batch: `train.step.train_step` through `nnx.jit` (NNX walks the
model and optimizer graph on every call: what the trainer did before), through
`nnx.cached_partial` (the walk cached), and the trainer's compiled step over flat lists of
arrays (`train.state.compile_step`). The number of state arrays is shown beside it.

The trainer recompiles its step in every round (a fresh `train` call); a persistent
compilation cache (a temporary directory) makes that a load from disk. Compile time is not
timed on either side.

Run: `python benchmarks/trainer_bench.py [--presets tiny 20m] [--methods uniform]
[--steps tiny=40 20m=12] [--repeats 5] [--dtype float32|bfloat16] [--no-control]`.
On a GPU: `python benchmarks/trainer_bench.py --presets 60m 130m --methods uniform alpha_hill
--dtype bfloat16` (MFU is reported where the device's peak is known, see train/reporting.py).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from train import config as config_lib  # noqa: E402
from train import data as data_lib  # noqa: E402
from train import loop, optimizers, step  # noqa: E402
from train import state as state_lib  # noqa: E402

TARGET = 0.97
DEFAULT_STEPS = {"tiny": 40, "20m": 12, "60m": 40, "130m": 40, "350m": 30, "1b": 20}


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--presets", nargs="+", default=["tiny", "20m"], choices=list(config_lib.PRESETS))
  p.add_argument("--methods", nargs="+", default=["uniform"], choices=config_lib.METHODS)
  p.add_argument("--steps", nargs="*", default=[], metavar="PRESET=N",
                 help="timed updates per round and side (default: " +
                      ", ".join(f"{k}={v}" for k, v in DEFAULT_STEPS.items()) + ")")
  p.add_argument("--repeats", type=int, default=5, help="rounds per preset (default 5)")
  p.add_argument("--dtype", default="float32", choices=config_lib.DTYPES)
  p.add_argument("--data", default="default", help="the trainer's --data (default: default)")
  p.add_argument("--no-control", action="store_true", help="no A/A control (faster)")
  p.add_argument("--no-dispatch", action="store_true", help="no dispatch-cost columns")
  p.add_argument("--dispatch-calls", type=int, default=20)
  return p.parse_args()


class BareLoop:
  """The same update, jitted over flat lists of arrays, without anything around it."""

  def __init__(self, cfg, data):
    model = loop.build_model(cfg, data.vocab_size)
    tx = optimizers.build_optimizer(cfg)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.as_pure(params)
    opt_state = jax.jit(tx.init)(params)
    leaves, treedef = jax.tree.flatten((params, opt_state))
    # Every round starts from the initial state, as each trainer round does (the same
    # schedule position and, for alpha_hill, the same recompute in the first update).
    self.initial = jax.device_get(leaves)

    def update(leaves, batch):
      params, opt_state = jax.tree.unflatten(treedef, leaves)
      loss, grads = jax.value_and_grad(
          lambda p: step.mean_loss(nnx.merge(graphdef, p, rest), batch))(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return jax.tree.leaves((optax.apply_updates(params, updates), opt_state)), loss

    self.update = jax.jit(update, donate_argnums=0)
    self.data = data

  def run(self, steps: int) -> dict:
    """``steps`` updates from the initial state and a fresh iterator, like a trainer round;
    the first is not timed (as in the trainer)."""
    it = self.data.train_iter()
    leaves = jax.device_put(self.initial)
    leaves, loss = self.update(leaves, next(it))
    jax.block_until_ready(loss)
    steps -= 1
    t0, cpu, process = time.perf_counter(), time.thread_time(), time.process_time()
    for _ in range(steps):
      leaves, loss = self.update(leaves, next(it))
    jax.block_until_ready(loss)
    host = time.thread_time() - cpu
    seconds = time.perf_counter() - t0
    return {"steps_per_sec": steps / seconds, "host_ms": 1e3 * host / steps,
            "cpu_s": (time.process_time() - process) / steps}


def _host_ms_per_call(fn, calls: int) -> float:
  out = fn()  # warm-up (compiles the first time)
  jax.block_until_ready(out)
  times = []
  for _ in range(calls):
    cpu = time.thread_time()
    out = fn()
    times.append(time.thread_time() - cpu)
  jax.block_until_ready(out)
  return 1e3 * statistics.median(times)


def dispatch_costs(cfg, data, calls: int) -> dict:
  """Host ms per call: nnx.jit, nnx.cached_partial, the trainer's compiled flat step."""
  batch = next(data.train_iter())
  tx = optimizers.build_optimizer(cfg)
  model = loop.build_model(cfg, data.vocab_size)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  nnx_ms = _host_ms_per_call(lambda: step.train_step(model, optimizer, batch), calls)
  cached = nnx.cached_partial(step.train_step, model, optimizer)
  cached_ms = _host_ms_per_call(lambda: cached(batch), calls)
  spec, state = state_lib.init_state(loop.build_model(cfg, data.vocab_size), tx)
  compiled, _ = state_lib.compile_step(spec, tx, state, batch)
  holder = [state]

  def flat():
    holder[0], metrics = compiled(holder[0], batch)
    return metrics

  return {"leaves": len(state.params) + len(state.opt), "nnx_ms": nnx_ms,
          "cached_ms": cached_ms, "flat_ms": _host_ms_per_call(flat, calls)}


def trainer_run(cfg, data) -> dict:
  with contextlib.redirect_stdout(io.StringIO()):  # its log lines, kept out of the table
    result = loop.train(cfg, overwrite=True, data=data)
  t = result["timing"]
  assert t["steps"] == cfg.steps - 1, t  # the trainer does not time its first step
  return {"steps_per_sec": t["steps"] / t["seconds"],
          "host_ms": 1e3 * t["host_seconds"] / t["steps"],
          "cpu_s": t["process_seconds"] / t["steps"],
          "flops": result["flops_per_step"], "records": result["train"]}


def bench(preset: str, method: str, steps: int, args, workdir: str) -> dict:
  cfg = config_lib.from_preset(
      preset, method=method, steps=steps, dtype=args.dtype, data=args.data,
      eval_every=10**9, eval_batches=1, checkpoint_every=0, log_every=10, progress=False,
      out_dir=os.path.join(workdir, f"{preset}_{method}"),
      compilation_cache_dir=os.path.join(workdir, "xla_cache"))
  data = data_lib.build_data(loop.data_config(cfg))
  bare, control = BareLoop(cfg, data), None if args.no_control else BareLoop(cfg, data)
  bare.run(2), control and control.run(2)  # compiles, outside the rounds
  trainer_run(cfg.replace(steps=2), data)  # fills the compilation cache
  rows = {"trainer": [], "bare": [], "control": []}
  for r in range(args.repeats):
    order = ["trainer", "bare"] if r % 2 == 0 else ["bare", "trainer"]
    if control:
      order.insert(1, "control")
    for side in order:
      rows[side].append(trainer_run(cfg, data) if side == "trainer" else
                        (bare if side == "bare" else control).run(steps))
  ratio = [t["steps_per_sec"] / b["steps_per_sec"] for t, b in zip(rows["trainer"], rows["bare"])]
  aa = [c["steps_per_sec"] / b["steps_per_sec"] for c, b in zip(rows["control"], rows["bare"])]
  cpu = [b["cpu_s"] / t["cpu_s"] for t, b in zip(rows["trainer"], rows["bare"])]
  med = lambda side, key: statistics.median(x[key] for x in rows[side])  # noqa: E731
  out = {"preset": preset, "method": method, "steps": steps,
         "bare": med("bare", "steps_per_sec"), "trainer": med("trainer", "steps_per_sec"),
         "ratio": statistics.median(ratio), "ratio_min": min(ratio), "ratio_max": max(ratio),
         "bare_host_ms": med("bare", "host_ms"), "trainer_host_ms": med("trainer", "host_ms"),
         "aa": statistics.median(aa) if aa else None, "cpu_ratio": statistics.median(cpu),
         "tokens_per_step": cfg.batch_size * cfg.seq_len,
         "flops": rows["trainer"][0]["flops"]}
  mfus = [r["mfu"] for x in rows["trainer"] for r in x["records"] if "mfu" in r]
  out["mfu"] = statistics.median(mfus) if mfus else None
  out["dispatch"] = None if args.no_dispatch else dispatch_costs(cfg, data, args.dispatch_calls)
  return out


def table(results: list[dict]) -> str:
  lines = ["| preset | method | updates/round | bare steps/s | trainer steps/s | trainer / bare "
           "(min-max) | A/A control | CPU-time ratio | host ms/step bare | host ms/step trainer "
           "| trainer tokens/s | MFU | >= 0.97 |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    aa = f"{r['aa']:.3f}" if r["aa"] is not None else "-"
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
    lines.append(
        f"| {r['preset']} | {r['method']} | {r['steps']} | {r['bare']:.2f} | {r['trainer']:.2f} "
        f"| {r['ratio']:.3f} ({r['ratio_min']:.3f}-{r['ratio_max']:.3f}) | {aa} "
        f"| {r['cpu_ratio']:.3f} "
        f"| {r['bare_host_ms']:.2f} | {r['trainer_host_ms']:.2f} "
        f"| {r['trainer'] * r['tokens_per_step']:,.0f} | {mfu} "
        f"| {'pass' if r['ratio'] >= TARGET else 'FAIL'} |")
  if any(r["dispatch"] for r in results):
    lines += ["", "| preset | method | state arrays | host ms/call nnx.jit | nnx.cached_partial "
              "| compiled flat step (trainer) |", "|---|---|---|---|---|---|"]
    for r in results:
      d = r["dispatch"]
      if d:
        lines.append(f"| {r['preset']} | {r['method']} | {d['leaves']} | {d['nnx_ms']:.2f} "
                     f"| {d['cached_ms']:.2f} | {d['flat_ms']:.2f} |")
  return "\n".join(lines)


def main():
  args = parse_args()
  steps = dict(DEFAULT_STEPS)
  for item in args.steps:
    name, _, n = item.partition("=")
    steps[name] = int(n)
  dev = jax.devices()[0]
  print(f"- device: {jax.device_count()} x {dev.device_kind} ({dev.platform}); "
        f"{os.cpu_count()} CPUs; {platform.platform()}")
  print(f"- jax {jax.__version__}, numpy {np.__version__}, dtype {args.dtype}, "
        f"{args.repeats} rounds")
  print(f"- load average at start: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
  results = []
  with tempfile.TemporaryDirectory() as workdir:
    for preset in args.presets:
      for method in args.methods:
        t0 = time.perf_counter()
        results.append(bench(preset, method, steps[preset], args, workdir))
        print(f"  ({preset}/{method}: {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
  print(f"- load average at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
  print()
  print(table(results))


if __name__ == "__main__":
  main()
