"""LoRA adapters for the text decoder's projections: W x becomes W x + (alpha / rank) B A x, with W frozen.

Adapters live beside the model, not in it: a nested dict with the paths of the weights they adapt,
`{"language_model": {"self_layers": {"q_proj": {"a": A, "b": B}, ...}}}`. `apply` puts a `LoraWeight` (frozen
base, A, B) in place of each adapted weight, the same trick as `quant.Int8Weight`: `layers.project` adds the
low-rank product to the base product (which may itself be int8: QLoRA), so the decoder code, its scanned layer
stacks and the cross-attention layers run unchanged. Differentiating with respect to the adapter dict alone
trains only the adapters.

Shapes follow the weight's own layout. A weight is [*layers, *in, *out] for the axes it is contracted on ("in":
embed for q/k/v/gate/up, heads x head_dim for o, mlp for down; see `quant.contracted_axes`) and the rest; its
adapter is A [*layers, *in, rank] and B [*layers, rank, *out], carrying the weight's logical axis names (the rank
axis is replicated), so the one rules table of sharding.py shards them like the weight. transformers' / peft's
`lora_A.weight` [rank, in] and `lora_B.weight` [out, rank] are A and B flattened and transposed (`to_peft`).
"""

from __future__ import annotations

import dataclasses
import math
import string
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_cot_jax.models.mllama import quant

