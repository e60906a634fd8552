"""Tokenizers of the trainer: bytes, SentencePiece, and Hugging Face ``tokenizer.json``.

* :class:`ByteTokenizer`: UTF-8 bytes, no file, no dependency (the default).
* :class:`SentencePieceTokenizer`: a SentencePiece ``.model``, either pretrained (given
  with ``--tokenizer-model``) or trained here on the training documents
  (``--tokenizer sentencepiece``, cached by content hash).
* :class:`HFTokenizer`: a Hugging Face ``tokenizer.json`` read by the ``tokenizers``
  package (``--tokenizer-model``).

Every tokenizer says how many UTF-8 bytes of text each id stands for (``token_bytes``,
for bits per byte) and has a ``sha256`` of what defines it (the model file's bytes), so
a checkpoint can record which tokenizer made its data. The optional packages are
imported only when asked for; a missing one or a file that is not a tokenizer is a
:class:`~train.errors.UserError` whose one line names the file and the fix.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from train.errors import UserError

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "TOKENIZERS",
    "Tokenizer",
    "file_sha256",
    "get_tokenizer",
    "load_tokenizer_model",
]

TOKENIZERS = ("byte", "sentencepiece")
TOKENIZER_ALIASES = {"byte": "byte", "bytes": "byte", "sentencepiece": "sentencepiece",
                     "spm": "sentencepiece"}
DEFAULT_SPM_VOCAB_SIZE = 2048
# End-of-text tokens looked up in a tokenizer.json, in this order: GPT-2/NeoX, T5/LLaMa
# style, LLaMa 3, Gemma, others; BERT's separator last.
HF_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]",
                     "[SEP]")


@runtime_checkable
class Tokenizer(Protocol):
    """What the pipeline needs from a tokenizer.

    Attributes:
      name: Short name (``"byte"``, ``"sentencepiece"``, ``"huggingface"``).
      vocab_size: Number of token ids (ids lie in ``[0, vocab_size)``).
      eos_id: The end-of-document id appended after every document.
      token_bytes: ``int64[vocab_size]``, the number of UTF-8 bytes of text each id
        stands for (0 for special ids such as EOS); used for bits-per-byte.
      sha256: Hex digest of what defines the tokenizer (its model file's bytes).
    """

    name: str
    vocab_size: int
    eos_id: int
    token_bytes: np.ndarray
    sha256: str

    def encode(self, text: str) -> np.ndarray:
        """Text -> ``int32[n]`` ids (no EOS appended)."""
        ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Many texts -> their ids (no EOS appended)."""
        ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Ids -> text; special ids (EOS) are skipped."""
        ...


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, id 256 is EOS (vocab size 257).

    No training, no dependency, and bits-per-byte is exact: every non-EOS token is one
    byte of text.
    """

    name = "byte"
    eos_id = 256
    vocab_size = 257
    # Nothing to hash but the scheme itself; bump the suffix if the scheme ever changes.
    sha256 = hashlib.sha256(b"llr_optax byte tokenizer: utf-8 bytes 0-255, eos 256").hexdigest()

    def __init__(self) -> None:
        self.token_bytes = np.ones(self.vocab_size, np.int64)
        self.token_bytes[self.eos_id] = 0

    def encode(self, text: str) -> np.ndarray:
        """Returns the UTF-8 bytes of ``text`` as ``int32`` ids."""
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encodes each text (see :meth:`encode`)."""
        return [self.encode(t) for t in texts]

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


def _import_optional(module: str, extra: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserError(
            f"{what} needs the optional package {module!r}, which is not installed: "
            f"pip install 'llr-optax[{extra}]'") from e


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llr_optax" / "sentencepiece"


# Bump when the training options below change, so stale cached models are not reused.
_SPM_OPTIONS_VERSION = 1
# SentencePiece skips training "sentences" longer than this many bytes; feed it lines.
_SPM_MAX_SENTENCE_BYTES = 16384


class SentencePieceTokenizer:
    """A SentencePiece model: pretrained, or trained here with :meth:`train`.

    Models trained here use byte fallback (any text is encodable, no ``<unk>`` in
    practice) and identity normalisation (the text is tokenised as is, so byte counts
    are faithful). Ids: 0 = ``<unk>``, 1 = ``</s>`` (EOS), then byte pieces and learned
    pieces. A pretrained model keeps its own ids; it must define an EOS piece.

    ``token_bytes`` counts the word-boundary marker ``▁`` as one byte (a space); the
    dummy-prefix space SentencePiece adds at the start of each document is therefore
    counted once per document, a negligible overestimate of the byte count.

    Args:
      model_path: A ``.model`` file.

    Raises:
      UserError: sentencepiece is not installed, the file is not a SentencePiece
        model, or the model has no EOS piece.
    """

    name = "sentencepiece"

    def __init__(self, model_path: str | os.PathLike):
        spm = _import_optional("sentencepiece", "sentencepiece", "A SentencePiece tokenizer")
        self.model_path = Path(model_path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.model_path))
        except (RuntimeError, OSError) as e:
            raise UserError(f"{str(self.model_path)!r} is not a readable SentencePiece model "
                            f"({str(e).strip().splitlines()[-1]})") from e
        self.vocab_size = int(self._sp.get_piece_size())
        self.eos_id = int(self._sp.eos_id())
        if self.eos_id < 0:
            raise UserError(f"SentencePiece model {str(self.model_path)!r} has no EOS piece "
                            "(needed to separate documents)")
        self.sha256 = file_sha256(self.model_path)
        self.token_bytes = np.array(
            [self._piece_bytes(i) for i in range(self.vocab_size)], np.int64)

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
        documents: Iterable[str],
        vocab_size: int,
        *,
        cache_dir: str | os.PathLike | None = None,
    ) -> SentencePieceTokenizer:
        """Trains a model on ``documents``, or loads it from the cache.

        The cache file name is keyed by a hash of the documents, the vocab size and
        the training options, so a different corpus or size never reuses a model.

        Args:
          documents: Training documents (pass the train split only, so that the
            validation text does not shape the vocabulary). Iterated twice (hash,
            then training), so a re-iterable such as a list.
          vocab_size: Requested vocabulary size (at least ~300: the 256 byte pieces
            are always part of it). For a tiny corpus the model may come out smaller.
          cache_dir: Where models are cached; defaults to
            ``$XDG_CACHE_HOME/llr_optax/sentencepiece`` (``~/.cache/...``).

        Returns:
          The tokenizer.
        """
        spm = _import_optional("sentencepiece", "sentencepiece",
                               "--tokenizer sentencepiece")
        if vocab_size < 300:
            raise UserError(
                f"sentencepiece vocab_size must be >= 300 (256 byte pieces are always "
                f"included), got {vocab_size}")
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


def _spm_lines(documents: Iterable[str]):
    """Non-empty lines of all documents (SentencePiece trains on 'sentences')."""
    for doc in documents:
        for line in doc.split("\n"):
            if line.strip():
                yield line


_BYTE_PIECE_RE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def _has_type(node, name: str) -> bool:
    """Whether a tokenizer.json component (possibly a Sequence of them) is of type ``name``."""
    if isinstance(node, dict):
        if node.get("type") == name:
            return True
        return any(_has_type(v, name) for v in node.values() if isinstance(v, (dict, list)))
    if isinstance(node, list):
        return any(_has_type(v, name) for v in node)
    return False


class HFTokenizer:
    """A Hugging Face ``tokenizer.json``, read with the ``tokenizers`` package.

    Texts are encoded without the post-processor's special tokens (no BOS/CLS added):
    the pipeline appends EOS after each document itself. The EOS id is the first of
    ``HF_EOS_CANDIDATES`` the vocabulary has, unless ``eos_token`` names it. Truncation
    and padding stored in the file are switched off (documents are packed, not padded).

    ``token_bytes``: for byte-level models (GPT-2 style, ``ByteLevel`` pre-tokenizer or
    decoder) each character of a token stands for one byte, so counts are exact; for
    other models ``▁`` counts as a space, ``<0xNN>`` byte pieces as one byte and a
    WordPiece ``##`` prefix as nothing. Special tokens count 0.

    Args:
      path: The ``tokenizer.json`` file.
      eos_token: The end-of-document token; default: looked up.

    Raises:
      UserError: ``tokenizers`` is not installed, the file is not a tokenizer.json, or
        no EOS token was found.
    """

    name = "huggingface"

    def __init__(self, path: str | os.PathLike, eos_token: str | None = None):
        hf = _import_optional("tokenizers", "tokenizers", "A tokenizer.json tokenizer")
        self.model_path = Path(path)
        try:
            text = self.model_path.read_text(encoding="utf-8")
            spec = json.loads(text)
            self._tok = hf.Tokenizer.from_str(text)
        except Exception as e:  # pylint: disable=broad-except  (tokenizers raises Exception)
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{str(self.model_path)!r} is not a readable Hugging Face "
                            f"tokenizer.json ({reason})") from e
        self._tok.no_truncation()
        self._tok.no_padding()
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        candidates = (eos_token,) if eos_token is not None else HF_EOS_CANDIDATES
        ids = [self._tok.token_to_id(t) for t in candidates]
        found = [(t, i) for t, i in zip(candidates, ids) if i is not None]
        if not found:
            raise UserError(
                f"{str(self.model_path)!r} has no end-of-text token (looked for "
                f"{', '.join(candidates)}); the pipeline needs one to separate documents")
        self.eos_token, self.eos_id = found[0][0], int(found[0][1])
        self.sha256 = file_sha256(self.model_path)
        self.token_bytes = self._token_bytes(spec)

    def _token_bytes(self, spec: dict) -> np.ndarray:
        byte_level = (_has_type(spec.get("pre_tokenizer"), "ByteLevel")
                      or _has_type(spec.get("decoder"), "ByteLevel"))
        special = {int(i) for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        counts = np.zeros(self.vocab_size, np.int64)
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i)
            if i in special or piece is None:
                continue
            if byte_level:
                counts[i] = len(piece)  # one character per byte (GPT-2's byte alphabet)
            elif _BYTE_PIECE_RE.match(piece):
                counts[i] = 1
            else:
                piece = piece[2:] if piece.startswith("##") else piece
                counts[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
        return counts

    def encode(self, text: str) -> np.ndarray:
        """Returns the ids of ``text`` as ``int32`` (no special tokens added)."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encodes many texts at once (parallel inside ``tokenizers``)."""
        # encode_batch_fast (tokenizers >= 0.20) skips computing offsets we do not use.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        encodings = encode(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encodings]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Decodes ids; special tokens (EOS) are skipped."""
        return self._tok.decode([int(i) for i in np.asarray(ids).ravel()],
                                skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size})"


