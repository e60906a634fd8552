"""A LLaMa decoder-only language model in Flax NNX.

The architecture follows the LLaMa family as used by GaLore and the layer-wise
learning-rate (LLR) papers: pre-norm decoder blocks with RMSNorm, rotary
position embeddings (RoPE), causal multi-head attention with optional grouped
key/value heads, and a SwiGLU MLP. There are no biases anywhere.

Parameter names mirror the Hugging Face ``LlamaForCausalLM`` layout on purpose:
the ``llr_optax`` library groups parameters into layers by matching regular
expressions against key paths such as ``model/layers/0/self_attn/q_proj/kernel``,
so those attribute names are a contract and must not be renamed.

Every parameter is created through ``nnx.with_partitioning`` with *logical*
axis names. ``LOGICAL_AXIS_RULES`` maps them onto an FSDP mesh with axes
``("data", "fsdp")``. Without an active mesh the annotations are kept as
metadata only, so the model can be built on a single CPU (or under
``nnx.eval_shape``) and sharded later, e.g. via ``nnx.get_partition_spec``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Logical axis name -> mesh axis (or None for replicated) for a mesh with axes
# ("data", "fsdp"). Only the model dimension ("embed") is sharded: it appears in
# every weight matrix, so FSDP splits every parameter along one axis while the
# vocab / heads / mlp dimensions stay whole and need no extra collectives.
# "batch" is not a parameter axis; it is provided for sharding input batches
# over both mesh axes (pure data parallelism across all devices).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", None),
    ("heads", None),
    ("kv_heads", None),
    ("mlp", None),
    # Stacked MoE expert kernels [E, ...] (models/moe.py): replicated here; a mesh rule
    # may map "expert" onto a mesh axis (expert parallelism).
    ("expert", None),
)

# LLaMa / GaLore initialise every matrix (and the embedding) from N(0, 0.02^2).
_INIT_STD = 0.02


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Hyper-parameters of a LLaMa model.

    Attributes:
      vocab_size: Number of token ids.
      hidden: Model (residual stream) width ``d``.
      intermediate: Hidden width ``f`` of the SwiGLU MLP.
      num_heads: Number of query heads; must divide ``hidden``.
      num_kv_heads: Number of key/value heads; must divide ``num_heads``.
        ``None`` means standard multi-head attention (``num_heads``).
      num_layers: Number of decoder blocks.
      max_seq_len: Longest sequence the rotary tables cover.
      rope_theta: RoPE base frequency.
      norm_eps: Epsilon inside the RMSNorm square root.
      tie_embeddings: If True the output projection reuses the embedding.
      dtype: Computation dtype of activations.
      param_dtype: Storage dtype of parameters.
    """

    vocab_size: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int | None = None
    num_layers: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.num_kv_heads is None:
            # Frozen dataclass: normalising the default needs object.__setattr__.
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        for name in ("vocab_size", "hidden", "intermediate", "num_heads",
                     "num_kv_heads", "num_layers", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.hidden % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must divide hidden={self.hidden}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads={self.num_kv_heads} must divide "
                f"num_heads={self.num_heads}")
        if self.head_dim % 2:
            # RoPE rotates pairs of features, so each head needs an even width.
            raise ValueError(
                f"hidden/num_heads (head_dim={self.head_dim}) must be even for RoPE")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden // self.num_heads


def _init(names: tuple[str, ...], base=None):
    """Returns an initializer carrying logical sharding metadata.

    Eager sharding (flax's default) places a variable on the mesh as soon as
    it is created, which fails when no mesh is active. We only request it when
    a mesh is set, so the same code builds a plain model on one CPU and a
    sharded model inside ``jax.set_mesh(...)`` + ``nnx.logical_axis_rules(...)``.
    """
    base = base if base is not None else nnx.initializers.normal(_INIT_STD)
    eager = nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty
    return nnx.with_partitioning(base, names, eager_sharding=eager)


