"""The Mllama tiled vision encoder.

Each image is split into up to `max_num_tiles` tiles. Per tile: a patch convolution (done here as one
matmul over unfolded patches), a class token, gated tile and positional embeddings, then a local encoder
over all tiles of an image jointly, and a gated global encoder. The output per token concatenates the
final state with the states tapped at `intermediate_layers_indices` (interleaved on the feature axis).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llava_cot_jax.models.mllama.config import VisionConfig
from llava_cot_jax.models.mllama.layers import (
    MASK_VALUE,
    RESIDUAL_AXES,
    LayerNorm,
    attention_projections,
    heads_major,
    param,
    query_chunked_attention,
    scan_layers,
    stack_layers,
)
from llava_cot_jax.sharding import constrain


class VisionEncoderLayer(nnx.Module):
    """Pre-norm transformer layer; the global layers scale both branches by tanh gates."""

    def __init__(self, cfg: VisionConfig, gated: bool, dtype, rngs: nnx.Rngs):
        d, h, hd, f = cfg.hidden_size, cfg.attention_heads, cfg.head_dim, cfg.intermediate_size
        self.input_layernorm = LayerNorm(d, cfg.norm_eps, dtype, rngs)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attention_projections(
            rngs, d, h, h, hd, dtype, kv_axis="heads"
        )
        self.post_attention_layernorm = LayerNorm(d, cfg.norm_eps, dtype, rngs)
        self.fc1 = param(rngs, (d, f), ("embed", "mlp"), dtype)
        self.fc1_bias = param(rngs, (f,), ("mlp",), dtype, init="zeros")
        self.fc2 = param(rngs, (f, d), ("mlp", "embed"), dtype)
        self.fc2_bias = param(rngs, (d,), ("embed",), dtype, init="zeros")
        self.gated = gated
        self.tile_tokens = cfg.padded_num_patches
        if gated:
            self.gate_attn = param(rngs, (1,), (None,), dtype)
            self.gate_ffn = param(rngs, (1,), (None,), dtype)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        dt = x.dtype
        h = self.input_layernorm(x)
        q = heads_major(h, self.q_proj[...])
        k = heads_major(h, self.k_proj[...])
        v = heads_major(h, self.v_proj[...])
        # One tile's worth of queries at a time (see query_chunked_attention): the sequence is tiles x padded tile.
        out = query_chunked_attention(q, k, v, bias, dt, chunk=self.tile_tokens)
        out = jnp.einsum("bhlk,hkd->bld", out, self.o_proj[...].astype(dt))
        if self.gated:
            out = jnp.tanh(self.gate_attn[...].astype(dt)) * out
        x = x + out

        h = self.post_attention_layernorm(x)
        h = jax.nn.gelu(h @ self.fc1[...].astype(dt) + self.fc1_bias[...].astype(dt), approximate=False)
        out = h @ self.fc2[...].astype(dt) + self.fc2_bias[...].astype(dt)
        if self.gated:
            out = jnp.tanh(self.gate_ffn[...].astype(dt)) * out
        return constrain(x + out, RESIDUAL_AXES)


class AspectRatioEmbedding(nnx.Module):
    """A gated per-tile embedding chosen by the image's aspect-ratio id (pre and post tile embeddings)."""

    def __init__(self, cfg: VisionConfig, dtype, rngs: nnx.Rngs):
        self.embedding = param(
            rngs, (cfg.max_aspect_ratio_id + 1, cfg.max_num_tiles * cfg.hidden_size), ("aspect_ratio", "embed"), dtype
        )
        self.gate = param(rngs, (1,), (None,), dtype)
        self.max_num_tiles, self.hidden_size = cfg.max_num_tiles, cfg.hidden_size

    def __call__(self, x: jax.Array, aspect_ratio_ids: jax.Array) -> jax.Array:
        """x: [N, tiles, tokens, D]; aspect_ratio_ids: [N]."""
        emb = self.embedding[...][aspect_ratio_ids].astype(x.dtype)
        emb = emb.reshape(-1, self.max_num_tiles, 1, self.hidden_size)
        return x + jnp.tanh(self.gate[...].astype(x.dtype)) * emb


class GatedPositionalEmbedding(nnx.Module):
    """Per-token position embedding mixed, through one gate, with a per-(aspect ratio, tile, token) embedding."""

    def __init__(self, cfg: VisionConfig, dtype, rngs: nnx.Rngs):
        p, d, t = cfg.num_patches, cfg.hidden_size, cfg.max_num_tiles
        self.embedding = param(rngs, (p, d), ("patch", "embed"), dtype)
        self.tile_embedding = param(rngs, (cfg.max_aspect_ratio_id + 1, t * p * d), ("aspect_ratio", "embed"), dtype)
        self.gate = param(rngs, (1,), (None,), dtype)
        self.shape = (t, p, d)

    def __call__(self, x: jax.Array, aspect_ratio_ids: jax.Array) -> jax.Array:
        gate = jnp.tanh(self.gate[...].astype(x.dtype))
        x = x + (1 - gate) * self.embedding[...].astype(x.dtype)
        tile = self.tile_embedding[...][aspect_ratio_ids].astype(x.dtype).reshape(-1, *self.shape)
        return x + gate * tile


