"""Step-time profile over a recompute interval: `scale_by_alpha_hill(spread=1)` (the paper's
all-at-once recompute) against `spread=k` (one slice of the matrices per step), with uniform
AdamW as the baseline.

All variants train the same LLaMa preset (random int32 token batches; data loading excluded)
with one jitted functional step `(params, opt_state, batch) -> (params, opt_state, loss)`
(params and state donated), the chain `clip -> adamw -> [scale_by_alpha_hill]`. Each round runs
every variant for one whole interval of `--interval` consecutive steps that starts at a
recompute (the alpha state's count is set to a multiple of the interval; no recompilation),
variants interleaved, order rotating by round. Every step is timed until its loss and state are
ready. Reported per variant, as medians over rounds:

* median and max step time within the interval, and max / median (target for the spread
  variant: <= 1.15 on the 20m preset; the all-at-once ratio beside it);
* amortised ratio: the interval's mean step time over uniform's, paired by round (the spread
  variant must not be worse than all-at-once).

Run: `python benchmarks/spread_bench.py [--preset 20m] [--interval 100] [--spread 10]
[--repeats 3] [--batch-size 8] [--seq-len 256]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import llr_optax  # noqa: E402
from models import LLaMa, llama_config  # noqa: E402

SPREAD_TARGET = 1.15


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="20m")
  p.add_argument("--interval", type=int, default=100)
  p.add_argument("--spread", type=int, default=10)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--seq-len", type=int, default=256)
  return p.parse_args(argv)


def with_alpha_count(state, count: int):
  """The optimizer state with every `ScaleByAlphaHillState.count` set to `count`."""
  is_alpha = lambda x: isinstance(x, llr_optax.ScaleByAlphaHillState)
  return jax.tree.map(lambda s: s._replace(count=jnp.asarray(count, jnp.int32)) if is_alpha(s)
                      else s, state, is_leaf=is_alpha)


class Variant:
  def __init__(self, name, model_cfg, scale_tx, args):
    model = LLaMa(model_cfg, rngs=nnx.Rngs(0))
    self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
    self.params = nnx.as_pure(params)
    parts = [optax.clip_by_global_norm(1.0), optax.adamw(1e-3, b1=0.9, b2=0.95,
                                                           weight_decay=0.1)]
    self.tx = optax.chain(*parts, *([scale_tx] if scale_tx is not None else []))
    self.state = self.tx.init(self.params)
    self.name, self.args = name, args
    graphdef, rest, tx = self.graphdef, self.rest, self.tx

    def loss_fn(p, batch):
      logits = nnx.merge(graphdef, p, rest)(batch[:, :-1]).astype(jnp.float32)
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    def step(p, s, batch):
      loss, grads = jax.value_and_grad(loss_fn)(p, batch)
      updates, s = tx.update(grads, s, p)
      return optax.apply_updates(p, updates), s, loss

    self.step = jax.jit(step, donate_argnums=(0, 1))
    self.rng = np.random.default_rng(0)

  def batch(self, vocab):
    return jnp.asarray(self.rng.integers(0, vocab, (self.args.batch_size, self.args.seq_len + 1)),
                       jnp.int32)

  def interval(self, start_count: int, vocab: int) -> list[float]:
    """Times `--interval` consecutive steps from `start_count` (a recompute count)."""
    self.state = with_alpha_count(self.state, start_count)
    times = []
    for _ in range(self.args.interval):
      b = self.batch(vocab)
      t0 = time.perf_counter()
      self.params, self.state, loss = self.step(self.params, self.state, b)
      jax.block_until_ready((loss, self.state))
      times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
  args = parse_args(argv)
  vocab = 257
  model_cfg = llama_config(args.preset, vocab_size=vocab, max_seq_len=args.seq_len)
  big = 10 ** 9  # total_steps: the active phase never ends during the benchmark
  make = lambda spread: llr_optax.scale_by_alpha_hill(interval=args.interval, total_steps=big,
                                                      spread=spread)
  variants = [Variant("uniform adamw", model_cfg, None, args),
              Variant("alpha_hill spread=1", model_cfg, make(1), args),
              Variant(f"alpha_hill spread={args.spread}", model_cfg, make(args.spread), args)]
  t = time.perf_counter()
  for v in variants:  # compile (and warm up) outside the timed rounds
    v.interval(0, vocab)
  print(f"# {args.preset}, batch {args.batch_size} x {args.seq_len}, vocab {vocab}, interval "
        f"{args.interval}, {args.repeats} rounds; warm-up {time.perf_counter() - t:.0f} s; "
        f"devices {jax.devices()}; OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}")
  rounds: dict[str, list[list[float]]] = {v.name: [] for v in variants}
  for r in range(args.repeats):
    order = variants[r % len(variants):] + variants[:r % len(variants)]
    for v in order:
      rounds[v.name].append(v.interval(args.interval * (r + 1), vocab))
  base = [statistics.fmean(x) for x in rounds["uniform adamw"]]
  print("| variant | median step ms | max step ms | max / median | amortised vs uniform |")
  print("|---|---|---|---|---|")
  for v in variants:
    meds = [statistics.median(x) for x in rounds[v.name]]
    maxs = [max(x) for x in rounds[v.name]]
    peak = statistics.median(m / d for m, d in zip(maxs, meds))
    amort = statistics.median(statistics.fmean(x) / b for x, b in zip(rounds[v.name], base))
    flag = ""
    if "spread" in v.name and v.name != "alpha_hill spread=1":
      flag = " (target <= 1.15: " + ("pass)" if peak <= SPREAD_TARGET else "FAIL)")
    print(f"| {v.name} | {1e3 * statistics.median(meds):.1f} | {1e3 * statistics.median(maxs):.1f}"
          f" | {peak:.3f}{flag} | {amort:.3f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
