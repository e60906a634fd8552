"""The jitted training and evaluation steps.

The training loss is the token-level cross-entropy of float32 logits against the next
token, plus the model's auxiliary losses (``aux["aux_loss"]`` of
``model(tokens, return_aux=True)``: the MoE router z-loss and load-balancing loss, already
weighted; nothing for the dense models). Evaluation is cross-entropy only, so validation
losses compare across model families.

Two forms of the same update:

* :func:`pure_train_step`: a pure function ``(params, opt_state, batch) -> (params,
  opt_state, metrics)`` over plain pytrees, with the model rebuilt from its graph
  inside the trace. The loop compiles it once over flat lists of arrays
  (:mod:`train.state`): per call, JAX only hands over the arrays, without walking the
  NNX object graph (tiny preset, alpha_hill, 403 state arrays: 26 ms of host CPU time
  per ``nnx.jit`` call, 1.2 ms per call of the compiled flat step; docs/benchmarks.md,
  trainer_bench). It also does gradient accumulation.
* :func:`train_step`: the NNX form on ``model``/``optimizer`` objects (``nnx.jit``,
  both donated), for interactive use and ``benchmarks/overhead_bench.py``.

``eval_step`` returns SUMS (loss and token count), so the loop can add them over a
whole validation pass and padding in the last batch (``mask`` = 0) counts for nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def token_losses(model: nnx.Module, batch: dict) -> jax.Array:
    """Per-token cross-entropy ``[B, T]`` (float32) of ``model`` on ``batch``."""
    logits = model(batch["inputs"]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])


def mean_loss(model: nnx.Module, batch: dict) -> jax.Array:
    """Mean cross-entropy over the (masked, if ``batch`` has a mask) tokens."""
    losses = token_losses(model, batch)
    if "mask" not in batch:
        return jnp.mean(losses)
    mask = batch["mask"].astype(jnp.float32)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def training_loss(model: nnx.Module, batch: dict) -> tuple[jax.Array, dict]:
    """The training objective: mean cross-entropy plus the model's auxiliary loss.

    Returns:
      ``(loss, parts)``. For a dense model ``loss`` is the cross-entropy and ``parts`` is
      empty. For a MoE model ``loss = ce_loss + aux_loss`` and ``parts`` holds
      ``ce_loss``, ``aux_loss`` (weighted sum), its unweighted terms ``router_z_loss``
      and ``load_balance_loss`` (means over layers), and ``expert_load``
      (``[num_layers, E]`` fractions of the token->expert assignments).
    """
    logits, aux = model(batch["inputs"], return_aux=True)
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["targets"])
    if "mask" in batch:
        mask = batch["mask"].astype(jnp.float32)
        ce = jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    else:
        ce = jnp.mean(losses)
    if not aux:
        return ce, {}
    parts = {"ce_loss": ce, **{k: aux[k] for k in AUX_METRICS}}
    return ce + aux["aux_loss"], parts


# What a MoE model's ``aux`` contributes to the step's metrics (see training_loss).
AUX_METRICS = ("aux_loss", "router_z_loss", "load_balance_loss", "expert_load")


def train_update(model: nnx.Module, optimizer: nnx.Optimizer, batch: dict) -> dict:
    """The body of :func:`train_step`, unjitted."""
    (loss, parts), grads = nnx.value_and_grad(training_loss, has_aux=True)(model, batch)
    optimizer.update(model, grads)
    return {"loss": loss, "grad_norm": optax.tree.norm(grads), **parts}


@nnx.jit(donate_argnums=(0, 1))
def train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: dict) -> dict:
    """One optimizer step on ``batch`` (``inputs``/``targets`` int32 ``[B, T]``).

    Args:
      model: Updated in place.
      optimizer: An ``nnx.Optimizer(model, tx, wrt=nnx.Param)``; updated in place.
      batch: The training batch.

    Returns:
      ``{"loss": training loss before the update, "grad_norm": global norm of the raw
      (unclipped) gradient}``, float32 scalars, plus a MoE model's loss parts (see
      :func:`training_loss`).
    """
    return train_update(model, optimizer, batch)


@nnx.jit
def eval_step(model: nnx.Module, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Summed loss and number of scored tokens of ``batch`` (mask-weighted if present)."""
    return eval_sums(model, batch)


