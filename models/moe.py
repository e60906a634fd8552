"""A Mixture-of-Experts LLaMa in Flax NNX (RLRS's MoE setting).

Each decoder block is the dense LLaMa block (``models.llama``: RMSNorm, RoPE attention)
with its SwiGLU MLP replaced by token-choice routing over ``E`` SwiGLU experts: every
token picks its ``top_k`` experts (RLRS: top-1 of 8) from a softmax router and the block
outputs the routing-weighted sum of their outputs.

Layout of the MoE parameters (key paths relative to ``model/layers/<i>/moe``)::

    router/kernel          [d, E]     logits = x @ kernel, computed in float32
    experts/gate_proj      [E, d, f]  one stacked leaf per projection, so per-matrix
    experts/up_proj        [E, d, f]  methods (alpha_hill's "leading axes are a batch of
    experts/down_proj      [E, f, d]  matrices") and Muon see one matrix per expert

``llr_optax.label_params`` labels them ``router`` and ``expert``. The expert axis has the
logical sharding name ``"expert"`` (replicated by ``LOGICAL_AXIS_RULES``; a mesh rule
may map it onto a mesh axis to spread the experts over devices).

Dispatch is dense: every expert runs on every token and the outputs are combined with
routing weights that are zero for the experts a token did not choose. The result (values
and gradients) equals sparse dispatch without a capacity limit (no token is dropped);
the cost is ``E / top_k`` times the FLOPs of sparse dispatch, fine on CPU and for small
models.

Auxiliary router losses, per MoE layer over the ``n`` tokens of the batch, with router
logits ``z`` (``[n, E]``), probabilities ``p = softmax(z)`` and the top-k choices:

* z-loss (ST-MoE): ``mean_i (logsumexp_e z_ie)^2``;
* load balancing (Switch Transformer): ``E * sum_e f_e * P_e`` with ``f_e`` the
  fraction of the ``n * top_k`` token->expert assignments that went to expert ``e``
  (no gradient: a count) and ``P_e = mean_i p_ie``. It is 1 for perfectly uniform
  routing and ``E`` when one expert takes every token with probability 1.

The model returns them averaged over layers (so the weights do not need retuning with
depth) in an ``aux`` dict, see :meth:`MoeLLaMa.__call__`. The trainer adds
``aux["aux_loss"] = z_weight * router_z_loss + balance_weight * load_balance_loss``
(RLRS: 1e-3 and 1e-2) to the cross-entropy and can log the parts separately. We return
them instead of ``nnx.sow``-ing them: a sown value is state that stays on the module
after any call outside the loss (evaluation, shape inference), changing the model's
state tree between calls and leaking into checkpoints and jitted step signatures.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from models.llama import Attention, LlamaConfig, LlamaModel, RMSNorm, _init, _linear


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoeConfig(LlamaConfig):
    """Hyper-parameters of a MoE LLaMa: a ``LlamaConfig`` plus the routing.

    ``intermediate`` is the hidden width ``f`` of each SwiGLU expert.

    Attributes:
      num_experts: Number of experts ``E`` per MoE layer.
      top_k: Experts each token is routed to (token choice), ``1 <= top_k <= E``.
      normalize_top_k: Renormalise the chosen experts' probabilities to sum to 1.
        Off by default (Switch style: the weight is the router probability itself);
        with ``top_k=1`` it must stay off, since a weight of exactly 1 would give the
        router no gradient from the language-model loss.
      router_z_loss_weight: Weight of the router z-loss in ``aux["aux_loss"]``.
      load_balance_loss_weight: Weight of the load-balancing loss in
        ``aux["aux_loss"]``.
    """

    num_experts: int = 8
    top_k: int = 1
    normalize_top_k: bool = False
    router_z_loss_weight: float = 1e-3
    load_balance_loss_weight: float = 1e-2

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_experts", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k={self.top_k} must not exceed num_experts={self.num_experts}")
        if self.normalize_top_k and self.top_k == 1:
            raise ValueError("normalize_top_k with top_k=1 makes every routing weight 1, "
                             "so the router gets no gradient; use top_k >= 2")
        for name in ("router_z_loss_weight", "load_balance_loss_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")


def route(logits: jax.Array, top_k: int, normalize: bool = False):
    """Token-choice top-k routing from float32 router logits.

    Args:
      logits: ``[n, E]`` router logits.
      top_k: Experts per token.
      normalize: Renormalise the chosen probabilities to sum to 1 per token.

    Returns:
      ``(combine, probs, dispatch)``, each ``[n, E]`` float32: the routing weight of
      each (token, expert) pair (zero where not chosen), the softmax probabilities,
      and the 0/1 choice mask.
    """
    probs = jax.nn.softmax(logits, axis=-1)
    top_p, top_i = jax.lax.top_k(probs, top_k)
    if normalize:
        top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
    chosen = jax.nn.one_hot(top_i, logits.shape[-1], dtype=jnp.float32)  # [n, k, E]
    combine = jnp.einsum("nk,nke->ne", top_p, chosen)
    dispatch = jnp.sum(chosen, axis=1)
    return combine, probs, dispatch


def router_z_loss(logits: jax.Array) -> jax.Array:
    """ST-MoE z-loss: mean over tokens of ``logsumexp(logits)^2`` (float32 scalar)."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))


