"""Named model sizes, one config/model factory for all of them, parameter counts.

Three families, one dict of shapes each; the vocabulary size and context length always
come from the caller (whichever tokenizer and sequence length the run uses):

* ``PRESETS`` (dense LLaMa): ``20m`` ... ``1b`` are the LLaMa configurations of GaLore
  and the layer-wise learning-rate papers (which pair them with a 32000-token
  vocabulary); ``tiny`` is a CPU demo size, about 1.3 M parameters with a byte vocab.
* ``MOE_PRESETS`` (``models.moe``): ``moe-8x34m`` is RLRS's smallest MoE (its appendix
  table: d_model 512, 8 layers, 8 experts, top-1; 33.6 M active / 210 M total
  parameters without embeddings, which pins each expert's SwiGLU width at
  ``f = 4 * d_model = 2048``: 8 * (4 d^2 + 3 d f) = 33.6 M and 8 * (4 d^2 + 8 * 3 d f)
  = 210 M; the head count is not given, we take 8, i.e. 64-wide heads).
  ``moe-tiny`` is a CPU demo size in the spirit of ``tiny``.
* ``GPT2_PRESETS`` (``models.gpt2``): ``gpt2-124m`` is GPT-2 small (12 layers, 12
  heads, 768 wide; GPT-2 itself used vocab 50257 and context 1024). ``gpt-nano`` is
  the LLR paper's "GPT-nano (135M)": the paper gives only that size, no shape; the
  135 M LLaMa of its Table 11 is 768 wide with 12 layers and 12 heads, and a GPT of
  that shape has 124 M (GPT-2 vocabulary, tied) to 135 M (32000 vocabulary, untied)
  parameters, so we take that shape: the same as ``gpt2-124m``. ``gpt-tiny`` is a CPU
  demo size.

``model_config(preset, vocab_size, max_seq_len)`` builds the config of any preset and
``create_model(config, rngs=...)`` the matching model.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from models.gpt2 import GPT2, GPT2Config
from models.llama import LLaMa, LlamaConfig
from models.moe import MoeConfig, MoeLLaMa

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

# MoE LLaMa shapes (``MoeConfig`` fields); ``intermediate`` is each expert's width.
# moe-tiny: 8 experts of width 256 in 4 layers; dense dispatch runs all 8 on every token,
# so a training step costs 2.1x a ``tiny`` step on 2 CPU cores (benchmarks/model_step_bench.py:
# 1010 vs 472 ms at batch 16 x 128 on a busy machine); from tiny's 75 s run, about 3 min.
MOE_PRESETS: dict[str, dict[str, Any]] = {
    "moe-tiny": dict(hidden=128, intermediate=256, num_heads=4, num_layers=4,
                     num_experts=8, top_k=1),
    "moe-8x34m": dict(hidden=512, intermediate=2048, num_heads=8, num_layers=8,
                      num_experts=8, top_k=1),
}

# GPT-2 shapes (``GPT2Config`` fields; the MLP is 4 * hidden wide).
GPT2_PRESETS: dict[str, dict[str, Any]] = {
    "gpt-tiny": dict(hidden=128, num_heads=4, num_layers=6),
    "gpt-nano": dict(hidden=768, num_heads=12, num_layers=12),
    "gpt2-124m": dict(hidden=768, num_heads=12, num_layers=12),
}

# Every preset name -> (config class, shape).
_FAMILIES = ((LlamaConfig, PRESETS), (MoeConfig, MOE_PRESETS), (GPT2Config, GPT2_PRESETS))
ALL_PRESETS: tuple[str, ...] = tuple(name for _, table in _FAMILIES for name in table)


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


def param_count(config: LlamaConfig | MoeConfig | GPT2Config) -> int:
    """Closed-form number of parameters of the model of ``config`` (all experts).

    Args:
      config: Any model config.

    Returns:
      LLaMa: embedding ``V*d`` + per layer (q and o ``d*d`` each, k and v
      ``d*kv_dim`` each, SwiGLU ``3*d*f``, two norms ``2*d``) + final norm
      ``d`` + untied head ``d*V``. MoE: the SwiGLU term becomes ``E*3*d*f`` plus
      the router ``d*E``. GPT-2: ``V*d + T*d`` embeddings + per layer
      (two LayerNorm scales ``2*d``, ``c_attn`` ``3*d*d``, ``c_proj`` ``d*d``, MLP
      ``2*d*f``, and with biases ``2*d + 3*d + d + f + d``) + ``ln_f`` (``d``, plus
      ``d`` of bias) + untied head.
    """
    if isinstance(config, GPT2Config):
        return _gpt2_param_count(config)
    d, f, v = config.hidden, config.intermediate, config.vocab_size
    kv_dim = config.num_kv_heads * config.head_dim
    mlp = 3 * d * f
    if isinstance(config, MoeConfig):
        mlp = config.num_experts * mlp + d * config.num_experts
    per_layer = 2 * d * d + 2 * d * kv_dim + mlp + 2 * d
    head = 0 if config.tie_embeddings else d * v
    return v * d + config.num_layers * per_layer + d + head


def model_config(preset: str, vocab_size: int, max_seq_len: int,
                 **overrides: Any) -> LlamaConfig | MoeConfig | GPT2Config:
    """The config of any preset in ``ALL_PRESETS`` (LLaMa, MoE LLaMa or GPT-2).

    Args:
      preset: A name from ``PRESETS``, ``MOE_PRESETS`` or ``GPT2_PRESETS``.
      vocab_size: Vocabulary size of the tokenizer in use.
      max_seq_len: Longest training/eval sequence.
      **overrides: Fields of that family's config; these win over the preset.

    Raises:
      ValueError: Unknown preset, or an invalid resulting config.
      TypeError: An override that is not a field of the family's config.
    """
    for config_cls, table in _FAMILIES:
        if preset in table:
            return config_cls(**{**table[preset], "vocab_size": vocab_size,
                                 "max_seq_len": max_seq_len, **overrides})
    raise ValueError(
        f"unknown preset {preset!r}; valid presets: {', '.join(ALL_PRESETS)}")


def create_model(config: LlamaConfig | MoeConfig | GPT2Config, *,
                 rngs: nnx.Rngs) -> LLaMa | MoeLLaMa | GPT2:
    """The model of a config: ``MoeLLaMa``, ``GPT2`` or ``LLaMa``."""
    if isinstance(config, MoeConfig):  # before LlamaConfig: a MoeConfig is one
        return MoeLLaMa(config, rngs=rngs)
    if isinstance(config, GPT2Config):
        return GPT2(config, rngs=rngs)
    if isinstance(config, LlamaConfig):
        return LLaMa(config, rngs=rngs)
    raise TypeError(f"not a model config: {type(config).__name__}")


def _gpt2_param_count(config: GPT2Config) -> int:
    d, f, v = config.hidden, config.intermediate, config.vocab_size
    bias = int(config.use_bias)
    per_layer = (2 * d + bias * 2 * d         # ln_1, ln_2: scale (and bias)
                 + 3 * d * d + bias * 3 * d   # c_attn
                 + d * d + bias * d           # attn c_proj
                 + d * f + bias * f           # c_fc
                 + f * d + bias * d)          # mlp c_proj
    head = 0 if config.tie_embeddings else d * v
    ln_f = d + bias * d
    return v * d + config.max_seq_len * d + config.num_layers * per_layer + ln_f + head


def active_param_count(config: LlamaConfig | MoeConfig | GPT2Config, *,
                       embeddings: bool = True) -> int:
    """Parameters one token passes through: for a MoE, only ``top_k`` of the experts.

    Args:
      config: Any model config.
      embeddings: Count the token/position embeddings and the untied head. RLRS
        sizes its MoE models (33.6 M active for ``moe-8x34m``) without them.
    """
    total = param_count(config)
    if isinstance(config, MoeConfig):
        idle = config.num_experts - config.top_k
        total -= config.num_layers * idle * 3 * config.hidden * config.intermediate
    if not embeddings:
        d, v = config.hidden, config.vocab_size
        total -= v * d + (0 if config.tie_embeddings else d * v)
        if isinstance(config, GPT2Config):
            total -= config.max_seq_len * d
    return total