class VisionModel(nnx.Module):
    def __init__(self, cfg: VisionConfig, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        # The patch convolution (stride == kernel, no bias) as a matmul over patches flattened (channel, row, col).
        self.patch_embedding = param(rngs, (cfg.num_channels * p * p, d), ("patch", "embed"), dtype)
        self.class_embedding = param(rngs, (d,), ("embed",), dtype)
        self.gated_positional_embedding = GatedPositionalEmbedding(cfg, dtype, rngs)
        self.pre_tile_positional_embedding = AspectRatioEmbedding(cfg, dtype, rngs)
        self.post_tile_positional_embedding = AspectRatioEmbedding(cfg, dtype, rngs)
        self.layernorm_pre = LayerNorm(d, 1e-5, dtype, rngs)
        self.layernorm_post = LayerNorm(d, 1e-5, dtype, rngs)
        self.transformer = stack_layers(lambda r: VisionEncoderLayer(cfg, False, dtype, r), cfg.num_hidden_layers, rngs)
        self.global_transformer = stack_layers(
            lambda r: VisionEncoderLayer(cfg, True, dtype, r), cfg.num_global_layers, rngs
        )

    def __call__(
        self,
        pixel_values: jax.Array,
        aspect_ratio_ids: jax.Array,
        aspect_ratio_mask: jax.Array,
        dtype,
        remat: str = "none",
    ) -> jax.Array:
        """pixel_values [B, I, T, C, H, W], aspect_ratio_ids [B, I], aspect_ratio_mask [B, I, T]
        -> features [B, I, T, num_patches, vision_output_dim]."""
        cfg = self.cfg
        b, i, t, c, height, width = pixel_values.shape
        n, p, d = b * i, cfg.patch_size, cfg.hidden_size
        gh, gw = height // p, width // p

        patches = pixel_values.astype(dtype).reshape(n * t, c, gh, p, gw, p)
        patches = patches.transpose(0, 2, 4, 1, 3, 5).reshape(n * t, gh * gw, c * p * p)
        x = (patches @ self.patch_embedding[...].astype(dtype)).reshape(n, t, gh * gw, d)
        ar_ids = aspect_ratio_ids.reshape(n)
        x = self.pre_tile_positional_embedding(x, ar_ids)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(dtype), (n, t, 1, d))
        x = jnp.concatenate([cls, x], axis=2)
        x = self.gated_positional_embedding(x, ar_ids)
        x = self.layernorm_pre(x)

        # Pad each tile to a multiple of 8 tokens. Padding tokens and padded tiles are "pad"; only pad->pad
        # attention is masked, as in the reference (real tokens may attend to pad tokens).
        num_tokens, padded = cfg.num_patches, cfg.padded_num_patches
        x = jnp.pad(x, ((0, 0), (0, 0), (0, padded - num_tokens), (0, 0)))
        is_pad = jnp.logical_or(aspect_ratio_mask.reshape(n, t, 1) == 0, jnp.arange(padded)[None, None] >= num_tokens)
        is_pad = is_pad.reshape(n, t * padded)
        bias = jnp.where(is_pad[:, :, None] & is_pad[:, None, :], MASK_VALUE, 0.0)[:, None, None]

        x = x.reshape(n, t * padded, d)
        x, taps = self._local_layers(x, bias, remat)
        x = self.layernorm_post(x)
        x = self.post_tile_positional_embedding(x.reshape(n, t, padded, d), ar_ids).reshape(n, t * padded, d)
        x, _ = scan_layers(self.global_transformer, lambda layer, h, _: (layer(h, bias), None), x, remat=remat)

        # Stack the taps on a new last axis and flatten: feature j of tap k lands at j * len(taps) + k.
        taps = jnp.stack(taps, axis=-1).reshape(n, t * padded, d * len(taps))
        out = jnp.concatenate([x, taps], axis=-1).reshape(n, t, padded, -1)[:, :, :num_tokens]
        return out.reshape(b, i, t, num_tokens, -1)

    def _local_layers(self, x, bias, remat):
        """Runs the local encoder, tapping the input of each layer in `intermediate_layers_indices`.

        The stack is scanned in segments between tap points, so only the tapped states are kept."""
        indices = self.cfg.intermediate_layers_indices
        boundaries = sorted(set(indices) | {0, self.cfg.num_hidden_layers})
        tapped = {}
        for start, stop in zip(boundaries[:-1], boundaries[1:]):
            tapped[start] = x
            x, _ = scan_layers(
                self.transformer, lambda layer, h, _: (layer(h, bias), None), x, start=start, stop=stop, remat=remat
            )
        return x, [tapped[i] for i in indices]