def make_grad_fn(graphdef: nnx.GraphDef, rest: nnx.State):
    """A jitted ``(params, batch) -> grads`` of the training loss (init_grad).

    Works on a pure params pytree (as ``nnx.Optimizer`` hands to optax), so the
    gradients have exactly the structure the optax chain sees.
    """

    @jax.jit
    def grad_fn(params, batch):
        def loss(p):
            return training_loss(nnx.merge(graphdef, p, rest), batch)[0]

        return jax.grad(loss)(params)

    return grad_fn


def eval_sums(model: nnx.Module, batch: dict) -> tuple[jax.Array, jax.Array]:
    """The body of :func:`eval_step`, unjitted."""
    losses = token_losses(model, batch)
    mask = batch["mask"].astype(jnp.float32) if "mask" in batch else jnp.ones_like(losses)
    return jnp.sum(losses * mask), jnp.sum(mask)


def pure_train_step(
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    tx: optax.GradientTransformation,
    *,
    accumulate: int = 1,
    extra_metrics: Callable[[Any], dict] | None = None,
) -> Callable[[Any, Any, dict], tuple[Any, Any, dict]]:
    """The training update as a pure function of pytrees.

    Args:
      graphdef: The model's graph, from ``nnx.split(model, nnx.Param, ...)``.
      rest: The model's non-parameter state from the same split.
      tx: The optax chain; with ``accumulate > 1`` built by
        :func:`train.optimizers.build_optimizer` (``optax.MultiSteps`` around the
        chain, which takes the ``apply=`` argument).
      accumulate: Micro-batches per update. With ``> 1`` every batch array has a
        leading axis of this size; the micro-batches are scanned over (one at a time
        in memory), each handed to ``tx`` (MultiSteps accumulates their mean and
        applies one update on the last).
      extra_metrics: ``opt_state -> {name: array}`` added to the metrics (read from
        the state after the update), e.g. the applied layer-wise factors.

    Returns:
      ``step(params, opt_state, batch) -> (params, opt_state, metrics)`` with
      ``metrics = {"loss": training loss before the update (:func:`training_loss`),
      "grad_norm": global norm of the raw (unclipped; with accumulation: mean over
      micro-batches) gradient, **loss parts of a MoE model, **extra}``; with
      accumulation, losses and parts are means over the micro-batches.
    """
    def loss_fn(params, batch):
        return training_loss(nnx.merge(graphdef, params, rest), batch)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def single(params, opt_state, batch):
        (loss, parts), grads = grad_fn(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, loss,
                optax.tree.norm(grads), parts)

    def micro_step(carry, batch):
        params, opt_state = carry
        (loss, parts), grads = grad_fn(params, batch)
        # MultiSteps keeps the running mean of the micro-batch gradients; this is the
        # mean it will hand to the chain, for the grad_norm of the last micro-step.
        k = opt_state.mini_step
        mean = jax.tree.map(lambda a, g: a + (g - a) / (k + 1).astype(a.dtype),
                            opt_state.acc_grads, grads)
        updates, opt_state = tx.update(grads, opt_state, params, apply=k == accumulate - 1)
        params = optax.apply_updates(params, updates)
        return (params, opt_state), (loss, optax.tree.norm(mean), parts)

    def step(params, opt_state, batch):
        if accumulate == 1:
            params, opt_state, loss, grad_norm, parts = single(params, opt_state, batch)
        else:
            (params, opt_state), (losses, norms, parts) = jax.lax.scan(
                micro_step, (params, opt_state), batch)
            loss, grad_norm = jnp.mean(losses), norms[-1]
            parts = jax.tree.map(lambda x: jnp.mean(x, axis=0), parts)
        metrics = {"loss": loss, "grad_norm": grad_norm, **parts}
        if extra_metrics is not None:
            metrics.update(extra_metrics(opt_state))
        return params, opt_state, metrics

    return step
