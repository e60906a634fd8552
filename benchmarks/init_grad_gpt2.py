"""Init-grad layer-wise LR factors of GPT-2 at the paper's initialisation, per module type.

Measures what `llr_optax.init_grad_scales` assigns to every leaf of a GPT-2 preset
(default `gpt2-124m`) initialised with `llr_optax.fan_in_init(..., rule="paper")`, from T
minibatches of the trainer's default corpus, and prints a per-module summary beside the
numbers the init-grad paper reports for its 124M GPT-2 (embedding/head 2.74, position
embedding 0.66; the rest of its Figure 5 is a plot without numbers in the text).

GPT-2 fuses the query/key/value projections into one `c_attn` leaf, so per-leaf factors
give the three one number. To compare with the paper's query/key spikes we also report the
factors the same rule gives when the `c_attn` kernel's q, k and v column blocks are
counted as three leaves (gradients split by columns, everything else unchanged), on the
model's own scale (`1/sqrt(G)` over the same normalising mean as the real leaves).

Memory: each batch's gradient is accumulated over micro-batches of `--micro-batch`
sequences (XLA's CPU attention materialises every `seq_len x seq_len` score matrix: 8 x 1024
tokens of GPT-2 124M need ~26 GB at once), and it never leaves the device; only each leaf's
mean |g| comes back, and `init_grad_scales` is fed per-batch trees of zero-stride NumPy views
of those means (mean of a constant leaf = the constant), so T batches cost one gradient's
memory.

Usage (the numbers in docs/init_grad_gpt2.md):
    PYTHONPATH=. python benchmarks/init_grad_gpt2.py --batches 3 --batch-size 8 \
        --out docs/init_grad_gpt2_byte.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import llr_optax
from models import GPT2_PRESETS, create_model, model_config
from train import data as data_lib

PAPER = {"embed": 2.74, "pos_embed": 0.66}  # init-grad paper, section 5.3 (124M GPT-2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gpt2-124m", choices=sorted(GPT2_PRESETS))
    p.add_argument("--batches", type=int, default=10, help="T minibatches (paper: 100)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
    p.add_argument("--micro-batch", type=int, default=1,
                   help="sequences per forward/backward pass (memory); must divide --batch-size")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--tokenizer", default="byte", choices=("byte", "sentencepiece"))
    p.add_argument("--vocab-size", type=int, default=None,
                   help="sentencepiece vocabulary to train on the corpus")
    p.add_argument("--model-vocab", type=int, default=None,
                   help="rows of the embedding table (default: the tokenizer's vocab); "
                        "e.g. 50257 for GPT-2's table size")
    p.add_argument("--biases", action="store_true",
                   help="GPT-2 with biases (default: the paper's bias-free variant)")
    p.add_argument("--rule", default="paper", choices=("paper", "kernels"),
                   help="fan_in_init rule: the paper's, or kernels only (embeddings keep "
                        "GPT-2's 0.02 init)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write all factors to this JSON file")
    p.add_argument("--report", default=None, metavar="JSON",
                   help="only print the tables of a JSON file written by --out")
    args = p.parse_args(argv)
    if args.batches < 1 or args.batch_size < 1 or args.seq_len < 2:
        p.error("--batches, --batch-size must be >= 1 and --seq-len >= 2")
    if args.micro_batch < 1 or args.batch_size % args.micro_batch:
        p.error(f"--micro-batch {args.micro_batch} must divide --batch-size {args.batch_size}")
    return args


def split_qkv(means: dict[str, float], sizes: dict[str, int], qkv_means: dict) -> tuple:
    """The leaf table with every c_attn kernel replaced by its q, k and v blocks."""
    m, n = {}, {}
    for path, value in means.items():
        if path in qkv_means:
            for part, v in zip("qkv", qkv_means[path]):
                m[f"{path}[{part}]"], n[f"{path}[{part}]"] = v, sizes[path] // 3
        else:
            m[path], n[path] = value, sizes[path]
    return m, n


def factors(batch_means: list[dict[str, float]], sizes: dict[str, int]) -> dict[str, float]:
    """`init_grad_scales` on per-batch trees of constant (zero-stride) leaves."""
    trees = [{k: np.broadcast_to(np.float32(v), (sizes[k],)) for k, v in means.items()}
             for means in batch_means]
    return {k: float(v) for k, v in llr_optax.init_grad_scales(trees).items()}


def reference_factors(batch_means, sizes) -> dict[str, float]:
    """SPEC.md section 3 steps 2-4 in float64, as a cross-check of the library call."""
    g = {k: sum(m[k] for m in batch_means) for k in sizes}
    u = {k: 1 / np.sqrt(g[k]) for k in sizes}
    mean = sum(sizes[k] * u[k] for k in sizes) / sum(sizes.values())
    return {k: u[k] / mean for k in sizes}


def module_of(path: str, label: str) -> str:
    """Row of the summary table: the label, with LayerNorm scales told apart."""
    if label == "norm":
        return "ln_f" if path.startswith("ln_f") else path.split("/")[2]  # ln_1 / ln_2
    if path.endswith("]"):
        return f"attn {path[-2]} (c_attn block)"
    return label


_ORDER = ("embed", "pos_embed", "attn q (c_attn block)", "attn k (c_attn block)",
          "attn v (c_attn block)", "attn_qkv", "attn_o", "mlp_up", "mlp_down", "ln_1", "ln_2",
          "ln_f", "bias")
_LAYER_COLUMNS = (("q", "attn/c_attn/kernel[q]"), ("k", "attn/c_attn/kernel[k]"),
                  ("v", "attn/c_attn/kernel[v]"), ("c_attn", "attn/c_attn/kernel"),
                  ("attn c_proj", "attn/c_proj/kernel"), ("c_fc", "mlp/c_fc/kernel"),
                  ("mlp c_proj", "mlp/c_proj/kernel"), ("ln_1", "ln_1/scale"),
                  ("ln_2", "ln_2/scale"))


def report(result: dict) -> str:
    """Markdown: the run, a per-module summary beside the paper, and a per-layer table."""
    args, per_leaf, split = result["args"], result["factors"], result["factors_qkv_split"]
    # Splitting c_attn changes the normalising mean, which rescales every factor by one
    # constant; undo it, so that q/k/v are on the same scale as the model's own factors.
    rescale = float(np.median([per_leaf[k] / split[k] for k in per_leaf if k in split]))
    split = {k: v * rescale for k, v in split.items() if k.endswith("]")}
    rows = defaultdict(list)
    for path, value in per_leaf.items():
        rows[module_of(path, result["labels"][path])].append(value)
    for path, value in split.items():
        rows[module_of(path, "attn_qkv")].append(value)
    check = result.get("library_vs_reference")
    lines = [f"{args['preset']} (bias={args['biases']}, fan_in_init rule "
             f"{args.get('rule', 'paper')}), T={args['batches']} batches x "
             f"{args['batch_size']} x {args['seq_len']} tokens, tokenizer {args['tokenizer']} "
             f"(vocab {result['vocab']}, embedding table {result['table_rows']} rows)"
             + ("" if check is None else f"; library vs float64 reference: {check:.1e}"),
             "", "| module | leaves | mean | min | max | paper |", "|---|---|---|---|---|---|"]
    for name in sorted(rows, key=lambda r: _ORDER.index(r) if r in _ORDER else len(_ORDER)):
        values = rows[name]
        lines.append(f"| {name} | {len(values)} | {np.mean(values):.3f} | {min(values):.3f} | "
                     f"{max(values):.3f} | {PAPER.get(name, '')} |")
    both = {**per_leaf, **split}
    layers = sorted({int(p.split("/")[1]) for p in per_leaf if p.startswith("h/")})
    lines += ["", "| layer | " + " | ".join(c for c, _ in _LAYER_COLUMNS) + " |",
              "|---" * (len(_LAYER_COLUMNS) + 1) + "|"]
    for i in layers:
        cells = [f"{both[f'h/{i}/{suffix}']:.2f}" if f"h/{i}/{suffix}" in both else "-"
                 for _, suffix in _LAYER_COLUMNS]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        try:
            with open(args.report, encoding="utf-8") as f:
                print(report(json.load(f)))
        except (OSError, ValueError, KeyError) as e:
            print(f"init_grad_gpt2.py: cannot report {args.report!r}: {e!r}", file=sys.stderr)
            return 2
        return 0
    t0 = time.perf_counter()
    data = data_lib.build_data(data_lib.DataConfig(
        tokenizer=args.tokenizer, vocab_size=args.vocab_size, seq_len=args.seq_len,
        batch_size=args.batch_size, seed=args.seed, num_threads=0))
    vocab = args.model_vocab or data.vocab_size
    if vocab < data.vocab_size:
        raise SystemExit(f"--model-vocab {vocab} < tokenizer vocab {data.vocab_size}")
    cfg = model_config(args.preset, vocab, args.seq_len, use_bias=args.biases)
    model = create_model(cfg, rngs=nnx.Rngs(args.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    measuring = llr_optax.fan_in_init(params, jax.random.key(args.seed), rule=args.rule)
    del model, params
    labels = llr_optax.label_params(measuring)
    flat = jax.tree_util.tree_flatten_with_path(measuring)[0]
    paths = [llr_optax._labels.path_to_str(p) for p, _ in flat]  # pylint: disable=protected-access
    label_of = dict(zip(paths, jax.tree.leaves(labels)))
    sizes = {p: int(np.size(x)) for p, (_, x) in zip(paths, flat)}
    qkv_paths = [p for p in paths if p.endswith("c_attn/kernel")]
    print(f"{data.summary()}\nmodel {args.preset} (vocab {vocab}, bias={args.biases}): "
          f"{sum(sizes.values()):,} parameters; setup {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)

    @jax.jit
    def add_grad(p, acc, micro):
        """acc + (loss, gradient) of the summed token losses of one micro-batch."""
        def loss(q):
            logits = nnx.merge(graphdef, q)(micro["inputs"])
            return optax.softmax_cross_entropy_with_integer_labels(
                logits, micro["targets"]).sum()
        value, grads = jax.value_and_grad(loss)(p)
        return jax.tree.map(jnp.add, acc, (value, grads))

    @jax.jit
    def mean_abs(acc, num_tokens):
        """Per-leaf mean |g| of the batch-mean gradient, and of c_attn's q/k/v blocks."""
        value, grads = jax.tree.map(lambda x: x / num_tokens, acc)
        leaves = jax.tree.leaves(grads)
        means = [jnp.mean(jnp.abs(g)) for g in leaves]
        qkv = [jnp.mean(jnp.abs(g.reshape(g.shape[0], 3, -1)), axis=(0, 2))
               for path, g in zip(paths, leaves) if path.endswith("c_attn/kernel")]
        return value, means, qkv

    def mean_abs_grads(p, batch):
        acc = jax.tree.map(jnp.zeros_like, (jnp.zeros((), jnp.float32), p))
        for i in range(0, args.batch_size, args.micro_batch):
            micro = {k: v[i:i + args.micro_batch] for k, v in batch.items()}
            acc = add_grad(p, acc, micro)
        return mean_abs(acc, args.batch_size * args.seq_len)

    batch_means, batch_split, losses = [], [], []
    it = data.train_iter()
    for t in range(args.batches):
        start = time.perf_counter()
        batch = {k: jnp.asarray(v) for k, v in next(it).items()}
        loss, means, qkv = mean_abs_grads(measuring, batch)
        means = dict(zip(paths, map(float, means)))
        qkv = {p: [float(v) for v in q] for p, q in zip(qkv_paths, qkv)}
        batch_means.append(means)
        batch_split.append(split_qkv(means, sizes, qkv)[0])
        losses.append(float(loss))
        print(f"batch {t + 1}/{args.batches}: loss {loss:.3f} at init, "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr)

    per_leaf = factors(batch_means, sizes)
    ref = reference_factors(batch_means, sizes)
    worst = max(abs(per_leaf[k] / ref[k] - 1) for k in ref)
    split_sizes = split_qkv(batch_means[0], sizes, {p: [0, 0, 0] for p in qkv_paths})[1]
    per_leaf_split = factors(batch_split, split_sizes)

    result = {"args": vars(args), "vocab": data.vocab_size, "table_rows": vocab,
              "loss_at_init": losses, "library_vs_reference": worst, "factors": per_leaf,
              "factors_qkv_split": per_leaf_split, "labels": label_of, "sizes": sizes}
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}", file=sys.stderr)
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
