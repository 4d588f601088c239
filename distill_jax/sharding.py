"""Device mesh, logical-axis rules and sharded state creation.

The mesh has three axes:
  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3 style)
  tensor  tensor (model) parallelism over heads, the feed-forward width and the vocabulary

``LOGICAL_AXIS_RULES`` is the single table that maps the logical names used by the
models (see ``distill_jax.models.layers``) onto these mesh axes.

State is born sharded: ``jax.eval_shape`` of the init function gives the abstract state
with its logical axis names, the rules turn those into ``NamedSharding``s, and the init
function is jitted with those ``out_shardings`` (``create_sharded_state``). A parameter
dimension that its mesh axes do not divide (12 heads on ``tensor=8``) is replicated
instead, and that is logged once per call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")
# The mesh axes a batch dimension is split over.
BATCH_AXES: tuple[str, str] = ("data", "fsdp")

# (logical name, mesh axis or axes or None)
LOGICAL_AXIS_RULES: tuple[tuple[str, object], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)

Rules = Sequence[tuple[str, Any]]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Shape of the device mesh; exactly one axis may be -1 (= the remaining devices)."""

    data: int = -1  # pure data-parallel replicas (parameters replicated)
    fsdp: int = 1  # data-parallel shards that also split parameters and optimizer state
    tensor: int = 1  # tensor-parallel shards of heads / feed-forward width / vocabulary

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """The (data, fsdp, tensor) shape for ``num_devices`` devices, -1 filled in."""
        shape = (self.data, self.fsdp, self.tensor)
        if any(s == 0 or s < -1 for s in shape):
            raise ValueError(f"mesh axes must be positive or -1, got {self}")
        free = [i for i, s in enumerate(shape) if s == -1]
        if len(free) > 1:
            raise ValueError(f"at most one mesh axis may be -1, got {self}")
        fixed = math.prod(s for s in shape if s != -1)
        if free:
            if num_devices % fixed:
                raise ValueError(
                    f"mesh {self} cannot use {num_devices} devices: the fixed axes "
                    f"(product {fixed}) do not divide the device count"
                )
            resolved = list(shape)
            resolved[free[0]] = num_devices // fixed
            return tuple(resolved)
        if fixed != num_devices:
            raise ValueError(
                f"mesh shape (data={self.data}, fsdp={self.fsdp}, tensor={self.tensor}) "
                f"has {fixed} devices but {num_devices} devices are available"
            )
        return shape


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
) -> None:
    """Joins the processes of a multi-process run (``jax.distributed.initialize``); no-op
    for a single process.

    ``auto`` lets JAX detect the cluster itself (TPU pods, SLURM). Otherwise a coordinator
    address or ``num_processes`` > 1 opts in, and then all three values are needed (a
    ``UserError`` names them)."""
    if auto:
        jax.distributed.initialize()
        return
    if coordinator_address is None and (num_processes or 1) <= 1:
        return
    if coordinator_address is None or num_processes is None or process_id is None:
        from distill_jax.errors import UserError

        raise UserError(
            "a multi-process run needs --coordinator, --num-processes and "
            "--process-id (or their DISTILL_JAX_* environment variables)"
        )
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` with axes (data, fsdp, tensor) over ``devices`` (default: all global
    devices, so it works across hosts)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.resolve(len(devices))
    if len(devices) == 1:
        device_array = np.asarray(devices).reshape(shape)
    else:
        device_array = mesh_utils.create_device_mesh(shape, devices=devices)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


@contextlib.contextmanager
def logical_context(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Iterator[None]:
    """The trace-time context of a jitted step on ``mesh``: the logical axis rules and
    the mesh itself, so that the models' activation annotations
    (``nn.with_logical_constraint``: batch over data x fsdp, heads / feed-forward width /
    vocabulary over tensor) become sharding constraints. Parameters and batches are placed
    by the jit's ``in_shardings``/``out_shardings``."""
    with nn.logical_axis_rules(rules), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        yield


def _axes_size(mesh: Mesh, axes: Any) -> int:
    """Number of devices a PartitionSpec entry (None, a name or a tuple) spans."""
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[n] for n in names)


def mesh_spec_for(
    logical_spec: PartitionSpec | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Rules = LOGICAL_AXIS_RULES,
    fallbacks: list[str] | None = None,
) -> PartitionSpec:
    """The mesh PartitionSpec of an array with ``shape`` and logical axis names.

    Dimensions that the mesh axes do not divide are replicated; each such case is
    appended (as text) to ``fallbacks`` when given.
    """
    if logical_spec is None or len(logical_spec) == 0:
        return PartitionSpec()
    if len(logical_spec) != len(shape):
        raise ValueError(
            f"logical axes {tuple(logical_spec)} do not match an array of shape {tuple(shape)}"
        )
    mesh_axes = list(nn.logical_to_mesh_axes(tuple(logical_spec), rules))
    for i, (dim, axes) in enumerate(zip(shape, mesh_axes)):
        size = _axes_size(mesh, axes)
        if size > 1 and dim % size:
            if fallbacks is not None:
                fallbacks.append(f"{logical_spec[i]}={dim} not divisible by {axes}={size}")
            mesh_axes[i] = None
    return PartitionSpec(*mesh_axes)


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec) or x is None


def logical_specs(abstract_tree: Any) -> Any:
    """Logical PartitionSpecs of a (possibly boxed) tree: boxes give their axis names,
    plain leaves give ``PartitionSpec()`` (replicated)."""
    return nn.get_partition_spec(abstract_tree)


def tree_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """``NamedSharding``s for every leaf of an abstract (``eval_shape``) tree whose
    parameters may carry logical axis boxes; the result matches ``nn.unbox(tree)``."""
    specs = logical_specs(abstract_tree)
    unboxed = nn.unbox(abstract_tree)
    fallbacks: list[str] = []
    shardings = jax.tree.map(
        lambda spec, leaf: NamedSharding(
            mesh, mesh_spec_for(spec, np.shape(leaf), mesh, rules, fallbacks)
        ),
        specs,
        unboxed,
        is_leaf=_is_spec,
    )
    if fallbacks:
        logger.warning(
            "replicating %d parameter dimensions that the mesh %s does not divide: %s",
            len(fallbacks),
            dict(mesh.shape),
            sorted(set(fallbacks)),
        )
    return shardings


def create_sharded_state(
    init_fn: Callable[[], Any], mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES
) -> tuple[Any, Any]:
    """Runs ``init_fn`` (no arguments; close over the rng) so that its output is born
    sharded. Returns ``(state, shardings)`` with logical boxes removed from ``state``."""
    # Traced without the mesh context: flax's initialisers reshape boxed kernels, and a
    # sharding constraint on those intermediate shapes would not fit. ``out_shardings``
    # alone places the result.
    abstract = jax.eval_shape(init_fn)
    shardings = tree_shardings(abstract, mesh, rules)
    state = jax.jit(lambda: nn.unbox(init_fn()), out_shardings=shardings)()
    return state, shardings


def place_tree(tree: Any, shardings: Any) -> Any:
    """Places existing arrays (e.g. loaded BERT weights, host numpy) onto ``shardings``
    (a matching tree of ``NamedSharding``s, e.g. from ``tree_shardings``)."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), nn.unbox(tree), shardings)


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct``s carrying ``shardings`` (the target of a restore)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
        nn.unbox(tree),
        shardings,
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch array: dimension 0 over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
    """One batch sharding per key of ``batch``."""
    return {k: batch_sharding(mesh) for k in batch}


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    """Raises if the global batch size is not a multiple of data * fsdp."""
    shards = _axes_size(mesh, BATCH_AXES)
    if global_batch % shards:
        raise ValueError(
            f"global batch size {global_batch} is not divisible by data*fsdp={shards} "
            f"of mesh {dict(mesh.shape)}"
        )


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global ``jax.Array``s sharded along the batch dimension.

    Each process passes its own rows (``local batch = global batch / process count``);
    ``jax.make_array_from_process_local_data`` assembles the global arrays.
    """
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.ndim == 0:
            raise ValueError(f"batch entry {key!r} is a scalar; batch arrays need a batch dim")
        global_batch = value.shape[0] * jax.process_count()
        try:
            check_batch_size(global_batch, mesh)
        except ValueError as err:
            raise ValueError(f"batch entry {key!r}: {err}") from None
        global_shape = (global_batch,) + value.shape[1:]
        out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh), value, global_shape)
    return out
