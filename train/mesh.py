"""Training on a device mesh (``--mesh data=D,fsdp=F,tensor=T``), on one host or many.

The layout follows the model's *logical* sharding annotations (``models.llama``): every
parameter names its dimensions (``embed``, ``vocab``, ``heads``, ``kv_heads``, ``mlp``)
and :func:`axis_rules` maps those names onto the mesh axes (``option_text.MESH_AXES``):

* ``data``: pure data parallelism; parameters are replicated along it.
* ``fsdp``: fully sharded data parallelism; every parameter, and its optimizer state,
  is split along ``embed`` (the model width, present in every weight), and the batch
  is split over ``data`` and ``fsdp`` together.
* ``tensor``: tensor parallelism; ``heads``/``kv_heads``/``mlp``/``vocab`` are split,
  the batch is not.

A dimension that the mesh axes do not divide (the 257-token byte vocabulary, say) is
kept whole rather than refused: the layout only decides where numbers live, and XLA's
partitioner inserts whatever collectives the chosen layout needs, so every layout
computes the same training step (up to float reduction order).

Multi-host: :func:`initialize_distributed` calls ``jax.distributed.initialize()`` before
anything touches the devices; each process then reads its own shard of the data (grain,
``shard_index = jax.process_index()``) and hands its rows to
``jax.make_array_from_process_local_data``, so ``batch_size`` is per process; orbax
writes each process's shards of the checkpoint and restores into the shardings of the
current layout (so a run may resume under another ``--mesh``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from models import LOGICAL_AXIS_RULES
from train.config import TrainConfig
from train.option_text import MESH_AXES, parse_mesh

# Logical dimension -> mesh axis under tensor parallelism (replacing the model's
# data/FSDP-only rules for these names). MoE experts ("expert", the leading axis of the
# stacked expert kernels) are spread over the same axis: expert parallelism. An expert
# kernel [expert, embed, mlp] then has "tensor" twice; fit_spec keeps the first (experts
# split, each expert's mlp dimension whole) or, if the axis does not divide the number of
# experts, gives it to the mlp dimension.
_TENSOR_RULES = (("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"),
                 ("vocab", "tensor"), ("expert", "tensor"))


def initialize_distributed(force: bool = False) -> bool:
    """Joins a multi-process JAX job when launched as one.

    Must run before anything queries the devices (also ``jax.process_index()``).

    Args:
      force: Call ``jax.distributed.initialize()`` even without the environment below;
        JAX then detects the cluster itself (SLURM, Open MPI, Kubernetes, Cloud TPU).

    Returns:
      Whether it initialised: with ``force``, or when ``JAX_COORDINATOR_ADDRESS`` is set
      (``host:port`` of process 0); ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` then
      give the process count and this process's id unless the cluster is detected.
    """
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not force and not address:
        return False
    kwargs = {}
    for key, env in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        if os.environ.get(env):
            kwargs[key] = int(os.environ[env])
    jax.distributed.initialize(coordinator_address=address or None, **kwargs)
    return True


def axis_rules() -> tuple[tuple[str, Any], ...]:
    """Logical axis rules: the model's data/FSDP rules plus tensor parallelism."""
    rules = dict(LOGICAL_AXIS_RULES)
    rules.update(_TENSOR_RULES)
    return tuple(rules.items())


def build_mesh(text: str, devices: Any = None) -> jax.sharding.Mesh:
    """The device mesh of a ``--mesh`` layout (axes ``MESH_AXES``, all of them).

    Args:
      text: E.g. ``"data=2,fsdp=4"``; missing axes have size 1.
      devices: The devices to lay out; default all of them (every process's).

    Raises:
      ValueError: Bad syntax, or sizes whose product is not the number of devices.
    """
    sizes = parse_mesh(text)
    if not sizes:
        raise ValueError("An empty --mesh means no mesh; give e.g. 'data=2,fsdp=4'")
    devices = jax.devices() if devices is None else list(devices)
    shape = tuple(sizes[a] for a in MESH_AXES)
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"--mesh {text!r} has {math.prod(shape)} devices "
            f"({' x '.join(f'{a}={n}' for a, n in sizes.items())}) but there are "
            f"{len(devices)} ({jax.process_count()} process(es) x "
            f"{jax.local_device_count()} local {devices[0].platform} device(s)); the "
            "sizes must multiply to the device count")
    # Auto axes: XLA propagates the layout through the step from the arguments' and
    # results' shardings; llr_optax's alpha recompute picks the mesh up from the context.
    return jax.make_mesh(shape, MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def fit_spec(spec: Any, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> P:
    """``spec`` (mesh axes) made valid for an array of ``shape`` on ``mesh``.

    Drops size-1 mesh axes, axes already used by an earlier dimension, and the axes of
    any dimension they do not divide (that dimension is kept whole); a spec longer than
    the array (optimizer state such as a per-matrix scalar that inherited its matrix's
    annotation) gives a replicated array.
    """
    if spec is None or len(spec) > len(shape):
        return P()
    used: set[str] = set()
    out = []
    for dim, axes in zip(shape, spec):
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
        if not axes or dim % math.prod(mesh.shape[a] for a in axes):
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


@dataclasses.dataclass(frozen=True)
class MeshLayout:
    """A run's mesh and how its state and batches are laid out on it.

    Attributes:
      mesh: The device mesh.
      rules: Logical axis name -> mesh axis (:func:`axis_rules`).
    """

    mesh: jax.sharding.Mesh
    rules: tuple[tuple[str, Any], ...] = dataclasses.field(default_factory=axis_rules)

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> MeshLayout:
        """The layout of ``cfg.mesh``, after checking the batch sizes fit it.

        Raises:
          ValueError: Bad mesh, or a (global) batch size the batch axes do not divide.
        """
        layout = cls(build_mesh(cfg.mesh))
        for name, size in (("batch_size", cfg.batch_size),
                           ("val_batch_size", cfg.val_batch_size or cfg.batch_size)):
            layout.check_batch_size(size, name)
        return layout

    @property
    def batch_axes(self) -> tuple[str, ...]:
        """Mesh axes (of size > 1) the batch dimension is split over."""
        axes = dict(self.rules).get("batch") or ()
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        return tuple(a for a in axes if self.mesh.shape[a] > 1)

    @property
    def batch_parallel(self) -> int:
        """Number of batch shards (the product of the batch axes' sizes)."""
        return math.prod(self.mesh.shape[a] for a in self.batch_axes)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def batch_sharding(self, ndim: int = 2, leading: int = 0) -> NamedSharding:
        """Sharding of a global ``[batch, ...]`` array: rows over the batch axes.

        ``leading`` axes before the batch axis (the micro-batch axis of gradient
        accumulation) are not split.
        """
        axes = self.batch_axes
        rows = None if not axes else axes[0] if len(axes) == 1 else axes
        return NamedSharding(self.mesh, P(*([None] * leading), rows,
                                          *([None] * (ndim - 1 - leading))))

    def check_batch_size(self, per_process: int, name: str = "batch_size") -> None:
        """Raises a ``ValueError`` unless the batch axes divide the global batch."""
        total = per_process * jax.process_count()
        if total % self.batch_parallel:
            per = f" ({per_process} per process x {jax.process_count()})" if (
                jax.process_count() > 1) else ""
            raise ValueError(
                f"{name}={total}{per} is not divisible by the data-parallel size "
                f"{self.batch_parallel} of the mesh ({' x '.join(self.batch_axes)} = "
                f"{self.batch_parallel}); choose a multiple of it")

    def place_batch(self, batch: dict[str, np.ndarray],
                    leading: int = 0) -> dict[str, jax.Array]:
        """This process's rows of a batch -> global arrays split over the batch axes
        (after ``leading`` unsplit axes, see :meth:`batch_sharding`)."""
        return {k: jax.make_array_from_process_local_data(
            self.batch_sharding(np.ndim(v), leading), v) for k, v in batch.items()}

    def place_batches(self, batches: Iterator[dict]) -> Iterator[dict[str, jax.Array]]:
        """:meth:`place_batch` over an iterator."""
        return map(self.place_batch, batches)

    def shardings(self, state: Any) -> Any:
        """``NamedSharding`` of every array of an NNX state, from its logical annotation.

        Works for the model's params and for optimizer state alike: ``nnx.Optimizer``
        copies each param's annotation onto the state derived from it (moments, and
        scalars, which :func:`fit_spec` replicates); arrays without one (step counters)
        are replicated.

        Returns:
          ``state`` with each array (or ``ShapeDtypeStruct``) replaced by its sharding.
        """
        def one(x):
            value = x.get_value() if isinstance(x, nnx.Variable) else x
            if not hasattr(value, "shape"):
                return x  # e.g. optax's MaskedNode: holds no array
            spec = nnx.spmd.get_var_pspec(x) if isinstance(x, nnx.Variable) else None
            sharding = NamedSharding(self.mesh, fit_spec(spec, value.shape, self.mesh))
            return x.replace(sharding) if isinstance(x, nnx.Variable) else sharding

        with nnx.logical_axis_rules(self.rules):
            return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))

    def create(self, factory: Callable[[], nnx.Module]) -> nnx.Module:
        """Builds ``factory()`` directly in its layout (each device creates only its shards).

        The same random draws as building it eagerly (one jitted init instead of op by
        op, so values may differ in the last float bit). Call it outside ``jax.set_mesh``:
        the model requests flax's eager sharding of its logical names under a context mesh.
        """
        graphdef, abstract = nnx.split(nnx.eval_shape(factory))
        init = jax.jit(lambda: nnx.split(factory())[1], out_shardings=self.shardings(abstract))
        return nnx.merge(graphdef, init())

    def create_optimizer(self, model: nnx.Module, tx: Any) -> nnx.Optimizer:
        """``nnx.Optimizer(model, tx, wrt=nnx.Param)`` with its state laid out on the mesh.

        Created in one jitted call, straight into the final layout (moments like their
        params, the rest replicated), instead of op by op on the sharded params.
        """
        model_def, model_state = nnx.split(model)

        def factory(state):
            return nnx.Optimizer(nnx.merge(model_def, state), tx, wrt=nnx.Param)

        graphdef, abstract = nnx.split(nnx.eval_shape(factory, model_state))
        init = jax.jit(lambda state: nnx.split(factory(state))[1],
                       out_shardings=self.shardings(abstract))
        return nnx.merge(graphdef, init(model_state))
