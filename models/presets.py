"""Named LLaMa sizes and a closed-form parameter count.

The ``20m`` ... ``1b`` shapes are the LLaMa configurations used by GaLore and
the layer-wise learning-rate papers (which pair them with a 32000-token
vocabulary); here the vocabulary size comes from whichever tokenizer is used.
``tiny`` is a CPU demo size: about 1.3 M parameters with a byte-level vocab.
"""

from __future__ import annotations

from typing import Any

from models.llama import LlamaConfig

# Shapes only; vocab_size and max_seq_len are supplied by llama_config().
# intermediate is ~8/3 * hidden rounded up to a multiple of 16/32, as in GaLore.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden=128, intermediate=352, num_heads=4, num_layers=6),
    "20m": dict(hidden=256, intermediate=688, num_heads=4, num_layers=4),
    "60m": dict(hidden=512, intermediate=1376, num_heads=8, num_layers=8),
    "130m": dict(hidden=768, intermediate=2048, num_heads=12, num_layers=12),
    "350m": dict(hidden=1024, intermediate=2736, num_heads=16, num_layers=24),
    "1b": dict(hidden=2048, intermediate=5461, num_heads=32, num_layers=24),
}


def llama_config(preset: str, vocab_size: int, max_seq_len: int,
                 **overrides: Any) -> LlamaConfig:
    """Builds the ``LlamaConfig`` of a named preset.

    Args:
      preset: One of ``PRESETS``.
      vocab_size: Vocabulary size of the tokenizer in use.
      max_seq_len: Longest training/eval sequence.
      **overrides: Any other ``LlamaConfig`` field (e.g. ``num_kv_heads``,
        ``tie_embeddings``, ``dtype``); these win over the preset.

    Returns:
      The validated config.

    Raises:
      ValueError: If ``preset`` is unknown or the resulting config is invalid.
    """
    if preset not in PRESETS:
        raise ValueError(
            f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    kwargs = {**PRESETS[preset], "vocab_size": vocab_size,
              "max_seq_len": max_seq_len, **overrides}
    return LlamaConfig(**kwargs)


def param_count(config: LlamaConfig) -> int:
    """Closed-form number of parameters of ``LLaMa(config)``.

    Args:
      config: The model config.

    Returns:
      Embedding ``V*d`` + per layer (q and o ``d*d`` each, k and v
      ``d*kv_dim`` each, SwiGLU ``3*d*f``, two norms ``2*d``) + final norm
      ``d`` + untied head ``d*V``.
    """
    d, f, v = config.hidden, config.intermediate, config.vocab_size
    kv_dim = config.num_kv_heads * config.head_dim
    per_layer = 2 * d * d + 2 * d * kv_dim + 3 * d * f + 2 * d
    head = 0 if config.tie_embeddings else d * v
    return v * d + config.num_layers * per_layer + d + head