class RMSNorm(nnx.Module):
    """Root-mean-square layer norm with a learned scale and no bias.

    Args:
      dim: Feature width.
      eps: Added to the mean square before the square root.
      dtype: Output dtype.
      param_dtype: Dtype of the ``scale`` parameter.
      rngs: Unused by the ones-initializer but required by NNX initialisers.
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        del rngs  # Deterministic init; argument kept for a uniform API.
        self.eps = eps
        self.dtype = dtype
        init = _init(("embed",), nnx.initializers.ones)
        self.scale = nnx.Param(init(jax.random.key(0), (dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        # Normalise in float32 so bf16 activations do not lose the mean square.
        x32 = x.astype(jnp.float32)
        inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * inv_rms * self.scale[...].astype(jnp.float32)).astype(self.dtype)


@functools.lru_cache(maxsize=32)
def rope_tables(max_seq_len: int, head_dim: int,
                theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """Precomputes RoPE sine/cosine tables.

    They are constants, not parameters: kept as cached NumPy arrays so they
    never appear in the model state (optimisers, checkpoints) and are folded
    into the compiled program.

    Args:
      max_seq_len: Number of positions.
      head_dim: Even head width; frequency ``i`` drives features
        ``i`` and ``i + head_dim // 2`` (the "rotate half" layout).
      theta: Base frequency.

    Returns:
      ``(sin, cos)``, each float32 of shape ``(max_seq_len, head_dim // 2)``.
    """
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.arange(max_seq_len, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotates feature pairs ``(x[i], x[i + H/2])`` by position-dependent angles.

    Args:
      x: ``(B, T, heads, H)`` queries or keys.
      sin: ``(T, H/2)`` sines for the positions of ``x``.
      cos: ``(T, H/2)`` cosines for the positions of ``x``.

    Returns:
      The rotated array, same shape and dtype as ``x``.
    """
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    # Broadcast the tables over the batch and head axes.
    sin = sin[None, :, None, :]
    cos = cos[None, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _linear(din: int, dout: int, names: tuple[str, str], cfg: LlamaConfig,
            rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=False, dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype, kernel_init=_init(names),
                      rngs=rngs)


class Attention(nnx.Module):
    """Causal self-attention with RoPE and optional grouped K/V heads."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        kv_dim = cfg.num_kv_heads * cfg.head_dim
        self.q_proj = _linear(cfg.hidden, cfg.hidden, ("embed", "heads"), cfg, rngs)
        self.k_proj = _linear(cfg.hidden, kv_dim, ("embed", "kv_heads"), cfg, rngs)
        self.v_proj = _linear(cfg.hidden, kv_dim, ("embed", "kv_heads"), cfg, rngs)
        self.o_proj = _linear(cfg.hidden, cfg.hidden, ("heads", "embed"), cfg, rngs)

    def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
        """Applies attention to ``x`` of shape ``(B, T, hidden)``."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
        # dot_product_attention handles GQA natively (kv heads dividing q heads)
        # and applies the 1/sqrt(head_dim) scale and the causal mask.
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))


class MLP(nnx.Module):
    """SwiGLU feed-forward block: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.gate_proj = _linear(cfg.hidden, cfg.intermediate, ("embed", "mlp"), cfg, rngs)
        self.up_proj = _linear(cfg.hidden, cfg.intermediate, ("embed", "mlp"), cfg, rngs)
        self.down_proj = _linear(cfg.intermediate, cfg.hidden, ("mlp", "embed"), cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm decoder block: attention and MLP each behind an RMSNorm."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        norm = functools.partial(RMSNorm, cfg.hidden, eps=cfg.norm_eps,
                                 dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                 rngs=rngs)
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = norm()
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), sin, cos)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nnx.Module):
    """Embedding, decoder stack and final norm (everything but the LM head)."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, layer=None):
        """``layer``: the block class (default ``DecoderLayer``); the MoE model passes its
        own, whose blocks return ``(x, stats)`` (see :meth:`hidden_and_stats`)."""
        self.config = cfg
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden, dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=_init(("vocab", "embed")), rngs=rngs)
        # nnx.List (not a plain list) so the blocks are registered as data and
        # their parameters get the key paths layers/0/..., layers/1/...
        layer = DecoderLayer if layer is None else layer
        self.layers = nnx.List(
            [layer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden, eps=cfg.norm_eps, dtype=cfg.dtype,
                            param_dtype=cfg.param_dtype, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Maps ``(B, T)`` int tokens to final-normed hidden states ``(B, T, d)``."""
        return self.hidden_and_stats(tokens)[0]

    def hidden_and_stats(self, tokens: jax.Array) -> tuple[jax.Array, list[dict]]:
        """Final-normed hidden states and the per-layer stats of blocks that return
        ``(x, stats)`` (MoE routers; none for dense blocks)."""
        cfg = self.config
        t = tokens.shape[1]
        if t > cfg.max_seq_len:
            raise ValueError(
                f"sequence length {t} exceeds max_seq_len={cfg.max_seq_len}")
        sin, cos = rope_tables(cfg.max_seq_len, cfg.head_dim, float(cfg.rope_theta))
        sin, cos = jnp.asarray(sin[:t]), jnp.asarray(cos[:t])
        x = self.embed_tokens(tokens)
        stats = []
        for layer in self.layers:
            x = layer(x, sin, cos)
            if isinstance(x, tuple):  # decided while tracing: no cost in the compiled step
                x, layer_stats = x
                stats.append(layer_stats)
        return self.norm(x), stats


class LLaMa(nnx.Module):
    """LLaMa causal language model.

    Args:
      config: Model hyper-parameters.
      rngs: Random streams for parameter initialisation.

    Attributes:
      model: The ``LlamaModel`` trunk (``embed_tokens``, ``layers``, ``norm``).
      lm_head: Output projection ``(hidden, vocab)``, or ``None`` when the
        embeddings are tied.
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = LlamaModel(config, rngs=rngs)
        self.lm_head = (None if config.tie_embeddings else
                        _linear(config.hidden, config.vocab_size,
                                ("embed", "vocab"), config, rngs))

    def __call__(self, tokens: jax.Array, *, return_aux: bool = False):
        """Returns float32 logits ``(B, T, vocab)`` for int tokens ``(B, T)``.

        With ``return_aux`` it returns ``(logits, {})``: the calling convention every
        model in ``models/`` shares (the MoE model fills the dict with its auxiliary
        router losses), so a trainer can treat them alike.
        """
        h = self.model(tokens)
        if self.lm_head is None:
            logits = self.model.embed_tokens.attend(h)
        else:
            logits = self.lm_head(h)
        logits = logits.astype(jnp.float32)
        return (logits, {}) if return_aux else logits
