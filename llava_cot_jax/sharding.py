"""The device mesh and the one table that maps logical axis names onto it.

Every parameter carries logical axis names (see models/mllama/layers.py: `param`). Training and multi-chip
inference both shard through `LOGICAL_AXIS_RULES`: FSDP over "embed", tensor parallelism over heads / MLP /
vocabulary, and nothing over the stacked "layers" axis (lax.scan walks it).
"""

from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("layers", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("vision_out", None),
    ("patch", None),
    ("aspect_ratio", None),
    ("norm", None),
)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh; one axis may be -1 to take the remaining devices."""
    devices = devices if devices is not None else jax.devices()
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into data={data} x fsdp={fsdp} x tensor={tensor}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs {math.prod(sizes)} devices, "
            f"have {len(devices)}"
        )
    axis_types = (AxisType.Auto,) * 3
    try:
        return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=axis_types, devices=devices)
    except NotImplementedError:
        # A TPU slice whose physical axes no product of mesh sizes matches (v6e 8x8 as 32 x 2): split an axis.
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(tuple(sizes), devices, allow_split_physical_axes=True)
        return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)


def logical_to_spec(names) -> PartitionSpec:
    rules = dict(LOGICAL_AXIS_RULES)
    unknown = [n for n in names if n is not None and n not in rules]
    if unknown:
        raise KeyError(f"logical axes {unknown} have no rule in LOGICAL_AXIS_RULES")
    return PartitionSpec(*(None if n is None else rules[n] for n in names))


def param_shardings(state: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
    """NamedShardings for every parameter of a (possibly abstract) model state, checking divisibility so a
    mesh that does not fit a parameter fails here with the parameter's name, not deep inside XLA."""

    def one(path, var):
        names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        spec = logical_to_spec(names)
        for dim, axis in zip(var.shape, spec):
            axes = (axis,) if isinstance(axis, str) else (axis or ())
            size = math.prod(mesh.shape[a] for a in axes)
            if dim % size:
                raise ValueError(
                    f"parameter {'/'.join(map(str, path))} {tuple(var.shape)} {names}: dimension {dim} is "
                    f"not divisible by mesh axes {axes} of size {size}"
                )
        return var.replace(NamedSharding(mesh, spec))

    return nnx.map_state(one, state)


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh) -> nnx.Module:
    """Places a model's parameters on the mesh according to the rules table (in place)."""
    state = nnx.state(model, nnx.Param)
    shardings = param_shardings(state, mesh)
    nnx.update(model, jax.device_put(state, shardings))
    return model


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
    """Batch-major arrays split their leading axis over data x fsdp."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1)))


def check_batch_divisible(batch_size: int, mesh: jax.sharding.Mesh) -> None:
    size = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % size:
        raise ValueError(
            f"global batch {batch_size} is not divisible by data x fsdp = {mesh.shape['data']} x "
            f"{mesh.shape['fsdp']} = {size}"
        )


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Pins an activation's sharding to the logical axes `names` when a mesh is set (`jax.set_mesh`), so the
    partitioner keeps activations batch-sharded next to FSDP-sharded weights; a no-op without a mesh.

    An axis whose mesh size does not divide the dimension is left unconstrained rather than padded."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = []
    for dim, axis in zip(x.shape, logical_to_spec(names)):
        axes = (axis,) if isinstance(axis, str) else (axis or ())
        spec.append(axis if dim % math.prod(mesh.shape[a] for a in axes) == 0 else None)
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))