# Matrices that go through `layers.project` in the text decoder and so can carry an adapter.
ADAPTABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = ",".join(ADAPTABLE)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: str = DEFAULT_TARGETS  # comma-separated; see `target_paths`

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, group) -> LoraConfig | None:
        """The `train.lora` group of a training config (None when rank is 0: LoRA off), checked."""
        if not group.rank:
            return None
        if group.rank < 0 or not 0.0 <= group.dropout < 1.0:
            raise ValueError(f"train.lora: rank must be > 0 and dropout in [0, 1), got {group.rank}, {group.dropout}")
        return cls(int(group.rank), float(group.alpha), float(group.dropout), str(group.targets))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoraWeight:
    """A frozen weight (an array or a quant.Int8Weight) with its adapter; stands in for the weight in its Param."""

    base: Any
    a: jax.Array  # [*in, rank]
    b: jax.Array  # [rank, *out]
    dropout_key: jax.Array | None  # raw uint32 key [2] (per layer when stacked); None: no dropout
    scale: float = dataclasses.field(metadata=dict(static=True))
    dropout: float = dataclasses.field(metadata=dict(static=True), default=0.0)

    @property
    def shape(self):
        return self.base.shape

    @property
    def ndim(self):
        return len(self.base.shape)

    @property
    def dtype(self):
        return self.base.dtype

    def __getitem__(self, key):
        if key is Ellipsis:
            return self
        raise TypeError("an adapted weight is used whole (it is a matmul weight, not a lookup table)")

    def delta(self, spec: str, x: jax.Array) -> jax.Array:
        """scale * B A x for `jnp.einsum(spec, x, weight)`: x is contracted with A over the weight's contracted
        letters, then the rank axis with B; the adapters are cast to x's dtype like the base weight."""
        inputs, out = spec.split("->")
        lhs, rhs = inputs.split(",")
        contracted = "".join(c for c in rhs if c in lhs)
        kept = "".join(c for c in rhs if c not in lhs)
        r = next(c for c in string.ascii_letters if c not in spec)
        mid = "".join(c for c in lhs if c not in contracted) + r
        if self.dropout_key is not None and self.dropout > 0:
            keep = jax.random.bernoulli(jax.random.wrap_key_data(self.dropout_key), 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        h = jnp.einsum(f"{lhs},{contracted}{r}->{mid}", x, self.a.astype(x.dtype))
        return jnp.einsum(f"{mid},{r}{kept}->{out}", h, self.b.astype(x.dtype)) * jnp.asarray(self.scale, x.dtype)


# ------------------------------------------------------------------------------------------------ which weights


def target_paths(abstract_state: nnx.State, targets: str) -> tuple[tuple[str, ...], ...]:
    """The parameter paths the comma-separated `targets` adapt. Each target is a dotted suffix of a path, on dot
    boundaries, as peft matches module names: "q_proj" is every text layer's q projection (self- and cross-
    attention), "cross_layers.q_proj" the cross-attention ones only, "mlp.down_proj" both MLPs' down projection."""
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise ValueError("train.lora.targets is empty")
    adaptable = [
        tuple(str(k) for k in path)
        for path, _ in nnx.to_flat_state(abstract_state)
        if str(path[0]) == "language_model" and str(path[-1]) in ADAPTABLE
    ]
    chosen = []
    for name in names:
        parts = tuple(name.split("."))
        hits = [p for p in adaptable if p[-len(parts) :] == parts]
        if not hits:
            raise ValueError(
                f"train.lora.targets: {name!r} matches no adaptable weight; the text decoder's are "
                f"{', '.join('.'.join(p[1:]) for p in adaptable)}"
            )
        chosen += [p for p in hits if p not in chosen]
    return tuple(sorted(chosen))


def _split_axes(path, var) -> tuple[list[int], list[int], list[int]]:
    """(layer axes, contracted axes, output axes) of a weight, by its logical axis names."""
    names = var.get_metadata().get("out_sharding")
    contracted = quant.contracted_axes(path, names)
    layers = [i for i, n in enumerate(names) if n == "layers"]
    rest = [i for i in range(len(names)) if i not in layers and i not in contracted]
    return layers, list(contracted), rest


def adapter_specs(abstract_state: nnx.State, paths, rank: int) -> dict:
    """{path: {"a": (shape, names), "b": (shape, names)}} of the adapters of `paths`."""
    flat = {tuple(str(k) for k in p): v for p, v in nnx.to_flat_state(abstract_state)}
    specs = {}
    for path in paths:
        var = flat[path]
        names, shape = var.get_metadata().get("out_sharding"), var.shape
        layers, contracted, rest = _split_axes(path, var)
        if layers + contracted + rest != list(range(len(shape))):
            raise ValueError(f"{'.'.join(path)}: axes {names} are not ordered [layers, in, out]")
        (ls, ln), (cs, cn), (rs, rn) = (
            ([shape[i] for i in ax], [names[i] for i in ax]) for ax in (layers, contracted, rest)
        )
        specs[path] = {"a": ((*ls, *cs, rank), (*ln, *cn, None)), "b": ((*ls, rank, *rs), (*ln, None, *rn))}
    return specs


def _nested(flat: dict) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def flatten(adapters: dict) -> dict:
    """{path of the adapted weight: {"a": A, "b": B}} of a nested adapter dict."""
    out = {}

    def walk(node, prefix):
        if set(node) == {"a", "b"}:
            out[prefix] = node
            return
        for key, value in node.items():
            walk(value, (*prefix, key))

    walk(adapters, ())
    return out


def abstract_adapters(specs: dict, dtype=jnp.float32) -> dict:
    return _nested({p: {k: jax.ShapeDtypeStruct(s[0], dtype) for k, s in ab.items()} for p, ab in specs.items()})


def adapter_names(specs: dict) -> dict:
    """The nested dict of the adapters' logical axis names (the shape of the adapter dict)."""
    return _nested({p: {k: s[1] for k, s in ab.items()} for p, ab in specs.items()})


def init_adapters(specs: dict, key: jax.Array, dtype=jnp.float32) -> dict:
    """A uniform in +-1/sqrt(fan_in) (peft's default, kaiming-uniform with a = sqrt(5)), B zero: the adapted model
    starts as the base model."""
    flat = {}
    for i, (path, ab) in enumerate(sorted(specs.items())):
        a_shape, b_shape = ab["a"][0], ab["b"][0]
        fan_in = math.prod(a_shape[len(a_shape) - 1 - _in_ndim(ab) : -1])
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), a_shape, jnp.float32, -bound, bound)
        flat[path] = {"a": a.astype(dtype), "b": jnp.zeros(b_shape, dtype)}
    return _nested(flat)


