"""``python -m train.prepare``: tokenise a corpus once into shards the trainer streams.

    python -m train.prepare corpus/ --out data/corpus_spm --tokenizer-model spm.model
    python -m train --preset 130m --data data/corpus_spm ...
    python -m train.prepare --verify data/corpus_spm

The source is read as a stream (``.txt``, ``.jsonl``, ``.parquet``, a directory of
them, ``.npy`` token ids, or ``default`` for the offline corpus; see
:mod:`train.corpus`), tokenised in batches and appended to ``.npy`` token shards
(:mod:`train.shards` describes the format and why). Memory stays bounded by one batch
of documents, whatever the corpus size.

**Validation split**, decided here once and for all: a document goes to validation when
a hash of its text keyed by ``--split-seed`` falls below ``--val-fraction``
(:func:`train.split.is_validation_document`), so the split does not depend on file
order, on the tokenizer or on the trainer's settings; the trainer's ``--val-fraction``
does not apply to a prepared corpus. For ``.npy`` ids (no documents) the last
``--val-fraction`` of the ids is validation.

**Tokenizer**: bytes (default), ``--tokenizer-model`` (a pretrained SentencePiece
``.model`` or Hugging Face ``tokenizer.json``), or ``--tokenizer sentencepiece`` (trained
here on the training documents, an extra pass). The file is copied into the output
directory and its SHA-256 recorded in ``index.json``.

**Interruption**: output goes to ``OUT.partial`` and is renamed to ``OUT`` when complete;
an interrupted run leaves no ``OUT``, and the next run deletes ``OUT.partial`` and starts
over. Exit status: 0 done, 1 ``--verify`` found damaged shards, 2 bad arguments or
input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from train import corpus as corpus_lib
from train import default_corpus, shards, split, tokenizers
from train.errors import UserError

__all__ = ["DEFAULT_SHARD_TOKENS", "DEFAULT_VAL_FRACTION", "main", "prepare"]

DEFAULT_VAL_FRACTION = 0.01
DEFAULT_SHARD_TOKENS = 1 << 27  # 128 Mi tokens: 256 MiB per shard in uint16
# Documents are encoded in batches of about this many characters (the memory bound).
_BATCH_CHARS = 1 << 22


class _Documents:
    """A re-iterable stream of a source's documents (SentencePiece training reads twice).

    Args:
      source: A path (streamed by :func:`train.corpus.iter_documents`) or a list of
        documents (the default corpus, already in memory).
      text_field: JSONL field / Parquet column.
      progress: Called with the source bytes consumed.
      keep: Only documents for which this is true.
    """

    def __init__(self, source: str | list[str], text_field: str, progress=None, keep=None):
        self.source, self.text_field, self.progress, self.keep = source, text_field, progress, keep

    def __iter__(self) -> Iterator[str]:
        if isinstance(self.source, list):
            docs = iter(self.source)
            if self.progress is not None:  # counted in documents: no file to measure
                docs = (self.progress(1) or d for d in docs)
        else:
            docs = corpus_lib.iter_documents(self.source, text_field=self.text_field,
                                             progress=self.progress)
        return docs if self.keep is None else (d for d in docs if self.keep(d))


def _progress_bar(enabled: bool, total: int | None, desc: str, unit: str = "B"):
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

    return tqdm(total=total, unit=unit, unit_scale=True, unit_divisor=1024 if unit == "B" else 1000,
                desc=desc, disable=not enabled, dynamic_ncols=True, file=sys.stderr)


def _tokenizer(source: str | list[str], tokenizer: str, tokenizer_model: str | None,
               vocab_size: int | None, val_fraction: float, split_seed: int, text_field: str,
               cache_dir: str | None) -> tokenizers.Tokenizer:
    if tokenizer_model is not None:
        if tokenizers.TOKENIZER_ALIASES.get(tokenizer.lower()) != "byte":
            raise UserError("Give either --tokenizer sentencepiece or --tokenizer-model, not both")
        return tokenizers.load_tokenizer_model(tokenizer_model)
    if tokenizers.TOKENIZER_ALIASES.get(tokenizer.lower()) == "sentencepiece":
        train_docs = _Documents(source, text_field, keep=lambda d: not split.is_validation_document(
            d, val_fraction, seed=split_seed))
        print("training the SentencePiece model on the training documents ...", file=sys.stderr)
        return tokenizers.get_tokenizer(tokenizer, documents=train_docs, vocab_size=vocab_size,
                                        cache_dir=cache_dir)
    return tokenizers.get_tokenizer(tokenizer, vocab_size=vocab_size)


def _write_documents(work: Path, source: str | list[str], tok: tokenizers.Tokenizer, *, val_fraction: float,
                     split_seed: int, text_field: str, shard_tokens: int,
                     progress: bool) -> dict[str, Any]:
    dtype = shards.token_dtype(tok.vocab_size)
    writers = {name: shards.ShardWriter(work, name, dtype, shard_tokens) for name in shards.SPLITS}
    docs = {name: 0 for name in shards.SPLITS}
    text_bytes = {name: 0 for name in shards.SPLITS}
    val_bytes, first_val = 0, None
    eos = np.array([tok.eos_id], np.int64)
    if isinstance(source, list):
        bar = _progress_bar(progress, len(source), "tokenising", unit="doc")
    else:
        total = sum(p.stat().st_size for p in corpus_lib.source_files(source))
        bar = _progress_bar(progress, total, "tokenising")

    def flush(batch: list[str]) -> None:
        nonlocal val_bytes, first_val
        for doc, ids in zip(batch, tok.encode_batch(batch)):
            name = "val" if split.is_validation_document(doc, val_fraction, seed=split_seed) else "train"
            ids = np.concatenate([ids, eos])
            writers[name].write(ids)
            docs[name] += 1
            text_bytes[name] += len(doc.encode("utf-8"))
            if name == "val":
                val_bytes += int(tok.token_bytes[ids].sum())
                first_val = ids[0] if first_val is None else first_val
        bar.set_postfix(tokens=f"{writers['train'].tokens + writers['val'].tokens:,}",
                        refresh=False)

    try:
        batch, chars = [], 0
        for doc in _Documents(source, text_field, progress=bar.update):
            batch.append(doc)
            chars += len(doc)
            if chars >= _BATCH_CHARS:
                flush(batch)
                batch, chars = [], 0
        flush(batch)
    finally:
        bar.close()
    splits = {}
    for name in shards.SPLITS:
        splits[name] = {"documents": docs[name], "text_bytes": text_bytes[name],
                        "tokens": writers[name].tokens, "shards": writers[name].close(),
                        "sha256": writers[name].split_hash.hexdigest()}
    # The first validation token is never a target (bits per byte counts targets only).
    splits["val"]["target_bytes"] = (val_bytes - int(tok.token_bytes[first_val])
                                     if first_val is not None else 0)
    return {"vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "dtype": dtype.name,
            "split": {"rule": "document hash (train.split.is_validation_document)",
                      "val_fraction": val_fraction, "seed": split_seed},
            "splits": splits}


def _write_token_file(work: Path, source: str, *, vocab_size: int | None, val_fraction: float,
                      shard_tokens: int, progress: bool) -> dict[str, Any]:
    ids = corpus_lib.load_token_stream(source, mmap=True)
    chunk = 1 << 24
    if vocab_size is None:  # one pass for the largest id, so the dtype is known
        vocab_size = 1 + max(int(ids[i:i + chunk].max()) for i in range(0, len(ids), chunk))
    dtype = shards.token_dtype(vocab_size)
    n_val = int(np.ceil(val_fraction * len(ids)))
    bounds = {"train": (0, len(ids) - n_val), "val": (len(ids) - n_val, len(ids))}
    bar = _progress_bar(progress, ids.nbytes, "copying")
    splits = {}
    try:
        for name, (start, stop) in bounds.items():
            writer = shards.ShardWriter(work, name, dtype, shard_tokens)
            for i in range(start, stop, chunk):
                part = np.asarray(ids[i:min(i + chunk, stop)])
                if part.min() < 0 or part.max() >= vocab_size:
                    raise UserError(f"{source!r} holds token ids outside [0, {vocab_size}) "
                                    f"near position {i}")
                writer.write(part)
                bar.update(part.nbytes)
            splits[name] = {"documents": None, "tokens": writer.tokens, "shards": writer.close(),
                            "sha256": writer.split_hash.hexdigest()}
    finally:
        bar.close()
    splits["val"]["target_bytes"] = None
    return {"vocab_size": vocab_size, "eos_id": None, "dtype": dtype.name,
            "split": {"rule": "tail of the ids", "val_fraction": val_fraction, "seed": None},
            "splits": splits}


def prepare(
    source: str,
    out: str | Path,
    *,
    tokenizer: str = "byte",
    tokenizer_model: str | None = None,
    vocab_size: int | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    split_seed: int = 0,
    text_field: str = "text",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    overwrite: bool = False,
    progress: bool = True,
    cache_dir: str | None = None,
) -> shards.PreparedCorpus:
    """Tokenises ``source`` into a prepared corpus at ``out`` (see the module docstring).

    Args:
      source: ``"default"``, a text source (:mod:`train.corpus`) or a ``.npy`` of ids.
      out: The output directory (must not exist, unless ``overwrite`` and it holds a
        prepared corpus).
      tokenizer: ``"byte"`` or ``"sentencepiece"`` (trained on the training documents).
      tokenizer_model: A pretrained SentencePiece ``.model`` or ``tokenizer.json``.
      vocab_size: SentencePiece size to train; for ``.npy`` the vocabulary (default
        ``max id + 1``).
      val_fraction: Expected fraction of documents (``.npy``: of ids) for validation.
      split_seed: Seed of the validation hash.
      text_field: JSONL field / Parquet column with the text.
      shard_tokens: Tokens per shard file.
      overwrite: Replace an existing prepared corpus at ``out``.
      progress: Show progress bars (stderr).
      cache_dir: SentencePiece model cache (for ``tokenizer="sentencepiece"``).

    Returns:
      The prepared corpus, opened.

    Raises:
      FileNotFoundError: ``source`` does not exist.
      UserError: Bad arguments or input (one line naming the problem).
    """
    out = Path(out)
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction must lie in (0, 1) (the trainer evaluates on the "
                        f"validation split), got {val_fraction}")
    if shard_tokens < 1:
        raise UserError(f"--shard-tokens must be >= 1, got {shard_tokens}")
    if out.exists() and not (overwrite and shards.is_prepared(out)):
        what = "a prepared corpus" if shards.is_prepared(out) else "something else"
        hint = "pass --overwrite to replace it" if what == "a prepared corpus" else \
            "choose another --out"
        raise UserError(f"{str(out)!r} already exists and holds {what}; {hint}")
    is_ids = source != "default" and Path(source).suffix.lower() in corpus_lib.NPY_SUFFIXES
    if source != "default" and not Path(source).exists():
        raise FileNotFoundError(f"Data source not found: {source!r}")
    if is_ids and (tokenizer_model is not None
                   or tokenizers.TOKENIZER_ALIASES.get(tokenizer.lower()) != "byte"):
        raise UserError(f"{source!r} holds token ids already: drop --tokenizer/--tokenizer-model")

    work = shards.partial_dir(out)
    if work.exists():
        print(f"removing {str(work)!r}, left by an interrupted prepare", file=sys.stderr)
        shutil.rmtree(work)
    tok, documents, name = None, str(source), str(Path(source).resolve())
    if source == "default":
        corpus = default_corpus.load_default_corpus()
        documents, name = corpus.documents, f"default corpus: {corpus.name}"
    if not is_ids:  # before creating anything: a bad tokenizer leaves nothing behind
        tok = _tokenizer(documents, tokenizer, tokenizer_model, vocab_size, val_fraction,
                         split_seed, text_field, cache_dir)
    work.mkdir(parents=True)
    try:
        if is_ids:
            index = _write_token_file(work, source, vocab_size=vocab_size,
                                      val_fraction=val_fraction, shard_tokens=shard_tokens,
                                      progress=progress)
            index["tokenizer"] = None
        else:
            index = _write_documents(work, documents, tok, val_fraction=val_fraction,
                                     split_seed=split_seed, text_field=text_field,
                                     shard_tokens=shard_tokens, progress=progress)
            index["tokenizer"] = {"kind": tok.name, "file": None, "sha256": tok.sha256}
            if getattr(tok, "model_path", None) is not None:
                copy = "tokenizer" + (".json" if tok.name == "huggingface" else ".model")
                shutil.copyfile(tok.model_path, work / copy)
                index["tokenizer"]["file"] = copy
        index["source"] = {"name": name, "text_field": text_field}
        if index["splits"]["train"]["tokens"] < 2 or index["splits"]["val"]["tokens"] < 2:
            raise UserError(
                f"{source!r} gives {index['splits']['train']['tokens']} training and "
                f"{index['splits']['val']['tokens']} validation tokens: too few documents for "
                f"--val-fraction {val_fraction} (each split needs some)")
        shards.write_index(work, index)
        shards.publish(work, out, overwrite)
    except BaseException:  # incl. KeyboardInterrupt: leave nothing half-written behind
        shutil.rmtree(work, ignore_errors=True)
        raise
    return shards.open_prepared(out)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m train.prepare`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m train.prepare",
        description="Tokenise a corpus once into token shards for python -m train --data DIR.",
        epilog="Exit status: 0 done, 1 --verify found damaged shards, 2 bad arguments or "
               "input, 130 interrupted (nothing is left half-written).")
    parser.add_argument("source", nargs="?",
                        help="'default' (offline corpus), a .txt/.jsonl/.parquet file, a "
                             "directory of them, or a .npy of token ids")
    parser.add_argument("--out", help="output directory (created; see --overwrite)")
    parser.add_argument("--tokenizer", default="byte",
                        help="byte (default) or sentencepiece (trained here on the training "
                             "documents)")
    parser.add_argument("--tokenizer-model", default=None, metavar="PATH",
                        help="a pretrained SentencePiece .model or Hugging Face tokenizer.json")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="sentencepiece: vocabulary to train; .npy: vocabulary size")
    parser.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                        help="expected fraction of documents for validation (default "
                             f"{DEFAULT_VAL_FRACTION})")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the split hash")
    parser.add_argument("--text-field", default="text",
                        help="JSONL field / Parquet column with the text (default: text)")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                        help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing prepared corpus at --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--verify", metavar="DIR", default=None,
                        help="re-read a prepared corpus's shards and check their SHA-256")
    return parser


def _verify(directory: str, progress: bool) -> int:
    corpus = shards.open_prepared(directory)
    total = sum((corpus.directory / s["file"]).stat().st_size
                for name in shards.SPLITS for s in corpus.index["splits"][name]["shards"])
    bar = _progress_bar(progress, total, "verifying")
    try:
        problems = shards.verify_prepared(directory, progress=bar.update)
    finally:
        bar.close()
    for line in problems:
        print(f"damaged: {directory}/{line}", file=sys.stderr)
    if problems:
        return 1
    print(f"{directory}: every shard matches its SHA-256 (data sha256 "
          f"{corpus.fingerprint[:12]})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.verify is not None:
            return _verify(args.verify, not args.no_progress)
        if args.source is None or args.out is None:
            parser.error("give a SOURCE and --out DIR (or --verify DIR)")
        corpus = prepare(
            args.source, args.out, tokenizer=args.tokenizer,
            tokenizer_model=args.tokenizer_model, vocab_size=args.vocab_size,
            val_fraction=args.val_fraction, split_seed=args.split_seed,
            text_field=args.text_field, shard_tokens=args.shard_tokens,
            overwrite=args.overwrite, progress=not args.no_progress)
    except (UserError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: nothing was written to {args.out or args.verify!r}",
              file=sys.stderr)
        return 130
    splits = corpus.index["splits"]
    print(f"prepared {args.out}: train {splits['train']['tokens']:,} tokens "
          f"({len(splits['train']['shards'])} shards), val {splits['val']['tokens']:,} tokens, "
          f"vocab {corpus.vocab_size}, data sha256 {corpus.fingerprint[:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
