"""User data for the trainer: text files read as documents, or token-id files.

* ``*.txt`` (or ``.text``/``.md``) file: documents separated by blank lines;
* ``*.jsonl`` (``.ndjson``) file: one JSON object per line, the document is field
  ``text_field``;
* ``*.parquet`` file: the document is column ``text_field`` of each row (needs the
  optional ``pyarrow``);
* a directory: every ``*.txt`` file below it is one document, every ``.jsonl`` and
  ``.parquet`` file below it contributes its records (files in sorted path order);
* ``*.npy`` file: a 1-D array of token ids (already tokenised; no tokenizer).

Documents are streamed (:func:`iter_documents`), so ``python -m train.prepare`` can
tokenise a corpus larger than memory; only a single document (one ``.txt`` paragraph,
record or file of a directory) has to fit. Files that are not what their name says
(binary data in a ``.txt``, a ``.npy`` that is not an array of ids) raise a
:class:`~train.errors.UserError` naming the file.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from train.errors import UserError

__all__ = [
    "Corpus",
    "JSONL_SUFFIXES",
    "NPY_SUFFIXES",
    "PARQUET_SUFFIXES",
    "TEXT_SUFFIXES",
    "iter_documents",
    "load_documents",
    "load_token_stream",
    "source_files",
]

# Suffixes read as plain text (documents separated by blank lines).
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
NPY_SUFFIXES = (".npy",)
_NPY_MAGIC = b"\x93NUMPY"
# Called with the number of source bytes consumed since the last call (progress bars).
Progress = Callable[[int], None]


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A named list of plain-text documents.

    Attributes:
      name: Human-readable description of where the text came from (reported by the
        trainer so a run says which corpus it used).
      documents: The documents, in a deterministic order.
    """

    name: str
    documents: list[str]

    @property
    def num_bytes(self) -> int:
        """Total UTF-8 size of all documents."""
        return sum(len(d.encode("utf-8")) for d in self.documents)


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"Data source not found: {str(path)!r}")


def _not_text(path: Path, reason: str) -> UserError:
    return UserError(f"{str(path)!r} is not UTF-8 text ({reason}); is it a binary file?")


def _checked(path: Path, doc: str) -> str:
    if "\x00" in doc:
        raise _not_text(path, "it contains NUL bytes")
    return doc


def source_files(path: str | os.PathLike) -> list[Path]:
    """The files a text source reads, in reading order.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      UserError: An unsupported file type, a ``.npy`` file (token ids, not text), or a
        directory without supported files.
    """
    path = Path(path)
    _check_exists(path)
    if path.is_dir():
        kinds = (".txt",) + JSONL_SUFFIXES + PARQUET_SUFFIXES
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in kinds)
        if not files:
            raise UserError(f"No *.txt files found in directory {str(path)!r} (nor .jsonl, "
                            ".parquet)")
        return files
    suffix = path.suffix.lower()
    if suffix in NPY_SUFFIXES:
        raise UserError(
            f"{str(path)!r} holds token ids, not text: use load_token_stream() for .npy files")
    if suffix not in TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES:
        supported = ", ".join(TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES + NPY_SUFFIXES)
        raise UserError(
            f"Unsupported data file extension {path.suffix!r} for {str(path)!r}; "
            f"expected one of: {supported}, or a directory of .txt files")
    return [path]


def _text_paragraphs(path: Path, progress: Progress | None) -> Iterator[str]:
    """Blank-line separated documents of a text file, streamed line by line."""
    with path.open("rb") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8")  # universal newlines, as read_text
        lines: list[str] = []
        reported = 0
        try:
            for line in text:
                if line.strip(" \t\r\n"):
                    lines.append(line)
                    continue
                if lines:
                    doc = "".join(lines).strip()
                    lines = []
                    if doc:
                        yield _checked(path, doc)
                if progress is not None:
                    progress(raw.tell() - reported)
                    reported = raw.tell()
        except UnicodeDecodeError as e:
            raise _not_text(path, f"{e.reason} at a byte 0x{e.object[e.start]:02x}") from None
        doc = "".join(lines).strip()
        if doc:
            yield _checked(path, doc)
        if progress is not None:
            progress(raw.tell() - reported)


def _whole_text_file(path: Path, progress: Progress | None) -> Iterator[str]:
    try:
        doc = path.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise _not_text(path, f"{e.reason} at byte {e.start}") from None
    if progress is not None:
        progress(path.stat().st_size)
    if doc:
        yield _checked(path, doc)


def _jsonl_records(path: Path, text_field: str, progress: Progress | None) -> Iterator[str]:
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            if progress is not None:
                progress(len(line))
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_text(path, f"line {lineno}: {e.reason}") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise UserError(
                    f"{path}:{lineno}: expected a JSON object with a {text_field!r} field")
            value = record[text_field]
            if not isinstance(value, str):
                raise UserError(f"{path}:{lineno}: field {text_field!r} is not a string")
            if value.strip():
                yield value


