"""A micro trainer setup shared by the trainer tests: one block of width 32 on ~150 KB of text.

Compilation dominates every trainer test, and one block has every kind of leaf.
"""

from __future__ import annotations

from pathlib import Path

MICRO = {"num_layers": 1, "hidden": 32, "intermediate": 64, "num_heads": 2}
# The same model on the command line (python -m train).
MICRO_FLAGS = ["--num-layers", "1", "--hidden", "32", "--intermediate", "64", "--num-heads",
               "2", "--seq-len", "32", "--batch-size", "4", "--val-batch-size", "4",
               "--eval-batches", "2", "--warmup-fraction", "0", "--lr", "1e-2"]


def write_corpus(path: Path) -> str:
    """A ~150 KB English text file (Python's own help topics), blank-line separated."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k].strip() for k in sorted(topics))[:150_000]
    path.write_text(text, encoding="utf-8")
    return str(path)


def micro_config(corpus: str, out_dir: Path, **overrides):
    """A TrainConfig that trains in about a second per step on two CPU cores."""
    from train.config import TrainConfig

    values = dict(
        preset="tiny", model_overrides=MICRO, seq_len=32, batch_size=4, steps=8, lr=1e-2,
        warmup_fraction=0.0, eval_every=1000, eval_batches=2, log_every=1,
        checkpoint_every=0, data=corpus, out_dir=str(out_dir), progress=False,
        interval=2, ramp_steps=1, active_fraction=1.0, init_grad_batches=2)
    return TrainConfig(**{**values, **overrides})
