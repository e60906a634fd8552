"""Splitting documents into train/validation, and encoding them into token streams.

Validation is chosen per document by a seeded hash of its text (never by position), so
a document is in exactly one split whatever the order of the corpus, the training seed
or the number of processes. Two rules use the same hash:

* :func:`split_documents` (corpora held in memory): the ``round(val_fraction * n)``
  documents with the smallest hashes (at least one) go to validation -- an exact count.
* :func:`is_validation_document` (``python -m train.prepare``, which streams): a document
  goes to validation when its hash, read as a fraction of ``2**64``, is below
  ``val_fraction`` -- decided for each document alone, so the corpus never has to be
  held; the count is ``val_fraction * n`` in expectation.

Both rules put the documents of lowest hash into validation, so for a large corpus they
agree except near the threshold.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from train.errors import UserError
from train.tokenizers import Tokenizer

__all__ = ["encode_documents", "is_validation_document", "split_documents"]


def _doc_rank_key(doc: str, seed: int) -> bytes:
    return hashlib.blake2b(doc.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()


def is_validation_document(doc: str, val_fraction: float, *, seed: int = 0) -> bool:
    """Whether a document belongs to the validation split under the streaming rule.

    Args:
      doc: The document's text.
      val_fraction: Expected fraction of documents for validation, in ``[0, 1)``.
      seed: Split seed.

    Returns:
      ``blake2b-64(doc, key=seed) / 2**64 < val_fraction``.
    """
    return int.from_bytes(_doc_rank_key(doc, seed), "big") < val_fraction * 2.0**64


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
        raise UserError(f"val_fraction must lie in [0, 1), got {val_fraction}")
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
