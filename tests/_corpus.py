"""Small deterministic corpora shared by the data, tokenizer and prepare tests."""

from __future__ import annotations

import numpy as np

WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
    "rho sigma tau upsilon phi chi psi omega"
).split()


def documents(n: int, seed: int = 0) -> list[str]:
    """n distinct, deterministic documents of 40-120 words (with some non-ASCII)."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(40, 120)))
        docs.append(f"Document {i} café naïve. " + " ".join(words) + ".")
    return docs
