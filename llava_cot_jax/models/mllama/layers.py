"""Building blocks shared by the Mllama vision tower and text decoder.

Weights carry logical axis names (`out_sharding` metadata) that `llava_cot_jax.sharding` maps onto a mesh.
Kernels are stored [in, out] (HF stores Linear weights [out, in]); attention projections keep heads as
their own axis ([embed, heads, head_dim]) so the head axis can be sharded without reshapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_cot_jax.models.mllama.lora import LoraWeight
from llava_cot_jax.models.mllama.quant import Int8Weight

# Logical axes of the residual stream [batch, seq, embed]: batch-sharded, replicated along the sequence and the
# hidden axis (the weights are what FSDP shards).
RESIDUAL_AXES = ("batch", None, None)

# The additive mask value of the reference (torch.finfo(float32).min). A finite value, not -inf, so that
# a fully masked row softmaxes to a uniform distribution exactly as the reference does.
MASK_VALUE = float(np.finfo(np.float32).min)


def stats_dtype(dtype):
    """The dtype of norm statistics, softmax and logits: float32, or the activations' own when wider (float64
    gradient checks)."""
    return jnp.promote_types(dtype, jnp.float32)


def param(rngs: nnx.Rngs, shape, axes: tuple[str | None, ...], dtype, init: str = "normal") -> nnx.Param:
    """A weight with logical axis names. Random init is for tests and from-scratch runs; real runs load weights."""
    assert len(shape) == len(axes), (shape, axes)
    if init == "normal":
        value = 0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    else:
        raise ValueError(init)
    return nnx.Param(value.astype(dtype), out_sharding=axes, eager_sharding=False)


def attention_projections(
    rngs: nnx.Rngs, dim: int, heads: int, kv_heads: int, head_dim: int, dtype, kv_axis: str = "kv_heads"
) -> tuple[nnx.Param, nnx.Param, nnx.Param, nnx.Param]:
    """q, k, v ([embed, heads, head_dim]) and o ([heads, head_dim, embed]) projection weights."""
    return (
        param(rngs, (dim, heads, head_dim), ("embed", "heads", "head_dim"), dtype),
        param(rngs, (dim, kv_heads, head_dim), ("embed", kv_axis, "head_dim"), dtype),
        param(rngs, (dim, kv_heads, head_dim), ("embed", kv_axis, "head_dim"), dtype),
        param(rngs, (heads, head_dim, dim), ("heads", "head_dim", "embed"), dtype),
    )


def project(spec: str, x: jax.Array, weight, **kwargs) -> jax.Array:
    """`jnp.einsum(spec, x, weight)` with the weight cast to x's dtype. An int8 weight (`quant.Int8Weight`) enters
    the matmul as its int8 values and its per-output-channel scale multiplies the product: the dequantized matrix
    is never written out (scaling the weight first made XLA:TPU materialise it, 2.5x the bytes of bf16). An adapted
    weight (`lora.LoraWeight`) adds its low-rank product to its frozen base's."""
    if isinstance(weight, LoraWeight):
        return project(spec, x, weight.base, **kwargs) + weight.delta(spec, x)
    if isinstance(weight, Int8Weight):
        return weight.scale_output(jnp.einsum(spec, x, weight.values.astype(x.dtype), **kwargs))
    return jnp.einsum(spec, x, weight.astype(x.dtype), **kwargs)


def heads_major(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """[B, S, D] @ [D, H, hd] -> [B, H, S, hd]. The matmul writes its natural [B, S, H, hd] and the transpose
    comes after: asking the einsum for heads-major output directly makes XLA:CPU transpose the weight
    instead, a full copy of it per call (at S = 1 the transpose of the activation is free)."""
    return project("bsd,dhk->bshk", x, kernel).transpose(0, 2, 1, 3)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """Llama RMSNorm: statistics in fp32, the scale applied in the activation dtype."""
    x32 = x.astype(stats_dtype(x.dtype))
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * scale.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype, rngs: nnx.Rngs, axis: str = "norm"):
        self.scale = param(rngs, (dim,), (axis,), dtype, init="ones")
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.scale[...], self.eps)