def _parquet_rows(path: Path, text_field: str, progress: Progress | None) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise UserError(f"Reading {str(path)!r} needs the optional package 'pyarrow', which "
                        "is not installed: pip install 'llr-optax[parquet]'") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pylint: disable=broad-except  (pyarrow's ArrowInvalid, OSError)
        raise UserError(f"{str(path)!r} is not a readable Parquet file ({e})") from None
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise UserError(f"{str(path)!r} has no column {text_field!r} (columns: "
                        f"{', '.join(names)}); choose one with --text-field")
    size, rows = path.stat().st_size, max(1, parquet.metadata.num_rows)
    done = reported = 0
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if value is None:
                continue
            if not isinstance(value, str):
                raise UserError(f"{str(path)!r}: column {text_field!r} does not hold strings")
            if value.strip():
                yield value
        done += batch.num_rows
        if progress is not None:
            progress(size * done // rows - reported)
            reported = size * done // rows


def iter_documents(
    path: str | os.PathLike, *, text_field: str = "text", progress: Progress | None = None
) -> Iterator[str]:
    """Streams the non-empty documents of a text source, in file order.

    Args:
      path: A ``.txt``/``.text``/``.md``, ``.jsonl`` or ``.parquet`` file, or a
        directory (see the module docstring).
      text_field: The JSONL field / Parquet column holding the document text.
      progress: Called with the number of source bytes consumed since its last call.

    Yields:
      Documents (strings).

    Raises:
      FileNotFoundError: ``path`` does not exist.
      UserError: Unsupported, malformed or non-UTF-8 data (the message names the file).
    """
    root = Path(path)
    for file in source_files(root):
        suffix = file.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            yield from _jsonl_records(file, text_field, progress)
        elif suffix in PARQUET_SUFFIXES:
            yield from _parquet_rows(file, text_field, progress)
        elif root.is_dir():
            yield from _whole_text_file(file, progress)
        else:
            yield from _text_paragraphs(file, progress)


def load_documents(path: str | os.PathLike, *, text_field: str = "text") -> list[str]:
    """All documents of a text source (see :func:`iter_documents`) as a list.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      UserError: Unsupported extension (``.npy`` must go through
        :func:`load_token_stream`), malformed or non-UTF-8 data, or no documents.
    """
    docs = list(iter_documents(path, text_field=text_field))
    if not docs:
        raise UserError(f"No documents found in {str(path)!r} (the data is empty)")
    return docs


def load_token_stream(path: str | os.PathLike, *, mmap: bool = False) -> np.ndarray:
    """Loads a pre-tokenised ``.npy`` file: a 1-D array of non-negative token ids.

    Args:
      path: The ``.npy`` file.
      mmap: Map the file instead of reading it (its ids are then not range-checked,
        which would read it all; the caller checks them chunk by chunk) and keep its
        integer dtype.

    Returns:
      The ids as ``int32`` (or the mapped array, with ``mmap=True``).

    Raises:
      FileNotFoundError: ``path`` does not exist.
      UserError: Not a ``.npy`` file, not 1-D, not integer, negative ids, or empty.
    """
    path = Path(path)
    _check_exists(path)
    if path.suffix.lower() not in NPY_SUFFIXES:
        raise UserError(f"Expected a .npy file of token ids, got {str(path)!r}")
    with path.open("rb") as f:
        if f.read(len(_NPY_MAGIC)) != _NPY_MAGIC:
            raise UserError(f"{str(path)!r} is not a NumPy .npy file (no .npy header)")
    try:
        ids = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except ValueError as e:
        if "allow_pickle" in str(e):  # an object array: not numbers at all
            raise UserError(f"{str(path)!r} holds Python objects, not an array of token "
                            "ids") from None
        raise UserError(f"{str(path)!r} is not a readable .npy file ({e})") from None
    except (OSError, EOFError) as e:
        raise UserError(f"{str(path)!r} is not a readable .npy file ({e})") from None
    if ids.ndim != 1:
        raise UserError(f"{str(path)!r}: token ids must be a 1-D array, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise UserError(f"{str(path)!r}: token ids must be integers, got dtype {ids.dtype}")
    if ids.size == 0:
        raise UserError(f"No tokens found in {str(path)!r} (the data is empty)")
    if mmap:
        return ids
    if ids.min() < 0 or ids.max() > np.iinfo(np.int32).max:
        raise UserError(f"{str(path)!r}: token ids must lie in [0, 2**31)")
    return ids.astype(np.int32, copy=False)
