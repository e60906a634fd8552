"""The jitted training and evaluation steps.

The loss is the token-level cross-entropy of float32 logits against the next token.
``train_step`` donates the model and optimizer state (updated in place, no copy of
parameters and Adam moments per step); ``eval_step`` returns SUMS (loss and token
count), so the loop can add them over a whole validation pass and padding in the last
batch (``mask`` = 0) counts for nothing.
"""

from __future__ import annotations

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


def train_update(model: nnx.Module, optimizer: nnx.Optimizer, batch: dict) -> dict:
    """The body of :func:`train_step`, unjitted (the mesh step in train/mesh.py wraps it
    in its own ``jax.jit``, so both compute the same update)."""
    loss, grads = nnx.value_and_grad(mean_loss)(model, batch)
    optimizer.update(model, grads)
    return {"loss": loss, "grad_norm": optax.tree.norm(grads)}


@nnx.jit(donate_argnums=(0, 1))
def train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: dict) -> dict:
    """One optimizer step on ``batch`` (``inputs``/``targets`` int32 ``[B, T]``).

    Args:
      model: Updated in place.
      optimizer: An ``nnx.Optimizer(model, tx, wrt=nnx.Param)``; updated in place.
      batch: The training batch.

    Returns:
      ``{"loss": mean loss before the update, "grad_norm": global norm of the raw
      (unclipped) gradient}``, float32 scalars.
    """
    return train_update(model, optimizer, batch)


@nnx.jit
def eval_step(model: nnx.Module, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Summed loss and number of scored tokens of ``batch`` (mask-weighted if present)."""
    losses = token_losses(model, batch)
    mask = batch["mask"].astype(jnp.float32) if "mask" in batch else jnp.ones_like(losses)
    return jnp.sum(losses * mask), jnp.sum(mask)


def make_grad_fn(graphdef: nnx.GraphDef, rest: nnx.State):
    """A jitted ``(params, batch) -> grads`` for the model ``graphdef`` (init_grad).

    Works on a pure params pytree (as ``nnx.Optimizer`` hands to optax), so the
    gradients have exactly the structure the optax chain sees.
    """

    @jax.jit
    def grad_fn(params, batch):
        def loss(p):
            return mean_loss(nnx.merge(graphdef, p, rest), batch)

        return jax.grad(loss)(params)

    return grad_fn