class LayerNorm(nnx.Module):
    """LayerNorm with fp32 statistics (the vision tower's norm)."""

    def __init__(self, dim: int, eps: float, dtype, rngs: nnx.Rngs):
        self.scale = param(rngs, (dim,), ("norm",), dtype, init="ones")
        self.bias = param(rngs, (dim,), ("norm",), dtype, init="zeros")
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(stats_dtype(x.dtype))
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        return normed * self.scale[...].astype(x.dtype) + self.bias[...].astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None, dtype) -> jax.Array:
    """Grouped-query attention with an fp32 softmax, everything heads-major.

    q: [B, H, S, D]; k, v: [B / r, K, T, D] with H a multiple of K (query head h reads kv head h // (H // K), the
    reference's repeat_kv layout); bias: additive, broadcastable to [B, 1, 1, S, T]. Returns [B, H, S, D].
    With r > 1, each run of r consecutive query rows shares one row of k/v (the N candidates of one question
    and its image): the image's keys and values are read once for all r rows instead of copied r times.
    The query heads of one kv head fold into the rows of a single batched matmul (batch axes B, K), which
    keeps XLA:CPU from transposing k or v: at decode shapes that is 2-3x faster than a 5-d einsum.
    """
    b, h, s, d = q.shape
    kv_batch, kv_heads, t = k.shape[:3]
    if b % kv_batch:
        raise ValueError(f"{b} query rows cannot share {kv_batch} rows of keys/values")
    r, group = b // kv_batch, h // kv_heads
    # [B, H, S, D] -> [B / r, K, r * G * S, D]; for r = 1 a pure reshape (heads are [K, G] in order).
    q = q.reshape(kv_batch, r, kv_heads, group * s, d).swapaxes(1, 2).reshape(kv_batch, kv_heads, r * group * s, d)
    batch_dims = ((0, 1), (0, 1))
    scores = jax.lax.dot_general(q, k, (((3,), (3,)), batch_dims), preferred_element_type=stats_dtype(q.dtype))
    scores = scores.reshape(kv_batch, kv_heads, r, group, s, t) * (d**-0.5)
    probs = None
    if bias is not None:
        bias = jnp.broadcast_to(bias, (b, 1, 1, s, t)).reshape(kv_batch, r, 1, s, t)[:, None]
        scores = scores + bias
        # A row whose every key is masked (a padded image slot in the vision encoder) softmaxes to uniform weights
        # in the reference, because the mask value swamps the scores: a constant. Its gradient with respect to the
        # scores is zero, not softmax's Jacobian at scores the forward pass lost (what plain autodiff, and
        # transformers, would give).
        fully_masked = jnp.max(bias, axis=-1, keepdims=True) <= MASK_VALUE / 2
        probs = jnp.where(fully_masked, 1.0 / t, jax.nn.softmax(scores, axis=-1))
    probs = jax.nn.softmax(scores, axis=-1) if probs is None else probs
    probs = probs.astype(dtype).reshape(kv_batch, kv_heads, r * group * s, t)
    out = jax.lax.dot_general(probs, v, (((3,), (2,)), batch_dims))
    return out.reshape(kv_batch, kv_heads, r, group * s, d).swapaxes(1, 2).reshape(b, h, s, d)


