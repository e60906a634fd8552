"""The trainer's data: a :class:`DataConfig` in, a :class:`Data` out (:func:`build_data`).

Three kinds of source, one result:

1. **A prepared corpus** (``python -m train.prepare``; a directory with ``index.json``):
   token shards on disk, already split and tokenised. Nothing is loaded: the train and
   validation streams are :class:`train.shards.ShardedTokens` read window by window,
   so memory does not grow with the corpus. The tokenizer and the validation split
   were fixed when it was prepared (another ``tokenizer`` or ``val_fraction`` is an
   error).
2. **Text held in memory**: the offline default corpus
   (:func:`train.default_corpus.load_default_corpus`) or a ``.txt``/``.jsonl``/
   ``.parquet`` file or directory (:mod:`train.corpus`). Documents are split into
   train/validation by a seeded hash of their text (:func:`train.split.split_documents`),
   tokenised (:mod:`train.tokenizers`: bytes, SentencePiece trained here, or a pretrained
   ``tokenizer_model``) and concatenated, each document followed by EOS.
3. **Token ids** in a ``.npy`` file: the last ``val_fraction`` of the ids is validation.

Either way the streams are cut into windows and batched by :mod:`train.windows`, and
:attr:`Data.fingerprint` records the content of the data (:mod:`train.fingerprint`).

Bits per byte over validation: ``bpb = total_nats / (ln 2 * data.val_bytes)``, where
``total_nats`` is the summed (masked) cross-entropy over all validation targets; see
:meth:`Data.bits_per_byte`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain
import numpy as np

from train import corpus as corpus_lib
from train import default_corpus, shards, split, tokenizers, windows
from train.errors import UserError
from train.fingerprint import make_fingerprint, stream_sha256
# The names the training loop uses, so it needs a single import for its data.
from train.windows import (  # noqa: F401  (re-exported)
    bits_per_byte,
    num_windows,
    restore_iterator_args,
    save_iterator_args,
    train_dataset,
    val_batches,
)

__all__ = [
    "Data",
    "DataConfig",
    "bits_per_byte",
    "build_data",
    "restore_iterator_args",
    "save_iterator_args",
    "train_dataset",
]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Configuration of :func:`build_data`.

    Attributes:
      source: ``"default"`` (offline Wikipedia sample, or pydoc topics without
        gensim), a prepared corpus directory (``python -m train.prepare``), or a path:
        ``.txt``/``.text``/``.md`` (documents separated by blank lines), ``.jsonl``,
        ``.parquet``, a directory of such files, or ``.npy`` token ids.
      tokenizer: ``"byte"`` or ``"sentencepiece"`` (trained here on the training
        documents); ignored for ``.npy`` and prepared corpora.
      tokenizer_model: A pretrained tokenizer file instead: a SentencePiece
        ``.model`` or a Hugging Face ``tokenizer.json``. For a prepared corpus, it must
        be the file the corpus was prepared with (checked by content).
      vocab_size: SentencePiece vocab size to train; for ``.npy`` the vocab size
        (default ``max id + 1``); with a ``tokenizer_model`` or a prepared corpus, the
        model's vocabulary (default: the tokenizer's; larger pads the embedding); must
        be ``None``/257 for ``"byte"``.
      seq_len: Tokens per example (``T``).
      batch_size: Training examples per batch (per process).
      val_batch_size: Validation batch size; defaults to ``batch_size``.
      val_fraction: Fraction of documents (of tokens for ``.npy``) for validation;
        must leave validation data (the trainer evaluates). Prepared corpora keep the
        split they were prepared with (a fraction other than the default and theirs is
        an error).
      seed: Training shuffle seed.
      split_seed: Train/validation split seed (kept separate from ``seed`` so every
        run evaluates on the same validation text).
      num_epochs: Training passes; ``None`` repeats forever.
      text_field: JSONL field / Parquet column with the document text.
      min_doc_chars: Drop default-corpus articles shorter than this.
      cache_dir: SentencePiece model cache directory (default ``~/.cache/llr_optax``).
      shard_index: This process's shard; default ``jax.process_index()``.
      shard_count: Number of shards; default ``jax.process_count()``.
      num_threads: grain prefetch threads for training batches (0 = synchronous).
      prefetch_buffer_size: grain prefetch buffer (batches).
    """

    source: str = "default"
    tokenizer: str = "byte"
    tokenizer_model: str | None = None
    vocab_size: int | None = None
    seq_len: int = 128
    batch_size: int = 16
    val_batch_size: int | None = None
    val_fraction: float = 0.05
    seed: int = 0
    split_seed: int = 0
    num_epochs: int | None = None
    text_field: str = "text"
    min_doc_chars: int = default_corpus.DEFAULT_MIN_DOC_CHARS
    cache_dir: str | None = None
    shard_index: int | None = None
    shard_count: int | None = None
    num_threads: int = 1
    prefetch_buffer_size: int = 8

    def __post_init__(self):
        for name in ("seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.val_batch_size is not None and self.val_batch_size < 1:
            raise UserError(f"val_batch_size must be >= 1, got {self.val_batch_size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"val_fraction must lie in [0, 1), got {self.val_fraction}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise UserError(f"num_epochs must be None or >= 1, got {self.num_epochs}")
        kind = tokenizers.TOKENIZER_ALIASES.get(str(self.tokenizer).lower())
        if kind is None:
            # Checked here so a typo fails before the corpus is parsed.
            raise UserError(f"Unknown tokenizer {self.tokenizer!r}; expected one of "
                            f"{tokenizers.TOKENIZERS}")
        if self.tokenizer_model is not None and kind != "byte":
            raise UserError(f"Give either --tokenizer {self.tokenizer} (trained here) or "
                            "--tokenizer-model (a pretrained file), not both")
        if not 0 <= self.seed < 2**32:
            raise UserError(f"seed must lie in [0, 2**32), got {self.seed}")


@dataclasses.dataclass(frozen=True, eq=False)
class Data:
    """Everything the trainer needs from the data (built by :func:`build_data`).

    Attributes:
      config: The configuration it was built from.
      corpus_name: Which corpus/file was used (report it).
      tokenizer: The tokenizer, or ``None`` for token ids (``.npy``, prepared corpora).
      vocab_size: Model vocabulary size.
      eos_id: Document separator id, or ``None`` for ``.npy`` data.
      train_tokens: The training stream (an ``int32`` array, or shards on disk).
      val_tokens: The validation stream (same).
      val_bytes: UTF-8 bytes of text covered by the validation targets (EOS counts
        0), or ``None`` for ``.npy`` data.
      num_train_docs: Documents in the training split (``None`` for ``.npy``).
      num_val_docs: Documents in the validation split (``None`` for ``.npy``).
      fingerprint: What the data is, by content (see :mod:`train.fingerprint`).
      shard_index: This process's shard.
      shard_count: Number of shards.
    """

    config: DataConfig
    corpus_name: str
    tokenizer: tokenizers.Tokenizer | None
    vocab_size: int
    eos_id: int | None
    train_tokens: windows.TokenStream
    val_tokens: windows.TokenStream
    val_bytes: int | None
    num_train_docs: int | None
    num_val_docs: int | None
    fingerprint: dict[str, Any]
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
        cfg = self.config
        return windows.num_val_batches(self.num_val_tokens, seq_len=cfg.seq_len,
                                       batch_size=cfg.val_batch_size or cfg.batch_size,
                                       shard_count=self.shard_count)

    def train_dataset(self) -> grain.IterDataset:
        """The grain training pipeline (see :func:`train.windows.train_dataset`)."""
        cfg = self.config
        return train_dataset(
            self.train_tokens, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
            seed=cfg.seed, num_epochs=cfg.num_epochs,
            shard_index=self.shard_index, shard_count=self.shard_count,
            read_options=grain.ReadOptions(
                num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch_buffer_size))

    def train_iter(self) -> grain.DatasetIterator:
        """A fresh checkpointable iterator of training batches, from the start."""
        return iter(self.train_dataset())

    def val_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """A fresh deterministic pass over the whole validation split (see
        :func:`train.windows.val_batches`); batches carry a float32 ``mask``."""
        cfg = self.config
        return val_batches(
            self.val_tokens, seq_len=cfg.seq_len,
            batch_size=cfg.val_batch_size or cfg.batch_size,
            shard_index=self.shard_index, shard_count=self.shard_count)

    def bits_per_byte(self, total_nats: float) -> float:
        """Validation bits per byte from the masked loss summed over a full pass.

        From a mean loss per target instead, pass ``mean * data.num_val_targets``.
        """
        if self.val_bytes is None:
            raise ValueError("bits per byte is undefined for pre-tokenised (.npy) data")
        return bits_per_byte(total_nats, self.val_bytes)

    def summary(self) -> str:
        """One line for logs: corpus, tokenizer, sizes, fingerprint."""
        tok = self.fingerprint["tokenizer"] or "pre-tokenised"
        docs = (f", docs train/val {self.num_train_docs}/{self.num_val_docs}"
                if self.num_train_docs is not None else "")
        return (
            f"corpus: {self.corpus_name}; tokenizer: {tok} (vocab {self.vocab_size})"
            f"{docs}; tokens train/val {self.num_train_tokens:,}/{self.num_val_tokens:,}"
            + (f"; val bytes {self.val_bytes:,}" if self.val_bytes is not None else "")
            + f"; data sha256 {self.fingerprint['tokens_sha256'][:12]}")


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


def _model_vocab(cfg: DataConfig, vocab_size: int, what: str) -> int:
    """The model's vocabulary: the tokenizer's, or a larger ``cfg.vocab_size`` (padding)."""
    if cfg.vocab_size is None:
        return vocab_size
    if cfg.vocab_size < vocab_size:
        raise UserError(f"vocab_size={cfg.vocab_size} is smaller than the {what}'s vocabulary "
                        f"of {vocab_size} ids")
    return cfg.vocab_size


_DEFAULT_VAL_FRACTION = DataConfig.val_fraction


def _build_from_prepared(cfg: DataConfig) -> dict[str, Any]:
    prepared = shards.open_prepared(cfg.source)
    tok_info = prepared.tokenizer or {}
    if cfg.tokenizer_model is not None:
        wanted = tokenizers.file_sha256(cfg.tokenizer_model) if Path(
            cfg.tokenizer_model).is_file() else None
        if wanted != tok_info.get("sha256"):
            raise UserError(
                f"--tokenizer-model {cfg.tokenizer_model!r} is not the tokenizer "
                f"{str(cfg.source)!r} was prepared with ({tok_info.get('file')!r}, sha256 "
                f"{str(tok_info.get('sha256'))[:12]})")
    if tokenizers.TOKENIZER_ALIASES[cfg.tokenizer.lower()] != "byte":
        raise UserError(f"{str(cfg.source)!r} is a prepared corpus, already tokenised: "
                        "drop --tokenizer")
    prepared_fraction = prepared.index.get("split", {}).get("val_fraction")
    if cfg.val_fraction not in (_DEFAULT_VAL_FRACTION, prepared_fraction):
        # Its split was fixed at prepare time; a different fraction here would be ignored.
        raise UserError(f"{str(cfg.source)!r} is a prepared corpus with validation fraction "
                        f"{prepared_fraction}, fixed by python -m train.prepare: drop "
                        f"--val-fraction {cfg.val_fraction}")
    train_tokens, val_tokens = prepared.tokens("train"), prepared.tokens("val")
    return dict(
        corpus_name=prepared.name, tokenizer=None,
        vocab_size=_model_vocab(cfg, prepared.vocab_size, "prepared corpus"),
        eos_id=prepared.eos_id, train_tokens=train_tokens, val_tokens=val_tokens,
        val_bytes=prepared.val_target_bytes,
        num_train_docs=prepared.num_documents("train"),
        num_val_docs=prepared.num_documents("val"),
        fingerprint=make_fingerprint(prepared.name, tok_info.get("kind"),
                                     tok_info.get("sha256"), prepared.fingerprint),
        val_what="validation split (fixed by python -m train.prepare --val-fraction)")


def _build_from_token_file(cfg: DataConfig, path: Path) -> dict[str, Any]:
    ids = corpus_lib.load_token_stream(path)
    max_id = int(ids.max())
    vocab_size = cfg.vocab_size if cfg.vocab_size is not None else max_id + 1
    if max_id >= vocab_size:
        raise UserError(f"{str(path)!r} contains token id {max_id} >= vocab_size={vocab_size}")
    # No document boundaries: hold out the tail of the stream (contiguous, so no
    # window of one split overlaps the other).
    n_val = math.ceil(cfg.val_fraction * len(ids)) if cfg.val_fraction > 0 else 0
    train_tokens, val_tokens = ids[: len(ids) - n_val], ids[len(ids) - n_val:]
    name = f"{path} (pre-tokenised)"
    return dict(
        corpus_name=name, tokenizer=None, vocab_size=vocab_size, eos_id=None,
        train_tokens=train_tokens, val_tokens=val_tokens, val_bytes=None,
        num_train_docs=None, num_val_docs=None,
        fingerprint=make_fingerprint(name, None, None,
                                     stream_sha256(train=train_tokens, val=val_tokens)),
        val_what=f"validation split (--val-fraction {cfg.val_fraction})")


def _build_from_documents(cfg: DataConfig) -> dict[str, Any]:
    if cfg.source == "default":
        corpus = default_corpus.load_default_corpus(min_chars=cfg.min_doc_chars)
    else:
        corpus = corpus_lib.Corpus(
            name=str(cfg.source),
            documents=corpus_lib.load_documents(cfg.source, text_field=cfg.text_field))
    train_docs, val_docs = split.split_documents(corpus.documents, cfg.val_fraction,
                                                 seed=cfg.split_seed)
    if cfg.tokenizer_model is not None:
        tokenizer = tokenizers.load_tokenizer_model(cfg.tokenizer_model)
        vocab_size = _model_vocab(cfg, tokenizer.vocab_size, "tokenizer")
    else:
        tokenizer = tokenizers.get_tokenizer(cfg.tokenizer, documents=train_docs,
                                             vocab_size=cfg.vocab_size, cache_dir=cfg.cache_dir)
        vocab_size = tokenizer.vocab_size
    train_tokens = split.encode_documents(train_docs, tokenizer)
    val_tokens = split.encode_documents(val_docs, tokenizer)
    return dict(
        corpus_name=corpus.name, tokenizer=tokenizer, vocab_size=vocab_size,
        eos_id=tokenizer.eos_id, train_tokens=train_tokens, val_tokens=val_tokens,
        # The first validation token is never a target, hence [1:].
        val_bytes=int(tokenizer.token_bytes[val_tokens[1:]].sum()),
        num_train_docs=len(train_docs), num_val_docs=len(val_docs),
        fingerprint=make_fingerprint(corpus.name, tokenizer.name, tokenizer.sha256,
                                     stream_sha256(train=train_tokens, val=val_tokens)),
        val_what=f"validation split (--val-fraction {cfg.val_fraction})")


def _looks_prepared(path: Path) -> bool:
    """A prepared corpus, or what is left of one (so the error says so)."""
    return path.is_dir() and (shards.is_prepared(path) or path.name.endswith(".partial")
                              or (path / "train-00000.npy").is_file())


def _check_processes_agree(fingerprint: dict[str, Any]) -> None:
    """Every process of a job must train on the same data and tokenizer.

    A tokenizer file or corpus that differs between hosts (or a SentencePiece model
    trained differently on each) would silently give each process other token ids.
    """
    import jax  # pylint: disable=import-outside-toplevel
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    text = f"{fingerprint['tokenizer_sha256']}/{fingerprint['tokens_sha256']}"
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(digest))
    differ = [i for i in range(len(gathered)) if not np.array_equal(gathered[i], gathered[0])]
    if differ:
        raise UserError(
            f"Processes {differ} of {jax.process_count()} see other data or another "
            "tokenizer than process 0 (different files on different hosts?); give every "
            "process the same --data and --tokenizer-model files")


def build_data(cfg: DataConfig = DataConfig()) -> Data:
    """Loads (or opens), splits, tokenises and packs the data described by ``cfg``.

    Args:
      cfg: The configuration.

    Returns:
      The :class:`Data` (train iterator factory, validation passes, sizes, fingerprint).

    Raises:
      FileNotFoundError: ``cfg.source`` does not exist.
      UserError: Unsupported, malformed or empty data, an unknown tokenizer or a
        missing optional package, an empty validation split, or a ``seq_len`` longer
        than the training split.
    """
    shard_index, shard_count = _process_shard(cfg)
    source = Path(cfg.source)
    if cfg.source != "default" and _looks_prepared(source):
        fields = _build_from_prepared(cfg)
    elif cfg.source != "default" and source.suffix.lower() in corpus_lib.NPY_SUFFIXES:
        fields = _build_from_token_file(cfg, source)
    else:
        fields = _build_from_documents(cfg)
    windows.check_seq_len(len(fields["train_tokens"]), cfg.seq_len, "training split")
    val_what = fields.pop("val_what")
    if len(fields["val_tokens"]) < 2:  # fewer than one target: nothing to evaluate on
        raise UserError(f"The {val_what} of {fields['corpus_name']} is empty, but the "
                        "trainer evaluates on it: use a validation fraction > 0")
    if shard_count > 1 and cfg.shard_index is None:
        _check_processes_agree(fields["fingerprint"])
    return Data(config=cfg, shard_index=shard_index, shard_count=shard_count, **fields)
