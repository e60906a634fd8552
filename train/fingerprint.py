"""What a checkpoint records about its data, so a resume on other data is refused.

A data fingerprint is a small JSON-able dict::

    {"version": 1,
     "corpus": "enwiki sample from gensim test data (...)",     # for the message only
     "tokenizer": "byte" | "sentencepiece" | "huggingface" | None,
     "tokenizer_sha256": hex of the tokenizer's model file (None: pre-tokenised ids),
     "tokens_sha256": hex of the token streams the run trains and evaluates on}

``tokens_sha256`` is computed from content, never from paths:

* corpora held in memory (the default corpus, text files, ``.npy`` ids): SHA-256 of
  the train and validation token streams themselves, so it changes with the text, the
  split and the tokenizer (~0.1 s for the default corpus's 6.5 M tokens);
* prepared corpora: the hash of their index, which holds every shard's SHA-256
  computed at prepare time (:attr:`train.shards.PreparedCorpus.fingerprint`), so a
  start reads no shard.

:func:`data_change` compares a saved fingerprint with the current one and says, in one
line, what differs; the training loop refuses to resume when it does. This is what
stops a run started with gensim installed (Wikipedia sample) from silently resuming
without it (pydoc fallback corpus).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["FINGERPRINT_VERSION", "data_change", "make_fingerprint", "stream_sha256"]

FINGERPRINT_VERSION = 1


def stream_sha256(**streams: np.ndarray) -> str:
    """SHA-256 of named in-memory token streams, as ``int32`` (names and lengths included)."""
    digest = hashlib.sha256()
    for name, stream in sorted(streams.items()):
        array = np.ascontiguousarray(stream, np.int32)
        digest.update(f"{name}:{len(array)}:".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def make_fingerprint(corpus: str, tokenizer: str | None, tokenizer_sha256: str | None,
                     tokens_sha256: str) -> dict[str, Any]:
    """The fingerprint dict (see the module docstring)."""
    return {"version": FINGERPRINT_VERSION, "corpus": corpus, "tokenizer": tokenizer,
            "tokenizer_sha256": tokenizer_sha256, "tokens_sha256": tokens_sha256}


def _short(digest: str | None) -> str:
    return "none" if digest is None else digest[:12]


def data_change(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """What differs between the data of a checkpoint and of this run, or ``None``.

    Args:
      saved: The fingerprint stored with the checkpoint.
      current: This run's fingerprint.

    Returns:
      ``None`` when both describe the same tokens made by the same tokenizer; else one
      line naming what changed (tokenizer first: it changes every token).
    """
    if saved.get("version") != current.get("version"):
        return (f"its data fingerprint has version {saved.get('version')!r}, this code "
                f"writes {current.get('version')!r}")
    if saved.get("tokenizer_sha256") != current.get("tokenizer_sha256"):
        return (f"the tokenizer differs: checkpoint {saved.get('tokenizer')} "
                f"(sha256 {_short(saved.get('tokenizer_sha256'))}), this run "
                f"{current.get('tokenizer')} (sha256 {_short(current.get('tokenizer_sha256'))})")
    if saved.get("tokens_sha256") != current.get("tokens_sha256"):
        return (f"the corpus differs: checkpoint {saved.get('corpus')!r} (tokens sha256 "
                f"{_short(saved.get('tokens_sha256'))}), this run {current.get('corpus')!r} "
                f"(tokens sha256 {_short(current.get('tokens_sha256'))})")
    return None
