"""Data pipeline of the trainer: corpus -> tokens -> packed windows -> batches.

Pipeline (:func:`build_data` runs it from a :class:`DataConfig`):

1. **Documents.** The offline default corpus (:func:`train.corpus.load_default_corpus`)
   or user data: ``.txt``/``.jsonl``/directory of ``.txt`` (documents), or ``.npy``
   (an already tokenised 1-D stream of ids).
2. **Split by document** into train/validation (:func:`split_documents`): a document is
   in exactly one split, chosen by a seeded hash of its text, so the split does not
   depend on document order nor on the training seed.
3. **Tokenise** (:class:`ByteTokenizer` by default, or :class:`SentencePieceTokenizer`
   trained on the train split) and concatenate each split into one stream, each
   document followed by the EOS id (:func:`encode_documents`).
4. **Pack** each stream into windows of ``seq_len + 1`` tokens with stride ``seq_len``
   (``inputs = w[:-1]``, ``targets = w[1:]``). Consecutive windows share their boundary
   token (the last target of one window is the first input of the next), so every
   token of the stream except the first is a target exactly once and nothing is
   duplicated or lost between windows.
5. **Batches.** Training: a grain ``MapDataset`` over window indices, sharded per
   process, shuffled, repeated, batched (drop remainder); its iterator is
   checkpointable (``get_state``/``set_state``, or orbax through
   :func:`save_iterator_args`/:func:`restore_iterator_args`). Validation: one
   deterministic, unshuffled pass over all windows; the last window and last batch
   are padded and a ``mask`` marks the real targets, so an evaluation covers the
   whole split exactly once.

Orbax checkpointing of the training iterator (grain registers its own handler)::

    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=save_iterator_args(it)))
    it = data.train_iter()
    mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=restore_iterator_args(it)))

Bits per byte over validation: ``bpb = total_nats / (ln 2 * data.val_bytes)``, where
``total_nats`` is the summed (masked) cross-entropy over all validation targets; see
:meth:`Data.bits_per_byte`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import grain
import numpy as np

from train import corpus as corpus_lib

__all__ = [
    "ByteTokenizer",
    "Data",
    "DataConfig",
    "SentencePieceTokenizer",
    "TOKENIZERS",
    "Tokenizer",
    "bits_per_byte",
    "build_data",
    "encode_documents",
    "get_tokenizer",
    "load_documents",
    "num_windows",
    "restore_iterator_args",
    "save_iterator_args",
    "split_documents",
    "train_dataset",
    "val_batches",
    "window",
]

# Re-exported so the trainer needs a single import for user data.
load_documents = corpus_lib.load_documents

TOKENIZERS = ("byte", "sentencepiece")
_TOKENIZER_ALIASES = {"byte": "byte", "bytes": "byte", "sentencepiece": "sentencepiece",
                      "spm": "sentencepiece"}
DEFAULT_SPM_VOCAB_SIZE = 2048


# --------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------


@runtime_checkable
class Tokenizer(Protocol):
    """What the pipeline needs from a tokenizer.

    Attributes:
      name: Short name (``"byte"``, ``"sentencepiece"``).
      vocab_size: Number of token ids (ids lie in ``[0, vocab_size)``).
      eos_id: The end-of-document id appended after every document.
      token_bytes: ``int64[vocab_size]``, the number of UTF-8 bytes of text each id
        stands for (0 for special ids such as EOS); used for bits-per-byte.
    """

    name: str
    vocab_size: int
    eos_id: int
    token_bytes: np.ndarray

    def encode(self, text: str) -> np.ndarray:
        """Text -> ``int32[n]`` ids (no EOS appended)."""
        ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Ids -> text; special ids (EOS) are skipped."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, id 256 is EOS (vocab size 257).

    No training, no dependency, and bits-per-byte is exact: every non-EOS token is one
    byte of text.
    """

    name = "byte"
    eos_id = 256
    vocab_size = 257

    def __init__(self) -> None:
        self.token_bytes = np.ones(self.vocab_size, np.int64)
        self.token_bytes[self.eos_id] = 0

    def encode(self, text: str) -> np.ndarray:
        """Returns the UTF-8 bytes of ``text`` as ``int32`` ids."""
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Decodes byte ids; EOS is skipped, invalid UTF-8 becomes U+FFFD.

        Sampled sequences can cut a multi-byte character, hence ``errors="replace"``.
        """
        ids = np.asarray(ids, np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"Byte tokenizer ids must lie in [0, {self.vocab_size})")
        return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257, eos_id=256)"


def _import_sentencepiece():
    try:
        import sentencepiece  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ImportError(
            "The 'sentencepiece' tokenizer needs the optional sentencepiece package: "
            "pip install 'llr-optax[sentencepiece]'  (or use tokenizer='byte')"
        ) from e
    return sentencepiece


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llr_optax" / "sentencepiece"


# Bump when the training options below change, so stale cached models are not reused.
_SPM_OPTIONS_VERSION = 1
# SentencePiece skips training "sentences" longer than this many bytes; feed it lines.
_SPM_MAX_SENTENCE_BYTES = 16384


class SentencePieceTokenizer:
    """A SentencePiece unigram model trained locally on the training documents.

    Trained with byte fallback (any text is encodable, no ``<unk>`` in practice) and
    identity normalisation (the text is tokenised as is, so byte counts are faithful).
    Ids: 0 = ``<unk>``, 1 = ``</s>`` (EOS), then byte pieces and learned pieces.

    ``token_bytes`` counts the word-boundary marker ``▁`` as one byte (a space); the
    dummy-prefix space SentencePiece adds at the start of each document is therefore
    counted once per document, a negligible overestimate of the byte count.

    Args:
      model_path: A trained ``.model`` file.
    """

    name = "sentencepiece"

    def __init__(self, model_path: str | os.PathLike):
        spm = _import_sentencepiece()
        self.model_path = Path(model_path)
        self._sp = spm.SentencePieceProcessor(model_file=str(self.model_path))
        self.vocab_size = int(self._sp.get_piece_size())
        self.eos_id = int(self._sp.eos_id())
        if self.eos_id < 0:
            raise ValueError(f"SentencePiece model {self.model_path} has no EOS id")
        self.token_bytes = np.array(
            [self._piece_bytes(i) for i in range(self.vocab_size)], np.int64
        )

    def _piece_bytes(self, i: int) -> int:
        sp = self._sp
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            return 0
        if sp.is_byte(i):
            return 1
        return len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))

    @classmethod
    def train(
        cls,
        documents: Sequence[str],
        vocab_size: int,
        *,
        cache_dir: str | os.PathLike | None = None,
    ) -> SentencePieceTokenizer:
        """Trains a model on ``documents``, or loads it from the cache.

        The cache file name is keyed by a hash of the documents, the vocab size and
        the training options, so a different corpus or size never reuses a model.

        Args:
          documents: Training documents (pass the train split only, so that the
            validation text does not shape the vocabulary).
          vocab_size: Requested vocabulary size (at least ~300: the 256 byte pieces
            are always part of it). For a tiny corpus the model may come out smaller.
          cache_dir: Where models are cached; defaults to
            ``$XDG_CACHE_HOME/llr_optax/sentencepiece`` (``~/.cache/...``).

        Returns:
          The tokenizer.
        """
        spm = _import_sentencepiece()
        if vocab_size < 300:
            raise ValueError(
                f"sentencepiece vocab_size must be >= 300 (256 byte pieces are always "
                f"included), got {vocab_size}"
            )
        cache = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
        digest = hashlib.sha256(f"spm-v{_SPM_OPTIONS_VERSION}-{vocab_size}\0".encode())
        for doc in documents:
            digest.update(doc.encode("utf-8"))
            digest.update(b"\0")
        path = cache / f"spm-{vocab_size}-{digest.hexdigest()[:16]}.model"
        if not path.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            model = io.BytesIO()
            spm.SentencePieceTrainer.train(
                sentence_iterator=_spm_lines(documents),
                model_writer=model,
                vocab_size=vocab_size,
                model_type="unigram",
                byte_fallback=True,
                character_coverage=0.9995,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                unk_id=0, eos_id=1, bos_id=-1, pad_id=-1,
                hard_vocab_limit=False,  # tiny corpora: fewer pieces rather than an error
                max_sentence_length=_SPM_MAX_SENTENCE_BYTES,
                input_sentence_size=2_000_000,
                shuffle_input_sentence=True,
                num_threads=os.cpu_count() or 1,
                minloglevel=2,
            )
            # Atomic publish: a concurrent run never reads a half-written model.
            fd, tmp = tempfile.mkstemp(dir=cache, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(model.getvalue())
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache may be shared
            os.replace(tmp, path)
        return cls(path)

    def encode(self, text: str) -> np.ndarray:
        """Returns the ids of ``text`` as ``int32``."""
        return np.asarray(self._sp.encode(text, out_type=int), np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encodes many texts at once (multi-threaded inside SentencePiece)."""
        return [np.asarray(ids, np.int32) for ids in self._sp.encode(list(texts), out_type=int)]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Decodes ids; EOS and other control ids are skipped."""
        ids = [int(i) for i in np.asarray(ids).ravel() if int(i) != self.eos_id]
        return self._sp.decode(ids)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size})"


def _spm_lines(documents: Sequence[str]) -> Iterator[str]:
    """Non-empty lines of all documents (SentencePiece trains on 'sentences')."""
    for doc in documents:
        for line in doc.split("\n"):
            if line.strip():
                yield line


def get_tokenizer(
    name: str,
    *,
    documents: Sequence[str] | None = None,
    vocab_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Tokenizer:
    """Creates a tokenizer by name.

    Args:
      name: ``"byte"`` or ``"sentencepiece"`` (alias ``"spm"``).
      documents: Training documents; required for ``"sentencepiece"``.
      vocab_size: ``"byte"``: must be ``None`` or 257. ``"sentencepiece"``: the
        requested size (default 2048).
      cache_dir: SentencePiece model cache directory.

    Returns:
      The tokenizer.

    Raises:
      ValueError: Unknown name or inconsistent arguments.
      ImportError: ``sentencepiece`` requested but not installed.
    """
    kind = _TOKENIZER_ALIASES.get(str(name).lower())
    if kind is None:
        raise ValueError(f"Unknown tokenizer {name!r}; expected one of {TOKENIZERS}")
    if kind == "byte":
        if vocab_size not in (None, ByteTokenizer.vocab_size):
            raise ValueError(
                f"The byte tokenizer has vocab_size {ByteTokenizer.vocab_size}, "
                f"got vocab_size={vocab_size}"
            )
        return ByteTokenizer()
    if documents is None:
        raise ValueError("The sentencepiece tokenizer is trained on documents=, got None")
    return SentencePieceTokenizer.train(
        documents, vocab_size or DEFAULT_SPM_VOCAB_SIZE, cache_dir=cache_dir
    )


# --------------------------------------------------------------------------------------
# Split, encode, pack
# --------------------------------------------------------------------------------------


def _doc_rank_key(doc: str, seed: int) -> bytes:
    return hashlib.blake2b(doc.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()


def split_documents(
    documents: Sequence[str], val_fraction: float, *, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Splits documents into disjoint train/validation lists, deterministically.

    Documents are ranked by a seeded hash of their text and the
    ``round(val_fraction * n)`` lowest-ranked (at least one when ``val_fraction > 0``)
    go to validation. Hashing (rather than a permutation of positions) keeps the
    assignment of a document stable when documents are added, removed or reordered.
    Both outputs keep the input order.

    A single document cannot be split by document; it is cut at the line (else
    space) boundary nearest to the ``1 - val_fraction`` point of its text instead.

    Args:
      documents: The documents.
      val_fraction: Fraction of documents for validation, in ``[0, 1)``.
      seed: Split seed (independent of the training shuffle seed, so that runs with
        different training seeds are evaluated on the same text).

    Returns:
      ``(train_documents, val_documents)``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    docs = list(documents)
    if val_fraction == 0.0 or not docs:
        return docs, []
    if len(docs) == 1:
        return _split_single_document(docs[0], val_fraction)
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    ranked = sorted(range(len(docs)), key=lambda i: (_doc_rank_key(docs[i], seed), i))
    val_ids = set(ranked[:n_val])
    train = [d for i, d in enumerate(docs) if i not in val_ids]
    val = [d for i, d in enumerate(docs) if i in val_ids]
    return train, val


def _split_single_document(doc: str, val_fraction: float) -> tuple[list[str], list[str]]:
    cut = int(len(doc) * (1.0 - val_fraction))
    for sep in ("\n", " "):
        pos = doc.rfind(sep, 0, cut)
        if pos > 0:
            cut = pos
            break
    head, tail = doc[:cut].strip(), doc[cut:].strip()
    return ([head] if head else []), ([tail] if tail else [])


def encode_documents(documents: Sequence[str], tokenizer: Tokenizer) -> np.ndarray:
    """Tokenises documents into one ``int32`` stream, each followed by ``eos_id``.

    The EOS after every document (including the last) marks the boundary the model
    sees when windows straddle two documents.

    Args:
      documents: The documents.
      tokenizer: The tokenizer.

    Returns:
      ``int32[total_tokens]``.
    """
    if hasattr(tokenizer, "encode_batch"):
        encoded = tokenizer.encode_batch(documents)
    else:
        encoded = [tokenizer.encode(d) for d in documents]
    eos = np.array([tokenizer.eos_id], np.int32)
    parts = []
    for ids in encoded:
        parts += [np.asarray(ids, np.int32), eos]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def num_windows(num_tokens: int, seq_len: int) -> int:
    """Number of complete training windows (``seq_len`` targets each) in a stream."""
    return max(0, (num_tokens - 1) // seq_len)


def window(stream: np.ndarray, index: int, seq_len: int) -> dict[str, np.ndarray]:
    """The ``index``-th window: ``stream[index*T : index*T + T + 1]`` split in two.

    Args:
      stream: The token stream.
      index: Window index in ``[0, num_windows(len(stream), seq_len))``.
      seq_len: ``T``.

    Returns:
      ``{"inputs": int32[T], "targets": int32[T]}`` with targets = inputs shifted by one.
    """
    start = index * seq_len
    w = stream[start : start + seq_len + 1]
    return {"inputs": w[:-1], "targets": w[1:]}


class _Window:
    """Picklable map function: window index -> window (grain may copy transforms)."""

    def __init__(self, stream: np.ndarray, seq_len: int):
        self.stream = stream
        self.seq_len = seq_len

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        return window(self.stream, int(index), self.seq_len)


def _check_seq_len(num_tokens: int, seq_len: int, what: str) -> None:
    if num_tokens < seq_len + 1:
        raise ValueError(
            f"seq_len={seq_len} is too long for the {what}: a window needs seq_len + 1 = "
            f"{seq_len + 1} tokens but only {num_tokens} tokens are available"
        )


def train_dataset(
    stream: np.ndarray,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """The training pipeline: windows -> shard -> shuffle -> repeat -> batch.

    Each process keeps windows ``shard_index::shard_count`` of the stream (after
    truncating the window count to a multiple of ``shard_count`` so every process
    has the same number of steps per epoch). The shuffle is a seeded global
    permutation, reshuffled each epoch; batches may straddle epochs.

    Args:
      stream: Training tokens.
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
    _check_seq_len(len(stream), seq_len, "training split")
    n = num_windows(len(stream), seq_len)
    n_per_shard = n // shard_count
    if n_per_shard == 0:
        raise ValueError(
            f"The training split has {n} windows of seq_len={seq_len} "
            f"({len(stream)} tokens), fewer than shard_count={shard_count}"
        )
    ds = grain.MapDataset.range(n_per_shard * shard_count)[shard_index::shard_count]
    ds = ds.shuffle(seed=seed).repeat(num_epochs)
    ds = ds.map(_Window(stream, seq_len)).batch(batch_size, drop_remainder=True)
    if read_options is None:
        # One background thread is plenty for slicing numpy arrays and leaves the
        # (few, on a laptop) cores to the training step.
        read_options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=8)
    return ds.to_iter_dataset(read_options)


