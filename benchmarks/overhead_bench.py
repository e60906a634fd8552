"""Overhead benchmark: train-step time of each layer-wise LR method relative to uniform AdamW.

Every method runs the trainer's own step, `train.step.train_step` (`nnx.jit`, model and
optimizer donated), on a model from `train.loop.build_model` and an
`nnx.Optimizer(model, tx, wrt=nnx.Param)` whose `tx` is `train.optimizers.build_optimizer` of
`train.config.from_preset(preset, method=..., ...)`. Batches are random int32 tokens of the
preset's batch and sequence size (data loading is excluded; `--batch-size` may shrink a preset's
batch, which only makes the ratios stricter: the optimizer's work does not depend on the batch).
`init_grad` gets synthetic positive per-leaf factors instead of measured ones: its step cost does
not depend on their values. `total_steps` is set very large, so alpha_hill's recompute stays in
its active phase; alpha_hill and tempbalance recompute every `--interval` steps (default 100).

Every step is synchronised like the trainer's loop (which reads the loss after each step): the
timer stops when the returned metrics and the optimizer state are ready. All variants are built
and compiled first; then `--repeats` rounds run round-robin over the variants (rotating order).
In each round a variant does one step at a count that is a multiple of `--interval` (a recompute
step for alpha_hill/tempbalance; an ordinary step for the others) and then `--steps` steps at
counts that are not (alpha_hill/tempbalance take the cheap `lax.cond` branch). The step counter
of the alpha state is set directly between chunks (no recompilation). Reported per variant:

* ms/step (non-recompute): median over all such steps. Ratio vs uniform: median over rounds of
  (the variant's median in that round / uniform's in that round), with the quartiles of those
  per-round ratios. Target <= 1.02x.
* host ms: median time until `train_step` returned (NNX graph traversal of model and optimizer
  + dispatch; the compiled step runs after it or overlaps its end); "ratio excl. host": the same
  paired ratio of (step - host) time, roughly the compiled step alone.
* empty-call ms: median time of an `nnx.jit` call with train_step's arguments and donation
  but an empty body: the host cost of passing this model and optimizer state alone.
* CPU-time ratio: the paired ratio of this process's CPU time per step (all threads); on a
  shared machine it is less disturbed by other processes than wall time.
* recompute-step ms: median over rounds (alpha_hill, tempbalance).
* amortised ratio at interval I = ((I - 1) t_plain + t_recompute) / (I t_plain(uniform)),
  computed as the paired plain ratio + (t_recompute - t_plain) / (I t_plain(uniform)). Target
  <= 1.05x at I = 100.
* measured window ratio (presets in `--window`): each variant trains `--interval` consecutive
  steps from a recompute (so exactly one recompute), in chunks of `--steps` steps interleaved
  over the variants; the ratio of the window times is the amortised ratio, measured directly.
* "uniform A/A control" (unless `--no-control`): a second, independent uniform variant timed
  like the others. Its ratios show how much two identical steps differ on this machine (the
  noise floor of every ratio in the table).

OPENBLAS_NUM_THREADS matters for the recompute step on CPU: the alpha recompute calls jaxlib's
LAPACK kernels (OpenBLAS) from XLA's intra-op threads, and with OpenBLAS's own threads on top
(its default: one per core) a busy 2-core machine can make them many times slower (seen here:
a 20m recompute step up to 16x a training step). By default the
environment's value is used (what the trainer gets); `--openblas-threads 1` sets it to 1, `both`
runs the whole benchmark twice, each in a fresh process.

`--dispatch cached` also (or instead) times every method through `nnx.cached_partial(train_step,
model, optimizer)`, which caches the NNX graph traversal; its ratios are against the cached
uniform variant.

Run: `python benchmarks/overhead_bench.py [--presets tiny 20m] [--methods ...] [--optimizers
adamw [muon]] [--repeats 10] [--steps 2] [--interval 100] [--batch-size 20m=8] [--window tiny]
[--dispatch nnx [cached]] [--no-control] [--openblas-threads env|1|both]`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import openblas_threads  # benchmarks/openblas_threads.py, beside this script

METHODS = ("uniform", "alpha_hill", "init_grad", "relative", "tempbalance")
ALPHA_METHODS = ("alpha_hill", "tempbalance")
CONTROL = "uniform A/A control"
PLAIN_TARGET = 1.02
AMORTISED_TARGET = 1.05
TARGET_INTERVAL = 100


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--presets", nargs="+", default=["tiny", "20m"])
  p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
  p.add_argument("--optimizers", nargs="+", default=["adamw"], choices=("adamw", "muon"))
  p.add_argument("--repeats", type=int, default=10, help="interleaved rounds")
  p.add_argument("--steps", type=int, default=2,
                 help="non-recompute steps per method per round (< --interval)")
  p.add_argument("--interval", type=int, default=TARGET_INTERVAL,
                 help="alpha_hill/tempbalance recompute interval")
  p.add_argument("--batch-size", nargs="*", default=["20m=8"], metavar="PRESET=N",
                 help="override a preset's batch size (default: 20m=8; the flag alone: none)")
  p.add_argument("--window", nargs="*", default=["tiny"], metavar="PRESET",
                 help="presets whose amortised cost is also measured over a real window of "
                      "--interval steps (default: tiny; the flag alone: none)")
  p.add_argument("--dispatch", nargs="+", default=["nnx"], choices=("nnx", "cached"),
                 help="nnx: the trainer's train_step(model, optimizer, batch); cached: the "
                      "same step through nnx.cached_partial (no per-call graph traversal)")
  p.add_argument("--probe-calls", type=int, default=5,
                 help="per round, empty nnx.jit calls on (model, optimizer) per variant: the "
                      "host cost of the step's arguments alone (0: skip)")
  p.add_argument("--no-control", dest="control", action="store_false",
                 help="leave out the A/A control (a second uniform variant timed like the "
                      "others: its ratio shows the noise of this machine)")
  p.add_argument("--openblas-threads", default="env", choices=openblas_threads.CHOICES,
                 help="OPENBLAS_NUM_THREADS for the run: as in the environment (what the "
                      "trainer gets), 1, or both (two runs, each in a fresh process). It sets "
                      "the threads of the LAPACK kernels the alpha recompute calls on CPU")
  p.add_argument("--vocab-size", type=int, default=257, help="257: the trainer's byte tokenizer")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  if not 1 <= args.steps < args.interval:
    p.error("--steps must lie in [1, --interval)")
  if "uniform" not in args.methods:
    args.methods = ["uniform", *args.methods]
  args.batch_size = dict(_preset_int(p, s) for s in args.batch_size if s)
  return args


def _preset_int(p, text):
  name, sep, value = text.partition("=")
  if not sep or not value.isdigit() or int(value) < 1:
    p.error(f"--batch-size wants PRESET=N, got {text!r}")
  return name, int(value)


ARGS = _parse()
openblas_threads.apply(ARGS.openblas_threads, __file__)  # before NumPy/jaxlib load it

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from llr_optax import _scales  # noqa: E402
from train import optimizers, step  # noqa: E402
from train.config import from_preset  # noqa: E402
from train.loop import build_model  # noqa: E402

# Much larger than any count reached here: alpha_hill's active phase (20% of it) never ends.
TOTAL_STEPS = 10**8


def synthetic_init_scales(model: nnx.Module, seed: int):
  """Positive per-leaf factors shaped like the params optax sees (stand-in for measured ones)."""
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [jnp.asarray(rng.uniform(0.5, 2.0), jnp.float32)
                                      for _ in leaves])


@nnx.jit(donate_argnums=(0, 1))
def _empty_step(model: nnx.Module, optimizer: nnx.Optimizer) -> None:
  del model, optimizer  # same arguments and donation as train_step, no work


class Variant:
  """One method x optimizer: its model, optimizer and the handles the timing loop needs."""

  def __init__(self, preset: str, method: str, opt_name: str, batch_size: int | None,
               dispatch: str):
    extra = {} if batch_size is None else {"batch_size": batch_size}
    self.cfg = from_preset(preset, method=method, optimizer=opt_name, steps=TOTAL_STEPS,
                           interval=ARGS.interval, ramp_steps=ARGS.interval // 2,
                           seed=ARGS.seed, progress=False, **extra)
    self.method = method
    self.model = build_model(self.cfg, ARGS.vocab_size)
    scales = (synthetic_init_scales(self.model, ARGS.seed) if method == "init_grad" else None)
    tx = optimizers.build_optimizer(self.cfg, init_scales=scales)
    self.optimizer = nnx.Optimizer(self.model, tx, wrt=nnx.Param)
    is_var = lambda x: isinstance(x, nnx.Variable)
    # One optimizer-state Variable: the step's outputs are ready when this one's new value is
    # (the whole step is one executable). Cheaper than traversing the whole state every step.
    self.sync_var = jax.tree.leaves(self.optimizer.opt_state, is_leaf=is_var)[-1]
    states = _scales._scale_states(self.optimizer.opt_state)  # pylint: disable=protected-access
    alpha_states = [s for s in states if hasattr(s, "alphas")]
    self.count_var = alpha_states[0].count if alpha_states else None
    # "nnx": the trainer's call, train_step(model, optimizer, batch), which walks the NNX graph
    # of model and optimizer on every call. "cached": the same step through nnx.cached_partial
    # (the traversal is cached; the same Variables are updated in place).
    self.fn = (nnx.cached_partial(step.train_step, self.model, self.optimizer)
               if dispatch == "cached" else
               lambda batch: step.train_step(self.model, self.optimizer, batch))
    self.empty = (nnx.cached_partial(_empty_step, self.model, self.optimizer)
                  if dispatch == "cached" else
                  lambda: _empty_step(self.model, self.optimizer))

  def set_count(self, count: int):
    """Moves the alpha state's step counter (no-op for methods without one)."""
    if self.count_var is not None:
      self.count_var.set_value(jnp.asarray(count, jnp.int32))

  def empty_call(self) -> float:
    """Seconds of an `nnx.jit` call on (model, optimizer) whose body does nothing: the host cost
    of passing this model and optimizer state through the step's dispatch (`--probe-calls`)."""
    t0 = time.perf_counter()
    self.empty()
    return time.perf_counter() - t0

  def step(self, batch) -> tuple[float, float, float]:
    """One synchronised trainer step: seconds, seconds until train_step returned, and this
    process's CPU seconds (all threads; less sensitive to other processes than wall time)."""
    c0, t0 = time.process_time(), time.perf_counter()
    metrics = self.fn(batch)
    t1 = time.perf_counter()
    jax.block_until_ready((metrics, self.sync_var[...]))
    t2, c2 = time.perf_counter(), time.process_time()
    return t2 - t0, t1 - t0, c2 - c0


