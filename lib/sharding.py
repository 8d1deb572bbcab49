"""The device mesh and how parameters and batches are laid out on it.

Mesh axes are ``data`` (batch replicas), ``fsdp`` (batch *and* parameter shards) and
``tensor`` (model-parallel shards of heads / MLP / vocab). Parameters carry logical axis names
(``vocab``, ``embed``, ``mlp``, ``heads``, ``kv``); ``config.mesh.rules`` maps each to a mesh
axis. A dimension that the mesh axis does not divide stays replicated, so tiny demo models and
odd vocabulary sizes run on any mesh.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lib.errors import UserError

AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis. Overridable by config.mesh.rules.
DEFAULT_RULES = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh; one size may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise UserError("config.mesh: at most one of data/fsdp/tensor may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise UserError(
                f"config.mesh: {len(devices)} devices cannot be split by the fixed sizes "
                f"(product {known})"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise UserError(
            f"config.mesh: data*fsdp*tensor = {math.prod(sizes)} but there are "
            f"{len(devices)} devices; set one size to -1 to fill"
        )
    grid = np.asarray(devices).reshape(sizes)
    # Auto axes: pjit semantics, XLA propagates shardings through the model.
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_mesh(
    logical: tuple, shape: tuple[int, ...], mesh: Mesh, rules=DEFAULT_RULES
) -> PartitionSpec:
    """Mesh PartitionSpec for one parameter from its logical axis names and shape."""
    table = dict(rules)
    spec, used = [], set()
    for name, dim in zip(logical, shape):
        axis = table.get(name) if name is not None else None
        if axis is None or axis in used or dim % mesh.shape[axis]:
            spec.append(None)
        else:
            spec.append(axis)
            used.add(axis)
    return PartitionSpec(*spec)


def param_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES) -> dict:
    """A NamedSharding per variable of an ``nnx.State``, as a pure dict of the same shape as
    ``nnx.to_pure_dict(state)``."""
    out: dict = {}
    for path, var in nnx.to_flat_state(state):
        shape = tuple(var.get_value().shape)
        logical = var.get_metadata().get("out_sharding") or (None,) * len(shape)
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = NamedSharding(mesh, logical_to_mesh(tuple(logical), shape, mesh, rules))
    return out


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are split over ``data`` and ``fsdp`` along their leading dimension."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated placement (scalars, step counters)."""
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: Mesh, key: str = "train.batch_size") -> None:
    """The batch must split evenly across the batch-parallel devices."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % shards:
        raise UserError(
            f"config.{key}={batch_size} is not divisible by mesh data*fsdp={shards}"
        )


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Place a global host batch on the mesh, split along the leading dimension.

    Every process holds the same global batch (data order is a pure function of the step),
    and each device takes its own slice: this works on one host and on many.
    """
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
        for k, v in batch.items()
    }
