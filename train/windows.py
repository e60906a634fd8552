"""Token streams -> training windows and batches (grain), and validation passes.

A *token stream* is anything with ``len()`` and slicing to an integer array: a NumPy
array held in memory, or :class:`train.shards.ShardedTokens` over memory-mapped shards
on disk. Nothing here reads more of a stream than the windows it is asked for, so a
prepared corpus larger than memory streams in constant memory.

Windows: the stream is cut into windows of ``seq_len + 1`` tokens with stride
``seq_len`` (``inputs = w[:-1]``, ``targets = w[1:]``). Consecutive windows share their
boundary token (the last target of one window is the first input of the next), so every
token of the stream except the first is a target exactly once and nothing is duplicated
or lost between windows.

Training: a grain ``MapDataset`` over window indices. Each process takes a contiguous
block of ``n // shard_count`` windows (so it only ever reads its own part of the
stream, on disk its own byte range), shuffles it with a seeded permutation, reshuffled
each epoch, and batches it (drop remainder). The iterator is checkpointable
(``get_state``/``set_state``, or orbax through :func:`save_iterator_args` /
:func:`restore_iterator_args`).

Validation: one deterministic, unshuffled pass over all windows; the last window and
last batch are padded and a ``mask`` marks the real targets, so an evaluation covers
the whole split exactly once.

Orbax checkpointing of the training iterator (grain registers its own handler)::

    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=save_iterator_args(it)))
    it = data.train_iter()
    mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=restore_iterator_args(it)))
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Protocol

import grain
import numpy as np

from train.errors import UserError

__all__ = [
    "TokenStream",
    "bits_per_byte",
    "check_seq_len",
    "num_val_batches",
    "num_windows",
    "restore_iterator_args",
    "save_iterator_args",
    "train_dataset",
    "val_batches",
    "window",
]


class TokenStream(Protocol):
    """A 1-D sequence of token ids that can be sliced without reading the rest of it."""

    def __len__(self) -> int:
        ...

    def __getitem__(self, index: slice) -> np.ndarray:
        ...


def num_windows(num_tokens: int, seq_len: int) -> int:
    """Number of complete training windows (``seq_len`` targets each) in a stream."""
    return max(0, (num_tokens - 1) // seq_len)


def window(stream: TokenStream, index: int, seq_len: int) -> dict[str, np.ndarray]:
    """The ``index``-th window: ``stream[index*T : index*T + T + 1]`` split in two.

    Args:
      stream: The token stream.
      index: Window index in ``[0, num_windows(len(stream), seq_len))``.
      seq_len: ``T``.

    Returns:
      ``{"inputs": int32[T], "targets": int32[T]}`` with targets = inputs shifted by one.
    """
    start = index * seq_len
    w = np.asarray(stream[start : start + seq_len + 1], np.int32)
    return {"inputs": w[:-1], "targets": w[1:]}


class _Window:
    """Picklable map function: window index -> window (grain may copy transforms)."""

    def __init__(self, stream: TokenStream, seq_len: int):
        self.stream = stream
        self.seq_len = seq_len

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        return window(self.stream, int(index), self.seq_len)


def check_seq_len(num_tokens: int, seq_len: int, what: str) -> None:
    """Raises a ``UserError`` if a stream of ``num_tokens`` holds no window."""
    if num_tokens < seq_len + 1:
        raise UserError(
            f"seq_len={seq_len} is too long for the {what}: a window needs seq_len + 1 = "
            f"{seq_len + 1} tokens but only {num_tokens} tokens are available")


def train_dataset(
    stream: TokenStream,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """The training pipeline: windows -> this process's block -> shuffle -> repeat -> batch.

    Process ``shard_index`` keeps windows ``[shard_index * m, (shard_index + 1) * m)``
    with ``m = num_windows // shard_count`` (the remainder is dropped so every process
    has the same number of steps per epoch). The shuffle is a seeded permutation of
    that block, reshuffled each epoch; batches may straddle epochs.

    Args:
      stream: Training tokens (a token stream, see the module docstring).
      seq_len: Tokens per example.
      batch_size: Examples per batch (per process); the remainder is dropped.
      seed: Shuffle seed in ``[0, 2**32)``.
      num_epochs: Passes over the data; ``None`` repeats forever.
      shard_index: This process's shard.
      shard_count: Number of shards (processes).
      read_options: grain prefetch threads/buffer; default one background thread.

    Returns:
      A grain ``IterDataset`` of ``{"inputs", "targets"}: int32[batch_size, seq_len]``;
      ``iter()`` on it gives a checkpointable ``grain.DatasetIterator``.
    """
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"Need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    check_seq_len(len(stream), seq_len, "training split")
    n = num_windows(len(stream), seq_len)
    n_per_shard = n // shard_count
    if n_per_shard == 0:
        raise UserError(
            f"The training split has {n} windows of seq_len={seq_len} "
            f"({len(stream)} tokens), fewer than shard_count={shard_count}")
    first = shard_index * n_per_shard
    ds = grain.MapDataset.range(first, first + n_per_shard)
    ds = ds.shuffle(seed=seed).repeat(num_epochs)
    ds = ds.map(_Window(stream, seq_len)).batch(batch_size, drop_remainder=True)
    if read_options is None:
        # One background thread is plenty for slicing arrays and leaves the (few, on a
        # laptop) cores to the training step.
        read_options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=8)
    return ds.to_iter_dataset(read_options)


def num_val_batches(num_tokens: int, *, seq_len: int, batch_size: int,
                    shard_count: int = 1) -> int:
    """Batches one process gets from :func:`val_batches`."""
    n_windows = max(0, math.ceil((num_tokens - 1) / seq_len))
    return math.ceil(math.ceil(n_windows / batch_size) / shard_count)


def val_batches(
    stream: TokenStream,
    *,
    seq_len: int,
    batch_size: int,
    shard_index: int = 0,
    shard_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """One deterministic pass over ALL validation windows, padded, with a mask.

    Windows are laid out as in training (stride ``seq_len``), plus a final partial
    window when ``(len - 1)`` is not a multiple of ``seq_len``; the last batch is
    filled with empty windows. ``mask`` is 1.0 exactly on real targets, so summing
    masked losses over the pass counts every token of the stream except the first
    exactly once. With several shards, batches are dealt round-robin and every shard
    gets the same number of batches (extra ones fully masked), as collective
    evaluation steps require. Only the windows of this shard's batches are read.

    Args:
      stream: Validation tokens (a token stream).
      seq_len: Tokens per example.
      batch_size: Examples per batch.
      shard_index: This process's shard.
      shard_count: Number of shards.

    Yields:
      ``{"inputs": int32[B, T], "targets": int32[B, T], "mask": float32[B, T]}``;
      padded positions hold id 0 and mask 0.
    """
    n = len(stream)
    per_shard = num_val_batches(n, seq_len=seq_len, batch_size=batch_size,
                                shard_count=shard_count)
    for k in range(per_shard):
        b = shard_index + k * shard_count
        inputs = np.zeros((batch_size, seq_len), np.int32)
        targets = np.zeros((batch_size, seq_len), np.int32)
        mask = np.zeros((batch_size, seq_len), np.float32)
        for row in range(batch_size):
            start = (b * batch_size + row) * seq_len
            if start >= n - 1:
                break  # this and later rows hold no target
            w = np.asarray(stream[start : start + seq_len + 1], np.int32)
            m = len(w) - 1
            inputs[row, :m], targets[row, :m], mask[row, :m] = w[:-1], w[1:], 1.0
        yield {"inputs": inputs, "targets": targets, "mask": mask}


def save_iterator_args(it: grain.DatasetIterator) -> Any:
    """Orbax ``args`` that save a grain iterator's position (one JSON per process).

    Use inside ``ocp.args.Composite(..., data=save_iterator_args(it))``.
    """
    return grain.checkpoint.CheckpointSave(it)


def restore_iterator_args(it: grain.DatasetIterator) -> Any:
    """Orbax ``args`` that restore a saved position into ``it`` (in place).

    ``it`` must come from the same pipeline (same data and config), e.g. a fresh
    ``data.train_iter()``.
    """
    return grain.checkpoint.CheckpointRestore(it)


def bits_per_byte(total_nats: float, num_bytes: int) -> float:
    """Converts a summed cross-entropy (nats) over some text to bits per UTF-8 byte."""
    if num_bytes <= 0:
        raise ValueError(f"num_bytes must be positive, got {num_bytes}")
    return float(total_nats) / (math.log(2.0) * num_bytes)