def random_batch(cfg, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  shape = (cfg.batch_size, cfg.seq_len)
  return {"inputs": jnp.asarray(rng.integers(0, ARGS.vocab_size, shape), jnp.int32),
          "targets": jnp.asarray(rng.integers(0, ARGS.vocab_size, shape), jnp.int32)}


def _q(values, q):
  return float(np.quantile(np.asarray(values), q))


def _name(method: str, dispatch: str) -> str:
  return method if dispatch == "nnx" else f"{method} (cached)"


def run_preset(preset: str, opt_name: str) -> list[str]:
  t_build = time.perf_counter()
  variants, base = {}, {}
  for d in ARGS.dispatch:
    for m in ARGS.methods:
      variants[_name(m, d)] = Variant(preset, m, opt_name, ARGS.batch_size.get(preset), d)
      base[_name(m, d)] = _name("uniform", d)
    if ARGS.control:  # a second, independent uniform variant: the ratio noise floor (A/A)
      variants[_name(CONTROL, d)] = Variant(preset, "uniform", opt_name,
                                            ARGS.batch_size.get(preset), d)
      base[_name(CONTROL, d)] = _name("uniform", d)
  cfg = variants["uniform" if "nnx" in ARGS.dispatch else "uniform (cached)"].cfg
  batch = random_batch(cfg, ARGS.seed)
  interval = ARGS.interval
  for v in variants.values():  # compile, then one recompute and one plain step each (warm-up)
    v.set_count(interval)
    v.step(batch)
    v.step(batch)
    v.empty_call()
  compile_s = time.perf_counter() - t_build

  names = list(variants)
  plain = {n: [] for n in names}        # every non-recompute step: (wall, host, cpu) seconds
  per_round = {n: [] for n in names}    # per round: medians of wall, wall - host, cpu
  first = {n: [] for n in names}        # the step at a multiple of interval: wall seconds
  empty = {n: [] for n in names}        # empty nnx.jit calls on (model, optimizer): seconds
  for r in range(ARGS.repeats):
    order = names[r % len(names):] + names[:r % len(names)]
    for n in order:
      v = variants[n]
      v.set_count(interval * (r + 2))
      first[n].append(v.step(batch)[0])
      empty[n] += [v.empty_call() for _ in range(ARGS.probe_calls)]
      ts = np.array([v.step(batch) for _ in range(ARGS.steps)])
      plain[n].append(ts)
      per_round[n].append([np.median(ts[:, 0]), np.median(ts[:, 0] - ts[:, 1]),
                           np.median(ts[:, 2])])

  window = {}
  if preset in ARGS.window:
    for v in variants.values():
      v.set_count(interval * (ARGS.repeats + 3))
    window = {n: 0.0 for n in names}
    done, r = 0, 0
    while done < interval:
      chunk = min(ARGS.steps, interval - done)
      order = names[r % len(names):] + names[:r % len(names)]
      for n in order:
        window[n] += sum(variants[n].step(batch)[0] for _ in range(chunk))
      done, r = done + chunk, r + 1

  plain = {n: np.concatenate(v) for n, v in plain.items()}
  per_round = {n: np.array(v) for n, v in per_round.items()}
  med = {n: float(np.median(plain[n][:, 0])) for n in names}
  host = {n: float(np.median(plain[n][:, 1])) for n in names}
  probe = {n: f"{np.median(empty[n]) * 1e3:.1f}" if empty[n] else "-" for n in names}
  rec = {n: float(np.median(first[n])) for n in names}
  lines = [f"### {preset}, {opt_name}: batch {cfg.batch_size} x {cfg.seq_len} tokens"
           f"{' (reduced from the preset)' if preset in ARGS.batch_size else ''}, "
           f"vocab {ARGS.vocab_size}, interval {interval}, {ARGS.repeats} rounds x "
           f"({ARGS.steps} plain + 1 at a multiple of the interval) steps per variant; "
           f"build + compile {compile_s:.0f} s",
           "",
           "| method | ms/step (non-recompute) | ratio vs uniform [q25, q75] | target <= "
           f"{PLAIN_TARGET} | host ms | empty-call ms | ratio excl. host | CPU-time ratio "
           f"[q25, q75] | recompute-step ms | amortised ratio @{interval} | target <= "
           f"{AMORTISED_TARGET} | measured window ratio |",
           "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|"]
  for n in names:
    b = base[n]
    ratios = per_round[n] / per_round[b]  # per round: wall, wall - host, cpu
    ratio, dev_ratio, cpu_ratio = np.median(ratios, axis=0)
    recomputes = variants[n].method in ALPHA_METHODS
    t_rec = rec[n] if recomputes else med[n]
    # ((I - 1) * t_plain + t_rec) / (I * t_plain(uniform)), written as the paired plain ratio
    # plus the recompute's extra time spread over the interval.
    amort = ratio + (t_rec - med[n]) / (interval * med[b])
    ok_plain = "pass" if ratio <= PLAIN_TARGET else "FAIL"
    ok_amort = "pass" if amort <= AMORTISED_TARGET else "FAIL"
    if interval != TARGET_INTERVAL:
      ok_amort += f" (at interval {interval}; the target is at {TARGET_INTERVAL})"
    if n == b:
      ok_plain = ok_amort = "(baseline)"
    elif variants[n].method == "uniform":
      ok_plain = ok_amort = "(noise floor)"
    win = f"{window[n] / window[b]:.3f}x" if window else "-"
    rec_txt = f"{rec[n] * 1e3:.1f}" if recomputes else "- (none)"
    lines.append(f"| {n} | {med[n] * 1e3:.1f} | {ratio:.3f}x [{_q(ratios[:, 0], .25):.3f}, "
                 f"{_q(ratios[:, 0], .75):.3f}] | {ok_plain} | {host[n] * 1e3:.1f} | "
                 f"{probe[n]} | {dev_ratio:.3f}x | {cpu_ratio:.3f}x [{_q(ratios[:, 2], .25):.3f}, "
                 f"{_q(ratios[:, 2], .75):.3f}] | {rec_txt} | {amort:.3f}x | {ok_amort} "
                 f"| {win} |")
  lines.append("")
  ctrl = _name(CONTROL, ARGS.dispatch[0])
  if ctrl in per_round:
    aa = per_round[ctrl][:, 0] / per_round[base[ctrl]][:, 0]
    lines.append(f"noise floor: the A/A control's per-round wall-time ratios have quartiles "
                 f"[{_q(aa, .25):.3f}, {_q(aa, .75):.3f}]; a ratio closer to 1 than this "
                 "spread is not resolved by this run (PASS/FAIL use the wall-time ratio).")
  lines.append(f"ms/step: median over {ARGS.repeats * ARGS.steps} synchronised non-recompute "
               "steps; ratios: median over rounds of per-round medians, against the uniform "
               "variant of the same dispatch; min ms: "
               + ", ".join(f"{n} {plain[n][:, 0].min() * 1e3:.1f}" for n in names))
  lines.append("step at a multiple of the interval of methods without recompute (ms, for "
               "comparison with the recompute steps): "
               + ", ".join(f"{n} {rec[n] * 1e3:.1f}" for n in names
                           if variants[n].method not in ALPHA_METHODS))
  if window:
    lines.append(f"window: {interval} consecutive steps per variant from a recompute, in "
                 f"chunks of {ARGS.steps} interleaved over the variants; seconds: "
                 + ", ".join(f"{n} {window[n]:.2f}" for n in names))
  lines.append("")
  del variants
  return lines


def main():
  out = ["## Overhead benchmark (benchmarks/overhead_bench.py)", ""]
  out.append("- command: `" + " ".join(["python", "benchmarks/overhead_bench.py",
                                          *sys.argv[1:]]) + "`")
  out.append(f"- jax {jax.__version__} ({jax.default_backend()}), flax "
             f"{__import__('flax').__version__}, optax {optax.__version__}, devices: "
             f"{jax.devices()}, CPUs: {os.cpu_count()}, "
             f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
             f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
  out.append(f"- load average at start: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
  out.append("- init_grad uses synthetic positive per-leaf factors (not measured): the step cost "
             "does not depend on their values")
  out.append("")
  print("\n".join(out), flush=True)
  for opt_name in ARGS.optimizers:
    for preset in ARGS.presets:
      print("\n".join(run_preset(preset, opt_name)), flush=True)
  print(f"- load average at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())} "
        "(other processes on this machine skew timings; re-run on a quiet machine)")


if __name__ == "__main__":
  main()