def load_tokenizer_model(path: str | os.PathLike) -> SentencePieceTokenizer | HFTokenizer:
    """Loads a pretrained tokenizer file: a SentencePiece ``.model`` or a ``tokenizer.json``.

    The kind is read from the file (a JSON object is a ``tokenizer.json``, anything else
    is tried as a SentencePiece model), so the name does not matter.

    Raises:
      UserError: The file does not exist, is not a tokenizer, or needs a package that
        is not installed.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Tokenizer model {str(path)!r} does not exist (or is not a file)")
    with path.open("rb") as f:
        head = f.read(64).lstrip()
    if head.startswith(b"{"):
        return HFTokenizer(path)
    return SentencePieceTokenizer(path)


def get_tokenizer(
    name: str,
    *,
    documents: Sequence[str] | None = None,
    vocab_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Tokenizer:
    """Creates a tokenizer by name.

    Args:
      name: ``"byte"`` or ``"sentencepiece"`` (alias ``"spm"``, trained on ``documents``).
      documents: Training documents; required for ``"sentencepiece"``.
      vocab_size: ``"byte"``: must be ``None`` or 257. ``"sentencepiece"``: the
        requested size (default 2048).
      cache_dir: SentencePiece model cache directory.

    Returns:
      The tokenizer.

    Raises:
      UserError: Unknown name, inconsistent arguments, or ``sentencepiece`` requested
        but not installed.
    """
    kind = TOKENIZER_ALIASES.get(str(name).lower())
    if kind is None:
        raise UserError(f"Unknown tokenizer {name!r}; expected one of {TOKENIZERS}")
    if kind == "byte":
        if vocab_size not in (None, ByteTokenizer.vocab_size):
            raise UserError(
                f"The byte tokenizer has vocab_size {ByteTokenizer.vocab_size}, "
                f"got vocab_size={vocab_size}")
        return ByteTokenizer()
    if documents is None:
        raise ValueError("The sentencepiece tokenizer is trained on documents=, got None")
    return SentencePieceTokenizer.train(
        documents, vocab_size or DEFAULT_SPM_VOCAB_SIZE, cache_dir=cache_dir)
