"""Training-step time of the CPU demo presets side by side: tiny, moe-tiny, gpt-tiny.

Each preset takes AdamW steps on random tokens at the `tiny` run settings (batch 16 x 128
tokens, byte vocabulary); the MoE step adds its auxiliary router loss, as training will.
Presets are measured in interleaved rounds (so a busy machine slows all of them alike) and
the script prints the median step time, its ratio to `tiny`, and the time 300 steps (the
`tiny` run length) would take.

Usage:
    PYTHONPATH=. python benchmarks/model_step_bench.py [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import optax
from flax import nnx

from models import create_model, model_config, param_count

PRESETS = ("tiny", "moe-tiny", "gpt-tiny")


def make_step(preset: str, batch: int, seq_len: int, vocab: int):
    model = create_model(model_config(preset, vocab, seq_len), rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, tokens):
        def loss_fn(m):
            logits, aux = m(tokens[:, :-1], return_aux=True)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
            return ce + aux.get("aux_loss", 0.0)
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    tokens = jax.random.randint(jax.random.key(0), (batch, seq_len + 1), 0, vocab)
    step(model, optimizer, tokens).block_until_ready()  # compile
    return lambda: step(model, optimizer, tokens).block_until_ready(), model.config


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per preset and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    args = p.parse_args(argv)
    steps, configs = {}, {}
    for preset in PRESETS:
        steps[preset], configs[preset] = make_step(preset, args.batch_size, args.seq_len, 257)
    times = {preset: [] for preset in PRESETS}
    for _ in range(args.rounds):
        for preset in PRESETS:
            for _ in range(args.steps):
                start = time.perf_counter()
                steps[preset]()
                times[preset].append(time.perf_counter() - start)
    base = statistics.median(times["tiny"])
    print(f"batch {args.batch_size} x {args.seq_len} tokens, AdamW, "
          f"{args.rounds} rounds x {args.steps} steps, {jax.devices()[0].platform}")
    print("| preset | parameters | ms/step (median) | ratio to tiny | 300 steps |")
    print("|---|---|---|---|---|")
    for preset in PRESETS:
        median = statistics.median(times[preset])
        print(f"| {preset} | {param_count(configs[preset]):,} | {1e3 * median:.1f} | "
              f"{median / base:.2f} | {300 * median:.0f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