def val_batches(
    stream: np.ndarray,
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
    evaluation steps require.

    Args:
      stream: Validation tokens.
      seq_len: Tokens per example.
      batch_size: Examples per batch.
      shard_index: This process's shard.
      shard_count: Number of shards.

    Yields:
      ``{"inputs": int32[B, T], "targets": int32[B, T], "mask": float32[B, T]}``;
      padded positions hold id 0 and mask 0.
    """
    n = len(stream)
    n_windows = max(0, math.ceil((n - 1) / seq_len))
    n_batches = math.ceil(n_windows / batch_size)
    per_shard = math.ceil(n_batches / shard_count)
    padded = np.concatenate([np.asarray(stream, np.int32), np.zeros(1, np.int32)])
    offsets = np.arange(seq_len)
    for k in range(per_shard):
        b = shard_index + k * shard_count
        starts = (b * batch_size + np.arange(batch_size)) * seq_len
        pos = starts[:, None] + offsets[None, :]  # input positions in the stream
        mask = pos + 1 < n
        inputs = np.where(mask, padded[np.minimum(pos, n)], 0).astype(np.int32)
        targets = np.where(mask, padded[np.minimum(pos + 1, n)], 0).astype(np.int32)
        yield {"inputs": inputs, "targets": targets, "mask": mask.astype(np.float32)}


# --------------------------------------------------------------------------------------
# Orbax checkpointing of the training iterator
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Configuration of :func:`build_data`.

    Attributes:
      source: ``"default"`` (offline Wikipedia sample, or pydoc topics without
        gensim), or a path: ``.txt``/``.text``/``.md`` (documents separated by blank
        lines), ``.jsonl``, a directory of ``.txt`` files, or ``.npy`` token ids.
      tokenizer: ``"byte"`` or ``"sentencepiece"`` (ignored for ``.npy``).
      vocab_size: SentencePiece vocab size; for ``.npy`` the vocab size (default
        ``max id + 1``); must be ``None``/257 for ``"byte"``.
      seq_len: Tokens per example (``T``).
      batch_size: Training examples per batch (per process).
      val_batch_size: Validation batch size; defaults to ``batch_size``.
      val_fraction: Fraction of documents (of tokens for ``.npy``) for validation.
      seed: Training shuffle seed.
      split_seed: Train/validation split seed (kept separate from ``seed`` so every
        run evaluates on the same validation text).
      num_epochs: Training passes; ``None`` repeats forever.
      text_field: JSONL field with the document text.
      min_doc_chars: Drop default-corpus articles shorter than this.
      cache_dir: SentencePiece model cache directory (default ``~/.cache/llr_optax``).
      shard_index: This process's shard; default ``jax.process_index()``.
      shard_count: Number of shards; default ``jax.process_count()``.
      num_threads: grain prefetch threads for training batches (0 = synchronous).
      prefetch_buffer_size: grain prefetch buffer (batches).
    """

    source: str = "default"
    tokenizer: str = "byte"
    vocab_size: int | None = None
    seq_len: int = 128
    batch_size: int = 16
    val_batch_size: int | None = None
    val_fraction: float = 0.05
    seed: int = 0
    split_seed: int = 0
    num_epochs: int | None = None
    text_field: str = "text"
    min_doc_chars: int = corpus_lib.DEFAULT_MIN_DOC_CHARS
    cache_dir: str | None = None
    shard_index: int | None = None
    shard_count: int | None = None
    num_threads: int = 1
    prefetch_buffer_size: int = 8

    def __post_init__(self):
        for name in ("seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.val_batch_size is not None and self.val_batch_size < 1:
            raise ValueError(f"val_batch_size must be >= 1, got {self.val_batch_size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in [0, 1), got {self.val_fraction}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be None or >= 1, got {self.num_epochs}")
        if str(self.tokenizer).lower() not in _TOKENIZER_ALIASES:
            # Checked here so a typo fails before the corpus is parsed.
            raise ValueError(f"Unknown tokenizer {self.tokenizer!r}; expected one of {TOKENIZERS}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must lie in [0, 2**32), got {self.seed}")


@dataclasses.dataclass(frozen=True, eq=False)
class Data:
    """Everything the trainer needs from the data (built by :func:`build_data`).

    Attributes:
      config: The configuration it was built from.
      corpus_name: Which corpus/file was used (report it).
      tokenizer: The tokenizer, or ``None`` for pre-tokenised ``.npy`` data.
      vocab_size: Model vocabulary size.
      eos_id: Document separator id, or ``None`` for ``.npy`` data.
      train_tokens: The training stream (``int32``).
      val_tokens: The validation stream (``int32``).
      val_bytes: UTF-8 bytes of text covered by the validation targets (EOS counts
        0), or ``None`` for ``.npy`` data.
      num_train_docs: Documents in the training split (``None`` for ``.npy``).
      num_val_docs: Documents in the validation split (``None`` for ``.npy``).
      shard_index: This process's shard.
      shard_count: Number of shards.
    """

    config: DataConfig
    corpus_name: str
    tokenizer: Tokenizer | None
    vocab_size: int
    eos_id: int | None
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    val_bytes: int | None
    num_train_docs: int | None
    num_val_docs: int | None
    shard_index: int = 0
    shard_count: int = 1

    @property
    def num_train_tokens(self) -> int:
        return int(len(self.train_tokens))

    @property
    def num_val_tokens(self) -> int:
        return int(len(self.val_tokens))

    @property
    def num_val_targets(self) -> int:
        """Validation tokens that are predicted (all but the first): sum of the mask."""
        return max(0, self.num_val_tokens - 1)

    @property
    def steps_per_epoch(self) -> int:
        """Training batches per pass over this process's shard."""
        n = num_windows(self.num_train_tokens, self.config.seq_len) // self.shard_count
        return n // self.config.batch_size

    @property
    def num_val_batches(self) -> int:
        """Batches yielded by :meth:`val_batches` (per process)."""
        bs = self.config.val_batch_size or self.config.batch_size
        n = math.ceil(max(0, self.num_val_tokens - 1) / self.config.seq_len)
        return math.ceil(math.ceil(n / bs) / self.shard_count)

    def train_dataset(self) -> grain.IterDataset:
        """The grain training pipeline (see :func:`train_dataset`)."""
        cfg = self.config
        return train_dataset(
            self.train_tokens,
            seq_len=cfg.seq_len,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            num_epochs=cfg.num_epochs,
            shard_index=self.shard_index,
            shard_count=self.shard_count,
            read_options=grain.ReadOptions(
                num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch_buffer_size
            ),
        )

    def train_iter(self) -> grain.DatasetIterator:
        """A fresh checkpointable iterator of training batches, from the start."""
        return iter(self.train_dataset())

    def val_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """A fresh deterministic pass over the whole validation split (see
        :func:`val_batches`); batches carry a float32 ``mask``."""
        cfg = self.config
        return val_batches(
            self.val_tokens,
            seq_len=cfg.seq_len,
            batch_size=cfg.val_batch_size or cfg.batch_size,
            shard_index=self.shard_index,
            shard_count=self.shard_count,
        )

    def bits_per_byte(self, total_nats: float) -> float:
        """Validation bits per byte from the masked loss summed over a full pass.

        From a mean loss per target instead, pass ``mean * data.num_val_targets``.
        """
        if self.val_bytes is None:
            raise ValueError("bits per byte is undefined for pre-tokenised (.npy) data")
        return bits_per_byte(total_nats, self.val_bytes)

    def summary(self) -> str:
        """One line for logs: corpus, tokenizer, sizes."""
        tok = self.tokenizer.name if self.tokenizer is not None else "pre-tokenised"
        docs = (
            f", docs train/val {self.num_train_docs}/{self.num_val_docs}"
            if self.num_train_docs is not None
            else ""
        )
        return (
            f"corpus: {self.corpus_name}; tokenizer: {tok} (vocab {self.vocab_size})"
            f"{docs}; tokens train/val {self.num_train_tokens:,}/{self.num_val_tokens:,}"
            + (f"; val bytes {self.val_bytes:,}" if self.val_bytes is not None else "")
        )


def _process_shard(cfg: DataConfig) -> tuple[int, int]:
    if cfg.shard_index is not None and cfg.shard_count is not None:
        index, count = cfg.shard_index, cfg.shard_count
    else:
        import jax  # pylint: disable=import-outside-toplevel

        index = jax.process_index() if cfg.shard_index is None else cfg.shard_index
        count = jax.process_count() if cfg.shard_count is None else cfg.shard_count
    if not 0 <= index < count:
        raise ValueError(f"Need 0 <= shard_index < shard_count, got {index}, {count}")
    return index, count


def _build_from_token_file(cfg: DataConfig, path: Path) -> dict[str, Any]:
    ids = corpus_lib.load_token_stream(path)
    max_id = int(ids.max())
    vocab_size = cfg.vocab_size if cfg.vocab_size is not None else max_id + 1
    if max_id >= vocab_size:
        raise ValueError(f"{str(path)!r} contains token id {max_id} >= vocab_size={vocab_size}")
    # No document boundaries: hold out the tail of the stream (contiguous, so no
    # window of one split overlaps the other).
    n_val = math.ceil(cfg.val_fraction * len(ids)) if cfg.val_fraction > 0 else 0
    return dict(
        corpus_name=f"{path} (pre-tokenised)",
        tokenizer=None,
        vocab_size=vocab_size,
        eos_id=None,
        train_tokens=ids[: len(ids) - n_val],
        val_tokens=ids[len(ids) - n_val :],
        val_bytes=None,
        num_train_docs=None,
        num_val_docs=None,
    )


def _build_from_documents(cfg: DataConfig) -> dict[str, Any]:
    if cfg.source == "default":
        corpus = corpus_lib.load_default_corpus(min_chars=cfg.min_doc_chars)
    else:
        corpus = corpus_lib.Corpus(
            name=str(cfg.source),
            documents=corpus_lib.load_documents(cfg.source, text_field=cfg.text_field),
        )
    train_docs, val_docs = split_documents(corpus.documents, cfg.val_fraction, seed=cfg.split_seed)
    tokenizer = get_tokenizer(
        cfg.tokenizer, documents=train_docs, vocab_size=cfg.vocab_size, cache_dir=cfg.cache_dir
    )
    val_tokens = encode_documents(val_docs, tokenizer)
    return dict(
        corpus_name=corpus.name,
        tokenizer=tokenizer,
        vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id,
        train_tokens=encode_documents(train_docs, tokenizer),
        val_tokens=val_tokens,
        # The first validation token is never a target, hence [1:].
        val_bytes=int(tokenizer.token_bytes[val_tokens[1:]].sum()),
        num_train_docs=len(train_docs),
        num_val_docs=len(val_docs),
    )


def build_data(cfg: DataConfig = DataConfig()) -> Data:
    """Loads, splits, tokenises and packs the data described by ``cfg``.

    Args:
      cfg: The configuration.

    Returns:
      The :class:`Data` (train iterator factory, validation passes, sizes).

    Raises:
      FileNotFoundError: ``cfg.source`` does not exist.
      ValueError: Unsupported or empty data, unknown tokenizer, or a ``seq_len``
        longer than the training split.
      ImportError: ``tokenizer="sentencepiece"`` without sentencepiece installed.
    """
    shard_index, shard_count = _process_shard(cfg)
    if cfg.source != "default" and Path(cfg.source).suffix.lower() in corpus_lib.NPY_SUFFIXES:
        fields = _build_from_token_file(cfg, Path(cfg.source))
    else:
        fields = _build_from_documents(cfg)
    _check_seq_len(len(fields["train_tokens"]), cfg.seq_len, "training split")
    return Data(config=cfg, shard_index=shard_index, shard_count=shard_count, **fields)
