"""The device mesh and the one table that maps logical axis names onto it.

Every parameter carries logical axis names (see models/mllama/layers.py: `param`). Training and multi-chip
inference both shard through `LOGICAL_AXIS_RULES`: FSDP over "embed", tensor parallelism over heads / MLP /
vocabulary, and nothing over the stacked "layers" axis (lax.scan walks it). Decoding uses the same table with
one exception (`inference_rules`): key/value heads that the tensor axis does not divide are replicated.
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


def inference_rules(num_key_value_heads: int, mesh: jax.sharding.Mesh) -> tuple:
    """The rules for decoding on `mesh`: `LOGICAL_AXIS_RULES`, except that key/value heads are replicated when the
    tensor axis does not divide their number (e.g. 8 kv heads on tensor=16; a tiny test model's 2 on tensor=4).
    Every device then holds all kv heads of its layers' K/V projections, KV caches and image K/V: more memory,
    no communication, and each query head still finds its kv head locally."""
    if num_key_value_heads % mesh.shape["tensor"] == 0:
        return LOGICAL_AXIS_RULES
    return tuple((name, None if name == "kv_heads" else axes) for name, axes in LOGICAL_AXIS_RULES)


def is_single_device(mesh_cfg) -> bool:
    """A `mesh` group of all ones: one device, no mesh (inference then runs unsharded)."""
    return (mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor) == (1, 1, 1)


def mesh_from_config(mesh_cfg, devices=None, *, global_batch: int | None = None, micro_batches: int = 1):
    """The (data, fsdp, tensor) mesh of a config's `mesh` group over `devices` (default: all). One size may be -1:
    the devices left over. `tensor = 0` chooses the split for training: FSDP over as many devices as the
    micro-batch of `global_batch` allows (the largest count dividing both; -1 fsdp), tensor parallelism over the
    rest."""
    devices = jax.devices() if devices is None else devices
    data, fsdp, tensor = mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor
    if tensor == 0:
        if global_batch is None:
            raise ValueError("mesh.tensor=0 (automatic split) needs a global batch: set mesh.tensor to a size")
        if data < 1 or len(devices) % data:
            raise ValueError(f"mesh.data={data} does not divide the {len(devices)} devices")
        per_replica = len(devices) // data
        micro = max(global_batch // max(micro_batches, 1) // data, 1)
        fsdp = math.gcd(per_replica, micro) if fsdp == -1 else fsdp
        tensor = -1
    return make_mesh(data, fsdp, tensor, devices=devices)


def logical_to_spec(names, rules=LOGICAL_AXIS_RULES) -> PartitionSpec:
    rules = dict(rules)
    unknown = [n for n in names if n is not None and n not in rules]
    if unknown:
        raise KeyError(f"logical axes {unknown} have no rule in LOGICAL_AXIS_RULES")
    return PartitionSpec(*(None if n is None else rules[n] for n in names))


def _axis_size(mesh, axis) -> int:
    axes = (axis,) if isinstance(axis, str) else (axis or ())
    return math.prod(mesh.shape[a] for a in axes)


def param_shardings(state: nnx.State, mesh: jax.sharding.Mesh, rules=LOGICAL_AXIS_RULES) -> nnx.State:
    """NamedShardings for every parameter of a (possibly abstract) model state, checking divisibility so a
    mesh that does not fit the model fails here, with one error naming every parameter and dimension it does
    not divide, not deep inside XLA."""
    problems = []

    def one(path, var):
        names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        spec = logical_to_spec(names, rules)
        for dim, axis, name in zip(var.shape, spec, names):
            if dim % _axis_size(mesh, axis):
                problems.append(
                    f"parameter {'/'.join(map(str, path))} {tuple(var.shape)}: dimension {dim} ({name}) is not "
                    f"divisible by mesh axes {axis} of size {_axis_size(mesh, axis)}"
                )
        return var.replace(NamedSharding(mesh, spec))

    shardings = nnx.map_state(one, state)
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise ValueError(f"mesh {dict(mesh.shape)} does not fit the model: " + "; ".join(problems[:8]) + more)
    return shardings


def dividing_spec(shape, names, mesh, rules=LOGICAL_AXIS_RULES) -> PartitionSpec:
    """The spec of logical axes `names` for an array of `shape`, with every mesh axis that does not divide its
    dimension dropped (that dimension is replicated rather than padded)."""
    spec = logical_to_spec(names, rules)
    return PartitionSpec(*(axis if dim % _axis_size(mesh, axis) == 0 else None for dim, axis in zip(shape, spec)))


def constrain(x: jax.Array, names: tuple[str | None, ...], rules=LOGICAL_AXIS_RULES) -> jax.Array:
    """Pins an array's sharding to the logical axes `names` when a mesh is set (`jax.set_mesh`); a no-op without
    a mesh. An axis whose mesh size does not divide the dimension is replicated rather than padded."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, dividing_spec(x.shape, names, mesh, rules))
