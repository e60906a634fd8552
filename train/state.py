"""The training state as flat lists of arrays, and the compiled step and eval over it.

The loop holds the model parameters and the optimizer state as two flat lists of
arrays (:class:`TrainState`) and calls an ahead-of-time compiled step on them, so a
call costs JAX only the hand-over of those arrays: no NNX graph walk, no pytree
flattening in Python, no jit cache lookup. :class:`StateSpec` knows the trees behind
the lists, to rebuild the model (evaluation) and the pytrees (checkpoints, logging).

The step donates both lists: after ``state, metrics = step(state, batch)`` the old
lists are invalid (XLA updates the parameters and moments in place).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train import step as step_lib
from train.mesh import MeshLayout


class TrainState(NamedTuple):
    """Parameters and optimizer state, flattened (``jax.tree.leaves`` order)."""

    params: list[jax.Array]
    opt: list[jax.Array]


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """The trees behind a :class:`TrainState`.

    Attributes:
      graphdef: The model's graph (``nnx.split(model, nnx.Param, ...)``).
      rest: The model's non-parameter state (empty for the LLaMa).
      params_def: Treedef of the parameters as an ``nnx.State``.
      pure_params_def: Treedef of the same leaves as nested plain dicts (checkpoints).
      opt_def: Treedef of the optax state.
    """

    graphdef: Any
    rest: Any
    params_def: Any
    pure_params_def: Any
    opt_def: Any

    def params(self, leaves: list) -> Any:
        """The parameters as an ``nnx.State`` (what the optax chain sees)."""
        return jax.tree.unflatten(self.params_def, leaves)

    def pure_params(self, leaves: list) -> dict:
        """The parameters as nested plain dicts (``nnx.to_pure_dict`` layout)."""
        return jax.tree.unflatten(self.pure_params_def, leaves)

    def opt_state(self, leaves: list) -> Any:
        """The optax state."""
        return jax.tree.unflatten(self.opt_def, leaves)

    def model(self, leaves: list) -> nnx.Module:
        """A model object on these parameter arrays (shares them; do not donate)."""
        return nnx.merge(self.graphdef, self.params(leaves), self.rest)


def init_state(model: nnx.Module, tx: Any, layout: MeshLayout | None = None
               ) -> tuple[StateSpec, TrainState]:
    """Splits ``model`` and initialises ``tx`` on its parameters.

    With a ``layout`` the optimizer state is created straight into its mesh layout
    (moments like their parameters, the rest replicated; see ``MeshLayout``).
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.as_pure(params)
    if layout is None:
        opt_state = jax.jit(tx.init)(params)
    else:
        opt_state = nnx.as_pure(layout.create_optimizer(model, tx).opt_state)
    pure = nnx.to_pure_dict(params)
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    pure_paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(pure)[0]]
    if [jax.tree_util.keystr(p) for p in paths] != [jax.tree_util.keystr(p) for p in pure_paths]:
        raise AssertionError("nnx.State and its pure dict flatten in different orders")
    spec = StateSpec(graphdef=graphdef, rest=rest,
                     params_def=jax.tree.structure(params),
                     pure_params_def=jax.tree.structure(pure),
                     opt_def=jax.tree.structure(opt_state))
    return spec, TrainState(jax.tree.leaves(params), jax.tree.leaves(opt_state))


def compile_step(spec: StateSpec, tx: Any, state: TrainState, batch: dict, *,
                 accumulate: int = 1, extra_metrics: Callable[[Any], dict] | None = None,
                 layout: MeshLayout | None = None) -> tuple[Callable, float | None]:
    """The training step, compiled ahead of time for ``state`` and ``batch``'s shapes.

    Returns:
      ``(step, flops)``: ``step(state, batch) -> (state, metrics)`` (``state`` donated;
      with a layout the new state keeps the input's shardings), and the FLOPs of one
      call from XLA's cost analysis of the compiled program (per device; ``None`` when
      the backend does not report them).
    """
    pure = step_lib.pure_train_step(spec.graphdef, spec.rest, tx, accumulate=accumulate,
                                    extra_metrics=extra_metrics)

    def flat_step(state: TrainState, batch: dict):
        params, opt_state, metrics = pure(spec.params(state.params),
                                          spec.opt_state(state.opt), batch)
        return TrainState(jax.tree.leaves(params), jax.tree.leaves(opt_state)), metrics

    kwargs = {}
    if layout is not None:
        # Pin the state's layout (XLA could otherwise pick another for the outputs).
        kwargs["out_shardings"] = (jax.tree.map(lambda x: x.sharding, state),
                                   layout.replicated)
    jitted = jax.jit(flat_step, donate_argnums=0, **kwargs)
    if layout is None:
        compiled = jitted.lower(state, batch).compile()
    else:
        # llr_optax's sharded recompute reads the mesh from the context at trace time.
        with jax.set_mesh(layout.mesh):
            compiled = jitted.lower(state, batch).compile()
    return compiled, _flops(compiled)


def _flops(compiled: Any) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # pylint: disable=broad-except  (optional backend feature)
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def make_eval(spec: StateSpec) -> Callable[[list, dict], tuple[jax.Array, jax.Array]]:
    """``eval(params, batch) -> (summed loss, scored tokens)`` on the flat parameters."""
    @jax.jit
    def evaluate(params: list, batch: dict):
        return step_lib.eval_sums(spec.model(params), batch)

    return evaluate


def stack_batches(batches: list[dict]) -> dict:
    """Micro-batches -> one batch with a leading micro-batch axis (accumulation)."""
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


@jax.jit
def all_finite(leaves: Any) -> jax.Array:
    """Whether every element of every array is finite (one device reduction)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(leaves)]))