def _in_ndim(ab) -> int:
    """How many contracted ("in") axes an adapter has: A's axes minus the layer axes and the rank."""
    layers = sum(n == "layers" for n in ab["a"][1])
    return len(ab["a"][0]) - layers - 1


# ------------------------------------------------------------------------------------------------ using them


def apply(params: dict, adapters: dict, config: LoraConfig, dropout_key: jax.Array | None = None) -> dict:
    """`params` (a nested parameter dict) with each adapted weight replaced by its `LoraWeight`. With a
    `dropout_key` and config.dropout > 0, each adapter's input is dropped out (its own key per adapter and layer)."""
    flat_params = dict(_flat_params(params))
    for i, (path, ab) in enumerate(sorted(flatten(adapters).items())):
        key = None
        if dropout_key is not None and config.dropout > 0:
            layers = _layer_axes(flat_params[path], ab["a"], ab["b"])
            key = jax.random.fold_in(dropout_key, i)  # a raw uint32 key: it slices with the layers in a scan
            key = jax.random.split(key, ab["a"].shape[:layers]) if layers else key
        flat_params[path] = LoraWeight(flat_params[path], ab["a"], ab["b"], key, config.scale, config.dropout)
    return _nested(flat_params)


def _layer_axes(base, a, b) -> int:
    """How many leading layer axes a weight and its adapter share: base is [*L, *in, *out], A [*L, *in, r] and
    B [*L, r, *out], so A and B together have the layer axes twice and one rank axis each."""
    return a.ndim + b.ndim - 2 - len(base.shape)


def _flat_params(params: dict, prefix=()):
    for key, value in params.items():
        if isinstance(value, dict):
            yield from _flat_params(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def merged_weight(base, a, b, scale: float, dtype=None):
    """base + scale * A B in the base's layout (in float32, cast to `dtype`, default the base's)."""
    dtype = dtype or base.dtype
    base32 = base.astype(jnp.float32) if isinstance(base, quant.Int8Weight) else jnp.asarray(base, jnp.float32)
    a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    # A [*L, *in, r] @ B [*L, r, *out]: flatten in/out, batch over the layer axes.
    rank = a32.shape[-1]
    layer_ndim = _layer_axes(base32, a32, b32)
    lead = a32.shape[:layer_ndim]
    in_shape, out_shape = a32.shape[layer_ndim:-1], b32.shape[layer_ndim + 1 :]
    a2 = a32.reshape(*lead, math.prod(in_shape), rank)
    b2 = b32.reshape(*lead, rank, math.prod(out_shape))
    delta = jnp.matmul(a2, b2).reshape(*lead, *in_shape, *out_shape)
    return (base32 + scale * delta).astype(dtype)


def merge(params: dict, adapters: dict, config: LoraConfig) -> dict:
    """`params` with every adapter folded into its weight (plain arrays again: export, inference)."""
    flat_params = dict(_flat_params(params))
    for path, ab in flatten(adapters).items():
        flat_params[path] = merged_weight(flat_params[path], ab["a"], ab["b"], config.scale)
    return _nested(flat_params)


# ------------------------------------------------------------------------------------------------ peft's layout


def to_peft(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One layer's A [*in, r], B [r, *out] -> peft's (lora_A.weight [r, in], lora_B.weight [out, r])."""
    rank = a.shape[-1]
    return np.ascontiguousarray(a.reshape(-1, rank).T), np.ascontiguousarray(b.reshape(rank, -1).T)


def from_peft(lora_a: np.ndarray, lora_b: np.ndarray, a_shape, b_shape) -> tuple[np.ndarray, np.ndarray]:
    """peft's (lora_A.weight, lora_B.weight) -> one layer's A, B of the given shapes."""
    return lora_a.T.reshape(a_shape), lora_b.T.reshape(b_shape)