def query_chunked_attention(q, k, v, bias, dtype, chunk: int) -> jax.Array:
    """`attention` over blocks of `chunk` queries, one at a time, each recomputed in the backward pass: the
    [heads, queries, keys] scores exist for one block only, with the same result. The vision encoder attends over
    every token of an image (6432 for 4 tiles of 560 px: 2.6 GB of fp32 scores per image and layer at once); the
    text decoder's cross-attention over 2048 tokens and one such image holds 1.6 GB per layer, several times over
    in the backward pass. q [B, H, S, D]; bias None or broadcastable to [B, 1, 1, S, T]. S that is not a multiple
    of `chunk` is padded with queries whose rows are dropped; `chunk` <= 0 or >= S: plain `attention`."""
    b, h, s, d = q.shape
    if chunk <= 0 or s <= chunk:
        return attention(q, k, v, bias, dtype)
    n = -(-s // chunk)
    pad = n * chunk - s
    q_blocks = jnp.pad(q, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(b, h, n, chunk, d).transpose(2, 0, 1, 3, 4)
    if bias is None:
        bias_blocks = jnp.zeros((n,))  # a scanned placeholder: every block attends without a bias
    else:
        bias = jnp.broadcast_to(bias, (b, 1, 1, s, bias.shape[-1]))
        bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0)))
        bias_blocks = bias.reshape(b, 1, 1, n, chunk, -1).transpose(3, 0, 1, 2, 4, 5)

    @jax.checkpoint
    def block(_, xs):
        q_block, bias_block = xs
        return None, attention(q_block, k, v, None if bias is None else bias_block, dtype)

    _, out = jax.lax.scan(block, None, (q_blocks, bias_blocks))  # [n, B, H, chunk, D]
    return out.transpose(1, 2, 0, 3, 4).reshape(b, h, n * chunk, d)[:, :, :s]


def llama3_inv_freq(head_dim: int, theta: float, scaling: tuple[float, float, float, int] | None) -> np.ndarray:
    """RoPE inverse frequencies with Llama-3's wavelength-dependent scaling (applied at every position)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    inv_freq = inv_freq.astype(np.float32)
    if scaling is None:
        return inv_freq
    factor, low_freq_factor, high_freq_factor, original_context = scaling
    low_freq_wavelen = original_context / low_freq_factor
    high_freq_wavelen = original_context / high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    # Long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated smoothly.
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, S, head_dim] for integer positions [B, S], computed in fp32."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates heads-major [B, H, S, D] by the half-split convention of the HF Llama weights (cos/sin [B, S, D])."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class GatedMLP(nnx.Module):
    """Llama SwiGLU feed-forward."""

    def __init__(self, dim: int, hidden: int, dtype, rngs: nnx.Rngs):
        self.gate_proj = param(rngs, (dim, hidden), ("embed", "mlp"), dtype)
        self.up_proj = param(rngs, (dim, hidden), ("embed", "mlp"), dtype)
        self.down_proj = param(rngs, (hidden, dim), ("mlp", "embed"), dtype)

    def __call__(self, x):
        gate = project("...d,df->...f", x, self.gate_proj[...])
        up = project("...d,df->...f", x, self.up_proj[...])
        return project("...f,fd->...d", jax.nn.silu(gate) * up, self.down_proj[...])


def remat_policy(name: str):
    """Maps the config's `remat` name to a jax.checkpoint policy (None: no rematerialisation)."""
    policies = {
        "none": None,
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    }
    if name not in policies:
        raise ValueError(f"unknown remat policy {name!r}; choose one of {sorted(policies)}")
    return policies[name]


def maybe_remat(fn, name: str):
    policy = remat_policy(name)
    return fn if name == "none" else jax.checkpoint(fn, policy=policy)


def stack_layers(make_layer, num_layers: int, rngs: nnx.Rngs):
    """Creates `num_layers` copies of a layer with parameters stacked on a leading "layers" axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(layer_rngs):
        return make_layer(layer_rngs)

    return create(rngs)


def scan_layers(
    stacked: nnx.Module, body, carry, xs=None, start: int = 0, stop: int | None = None, remat: str = "none"
):
    """Runs `body(layer, carry, x) -> (carry, y)` over layers [start, stop) of a stacked module with lax.scan,
    so compile time does not grow with depth; `remat` names the activation-checkpointing policy per layer."""
    graphdef, params = nnx.split(stacked)
    params = jax.tree.map(lambda a: a[start:stop], params)
    if jax.tree.leaves(params) and jax.tree.leaves(params)[0].shape[0] == 0:
        return carry, None

    def step(c, layer_and_x):
        layer_params, x = layer_and_x
        return body(nnx.merge(graphdef, layer_params), c, x)

    return jax.lax.scan(maybe_remat(step, remat), carry, (params, xs))
