"""A GPT-2 decoder-only language model in Flax NNX.

The GPT-2 architecture: learned token and position embeddings, pre-norm blocks with
LayerNorm (scale and bias), causal multi-head attention with a fused ``c_attn``
query/key/value projection, a GELU MLP (``c_fc`` -> GELU (tanh approximation) ->
``c_proj``), a final LayerNorm, and an output head tied to the token embedding (the
same ``nnx.Param``: one leaf, one gradient, one optimizer state). Every linear map and
LayerNorm has a bias unless ``use_bias=False`` (nanoGPT's ``bias=False``: the variant
the init-grad paper trained, "no bias on the linear and layer norm layers").

Parameter names follow Hugging Face's ``GPT2LMHeadModel`` (``wte``, ``wpe``,
``h/<i>/ln_1``, ``attn/c_attn``, ``attn/c_proj``, ``ln_2``, ``mlp/c_fc``,
``mlp/c_proj``, ``ln_f``) because ``llr_optax.label_params`` reads module types off
these names: they are a contract. The labels are ``embed`` (``wte``), ``pos_embed``
(``wpe``), ``attn_qkv``, ``attn_o``, ``mlp_up``, ``mlp_down``, ``norm`` and ``bias``.

Initialisation (for training) is GPT-2's: every kernel and both embeddings from
``N(0, 0.02^2)``, the two residual output projections (``attn/c_proj``,
``mlp/c_proj``) from ``N(0, 0.02^2 / (2 * num_layers))``, biases 0, LayerNorm scales 1.
The init-grad paper's measuring initialisation is ``llr_optax.fan_in_init(...,
rule="paper")``.

Sharding: every parameter carries logical axis names as in ``models.llama`` (the
position axis of ``wpe`` has none: it is replicated).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models.llama import _INIT_STD, _init


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPT2Config:
    """Hyper-parameters of a GPT-2 model (field names as in ``LlamaConfig``).

    Attributes:
      vocab_size: Number of token ids.
      hidden: Model width ``d``.
      num_heads: Attention heads; must divide ``hidden``.
      num_layers: Number of blocks.
      max_seq_len: Context length (rows of the position embedding ``wpe``).
      intermediate: MLP hidden width; ``None`` means ``4 * hidden`` (GPT-2).
      norm_eps: LayerNorm epsilon.
      use_bias: Biases on every linear map and LayerNorm (GPT-2); ``False`` drops all
        of them (the init-grad paper's GPT-2 variant).
      tie_embeddings: Output head = token embedding (GPT-2). ``False`` adds an
        ``lm_head`` of its own.
      dtype: Computation dtype of activations.
      param_dtype: Storage dtype of parameters.
    """

    vocab_size: int
    hidden: int
    num_heads: int
    num_layers: int
    max_seq_len: int
    intermediate: int | None = None
    norm_eps: float = 1e-5
    use_bias: bool = True
    tie_embeddings: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.intermediate is None:
            object.__setattr__(self, "intermediate", 4 * self.hidden)
        for name in ("vocab_size", "hidden", "intermediate", "num_heads", "num_layers",
                     "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.hidden % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide hidden={self.hidden}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden // self.num_heads


class LayerNorm(nnx.Module):
    """LayerNorm with a learned scale and (optional) bias, statistics in float32."""

    def __init__(self, dim: int, *, eps: float = 1e-5, use_bias: bool = True,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        self.eps = eps
        self.dtype = dtype
        key = jax.random.key(0)  # deterministic ones/zeros: the key is unused
        self.scale = nnx.Param(_init(("embed",), nnx.initializers.ones)(key, (dim,), param_dtype))
        self.bias = (nnx.Param(_init(("embed",), nnx.initializers.zeros)(key, (dim,), param_dtype))
                     if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def _dense(din: int, dout: int, names: tuple[str, str], cfg: GPT2Config, rngs: nnx.Rngs,
           std: float = _INIT_STD) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=cfg.use_bias, dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype,
                      kernel_init=_init(names, nnx.initializers.normal(std)),
                      bias_init=_init(names[1:], nnx.initializers.zeros), rngs=rngs)


class CausalSelfAttention(nnx.Module):
    """Multi-head causal attention with a fused ``c_attn`` (q, k, v) projection."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        residual_std = _INIT_STD / math.sqrt(2 * cfg.num_layers)
        self.c_attn = _dense(cfg.hidden, 3 * cfg.hidden, ("embed", "heads"), cfg, rngs)
        self.c_proj = _dense(cfg.hidden, cfg.hidden, ("heads", "embed"), cfg, rngs,
                             std=residual_std)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
        shape = (b, t, self.num_heads, self.head_dim)
        out = jax.nn.dot_product_attention(q.reshape(shape), k.reshape(shape),
                                           v.reshape(shape), is_causal=True)
        return self.c_proj(out.reshape(b, t, d))


class MLP(nnx.Module):
    """``c_proj(gelu(c_fc(x)))`` with GPT-2's tanh-approximated GELU."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        residual_std = _INIT_STD / math.sqrt(2 * cfg.num_layers)
        self.c_fc = _dense(cfg.hidden, cfg.intermediate, ("embed", "mlp"), cfg, rngs)
        self.c_proj = _dense(cfg.intermediate, cfg.hidden, ("mlp", "embed"), cfg, rngs,
                             std=residual_std)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=True))


class Block(nnx.Module):
    """Pre-norm GPT-2 block."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        norm = lambda: LayerNorm(cfg.hidden, eps=cfg.norm_eps, use_bias=cfg.use_bias,
                                 dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.ln_1 = norm()
        self.attn = CausalSelfAttention(cfg, rngs=rngs)
        self.ln_2 = norm()
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2(nnx.Module):
    """GPT-2 causal language model; same constructor and call as ``models.LLaMa``.

    Args:
      config: Model hyper-parameters.
      rngs: Random streams for parameter initialisation.

    Attributes:
      wte: Token embedding ``(vocab, hidden)``; also the output head when tied.
      wpe: Position embedding ``(max_seq_len, hidden)``.
      h: The blocks.
      ln_f: Final LayerNorm.
      lm_head: Untied output projection ``(hidden, vocab)``, or ``None`` (tied).
    """

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        cfg = self.config = config
        embed = lambda rows, names: nnx.Embed(
            rows, cfg.hidden, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            embedding_init=_init(names, nnx.initializers.normal(_INIT_STD)), rngs=rngs)
        self.wte = embed(cfg.vocab_size, ("vocab", "embed"))
        self.wpe = embed(cfg.max_seq_len, (None, "embed"))
        self.h = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.ln_f = LayerNorm(cfg.hidden, eps=cfg.norm_eps, use_bias=cfg.use_bias,
                              dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.lm_head = None if cfg.tie_embeddings else nnx.Linear(
            cfg.hidden, cfg.vocab_size, use_bias=False, dtype=cfg.dtype,
            param_dtype=cfg.param_dtype, kernel_init=_init(("embed", "vocab")), rngs=rngs)

    def __call__(self, tokens: jax.Array, *, return_aux: bool = False):
        """Float32 logits ``(B, T, vocab)`` for int tokens ``(B, T)``.

        Args:
          tokens: Input token ids, ``T <= max_seq_len``.
          return_aux: Return ``(logits, {})`` instead (the shared calling convention;
            a dense model has no auxiliary losses).
        """
        t = tokens.shape[1]
        if t > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {t} exceeds max_seq_len={self.config.max_seq_len}")
        x = self.wte(tokens) + self.wpe(jnp.arange(t))[None]
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        logits = (self.wte.attend(x) if self.lm_head is None
                  else self.lm_head(x)).astype(jnp.float32)
        return (logits, {}) if return_aux else logits