def load_balance_loss(probs: jax.Array, dispatch: jax.Array) -> jax.Array:
    """Switch-Transformer balance loss ``E * sum_e f_e P_e`` (see the module docstring).

    Args:
      probs: ``[n, E]`` router probabilities.
      dispatch: ``[n, E]`` 0/1 mask of the chosen experts (``top_k`` ones per row).
    """
    num_experts = probs.shape[-1]
    fraction = jax.lax.stop_gradient(dispatch / jnp.sum(dispatch))  # f_e summed over e = 1
    return num_experts * jnp.sum(jnp.sum(fraction, axis=0) * jnp.mean(probs, axis=0))


class Router(nnx.Module):
    """Linear router ``[d, E]`` without bias whose logits are computed in float32."""

    def __init__(self, cfg: MoeConfig, *, rngs: nnx.Rngs):
        # The expert columns stay replicated: the softmax needs all of them on every
        # device, and the matrix is tiny.
        init = _init(("embed", None))
        self.kernel = nnx.Param(
            init(rngs.params(), (cfg.hidden, cfg.num_experts), cfg.param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x.astype(jnp.float32) @ self.kernel[...].astype(jnp.float32)


class Experts(nnx.Module):
    """``E`` SwiGLU MLPs with stacked kernels ``[E, d, f]``, ``[E, d, f]``, ``[E, f, d]``."""

    def __init__(self, cfg: MoeConfig, *, rngs: nnx.Rngs):
        self.dtype = cfg.dtype
        e, d, f = cfg.num_experts, cfg.hidden, cfg.intermediate

        def param(shape, names):
            return nnx.Param(_init(names)(rngs.params(), shape, cfg.param_dtype))

        self.gate_proj = param((e, d, f), ("expert", "embed", "mlp"))
        self.up_proj = param((e, d, f), ("expert", "embed", "mlp"))
        self.down_proj = param((e, f, d), ("expert", "mlp", "embed"))

    def __call__(self, x: jax.Array, combine: jax.Array) -> jax.Array:
        """Dense dispatch: ``sum_e combine[:, e] * expert_e(x)`` for ``x`` ``[n, d]``."""
        x = x.astype(self.dtype)
        kernel = lambda p: p[...].astype(self.dtype)
        gate = jnp.einsum("nd,edf->enf", x, kernel(self.gate_proj))
        up = jnp.einsum("nd,edf->enf", x, kernel(self.up_proj))
        out = jnp.einsum("enf,efd->end", jax.nn.silu(gate) * up, kernel(self.down_proj))
        return jnp.einsum("ne,end->nd", combine.astype(self.dtype), out)


class MoeBlock(nnx.Module):
    """Router + experts: the MoE replacement of the SwiGLU MLP."""

    def __init__(self, cfg: MoeConfig, *, rngs: nnx.Rngs):
        self.top_k = cfg.top_k
        self.normalize_top_k = cfg.normalize_top_k
        self.router = Router(cfg, rngs=rngs)
        self.experts = Experts(cfg, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Returns the block output (shape of ``x``) and this layer's router statistics."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits = self.router(flat)
        combine, probs, dispatch = route(logits, self.top_k, self.normalize_top_k)
        out = self.experts(flat, combine).reshape(shape)
        stats = {"router_z_loss": router_z_loss(logits),
                 "load_balance_loss": load_balance_loss(probs, dispatch),
                 "expert_load": jnp.sum(dispatch, axis=0) / jnp.sum(dispatch)}
        return out, stats


class MoeDecoderLayer(nnx.Module):
    """Pre-norm block: LLaMa attention, then the MoE block, each behind an RMSNorm."""

    def __init__(self, cfg: MoeConfig, *, rngs: nnx.Rngs):
        norm = functools.partial(RMSNorm, cfg.hidden, eps=cfg.norm_eps,
                                 dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                 rngs=rngs)
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = norm()
        self.moe = MoeBlock(cfg, rngs=rngs)

    def __call__(self, x, sin, cos):
        x = x + self.self_attn(self.input_layernorm(x), sin, cos)
        out, stats = self.moe(self.post_attention_layernorm(x))
        return x + out, stats


class MoeModel(LlamaModel):
    """Embedding, MoE decoder stack and final norm (everything but the LM head): the LLaMa
    trunk with ``MoeDecoderLayer`` blocks."""

    def __init__(self, cfg: MoeConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs, layer=MoeDecoderLayer)

    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, list[dict]]:
        """``(B, T)`` tokens -> final-normed hidden states and per-layer router stats."""
        return self.hidden_and_stats(tokens)


class MoeLLaMa(nnx.Module):
    """MoE LLaMa causal language model; same constructor and call as ``LLaMa``.

    Args:
      config: Model hyper-parameters.
      rngs: Random streams for parameter initialisation.

    Attributes:
      model: The ``MoeModel`` trunk (``embed_tokens``, ``layers``, ``norm``).
      lm_head: Output projection ``(hidden, vocab)``, or ``None`` when tied.
    """

    def __init__(self, config: MoeConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, MoeConfig):
            raise TypeError(f"MoeLLaMa needs a MoeConfig, got {type(config).__name__}")
        self.config = config
        self.model = MoeModel(config, rngs=rngs)
        self.lm_head = (None if config.tie_embeddings else
                        _linear(config.hidden, config.vocab_size,
                                ("embed", "vocab"), config, rngs))

    def __call__(self, tokens: jax.Array, *, return_aux: bool = False):
        """Float32 logits ``(B, T, vocab)`` for int tokens ``(B, T)``.

        Args:
          tokens: Input token ids.
          return_aux: Also return the router statistics.

        Returns:
          ``logits``, or ``(logits, aux)`` with ``return_aux``. ``aux`` holds float32
          scalars averaged over the MoE layers, ``router_z_loss`` and
          ``load_balance_loss`` (unweighted), ``aux_loss`` (their weighted sum with
          the config's weights: add it to the training loss), and ``expert_load``
          (``[num_layers, E]``, each row the fraction of assignments per expert).
        """
        h, stats = self.model(tokens)
        logits = (self.model.embed_tokens.attend(h) if self.lm_head is None
                  else self.lm_head(h)).astype(jnp.float32)
        if not return_aux:
            return logits
        cfg = self.config
        z = jnp.mean(jnp.stack([s["router_z_loss"] for s in stats]))
        balance = jnp.mean(jnp.stack([s["load_balance_loss"] for s in stats]))
        aux = {"router_z_loss": z, "load_balance_loss": balance,
               "aux_loss": (cfg.router_z_loss_weight * z
                            + cfg.load_balance_loss_weight * balance),
               "expert_load": jnp.stack([s["expert_load"] for s in stats])}
        return logits, aux


__all__ = ["Experts", "MoeBlock", "MoeConfig", "MoeDecoderLayer", "MoeLLaMa", "MoeModel",
           "Router", "load_balance_loss", "route", "router_z_loss"]
