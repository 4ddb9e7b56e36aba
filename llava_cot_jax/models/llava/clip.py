"""The CLIP ViT vision tower of LLaVA-1.5 (transformers' CLIPVisionModel): patch and class embeddings, learned
positions, a LayerNorm before the encoder, pre-norm layers with biased attention and a quick-GELU MLP.

Only the layers that produce the selected hidden state run (23 of 24 for LLaVA-1.5's second-to-last layer); the
unused last layer and `post_layernorm` are kept as parameters so checkpoints convert both ways unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llava_cot_jax.models.llava.config import ClipVisionConfig
from llava_cot_jax.models.mllama.layers import (
    RESIDUAL_AXES,
    LayerNorm,
    attention,
    attention_projections,
    heads_major,
    param,
    scan_layers,
    stack_layers,
)
from llava_cot_jax.sharding import constrain


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's activation: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


class ClipEncoderLayer(nnx.Module):
    def __init__(self, cfg: ClipVisionConfig, dtype, rngs: nnx.Rngs):
        d, h, hd, f = cfg.hidden_size, cfg.attention_heads, cfg.head_dim, cfg.intermediate_size
        self.layer_norm1 = LayerNorm(d, cfg.norm_eps, dtype, rngs)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attention_projections(
            rngs, d, h, h, hd, dtype, kv_axis="heads"
        )
        self.q_bias, self.k_bias, self.v_bias = (
            param(rngs, (h, hd), ("heads", "head_dim"), dtype, init="zeros") for _ in range(3)
        )
        self.o_bias = param(rngs, (d,), ("embed",), dtype, init="zeros")
        self.layer_norm2 = LayerNorm(d, cfg.norm_eps, dtype, rngs)
        self.fc1 = param(rngs, (d, f), ("embed", "mlp"), dtype)
        self.fc1_bias = param(rngs, (f,), ("mlp",), dtype, init="zeros")
        self.fc2 = param(rngs, (f, d), ("mlp", "embed"), dtype)
        self.fc2_bias = param(rngs, (d,), ("embed",), dtype, init="zeros")

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        h = self.layer_norm1(x)

        def heads(kernel, bias):  # [B, S, D] -> [B, H, S, hd]
            return heads_major(h, kernel[...]) + bias[...].astype(dt)[None, :, None, :]

        q, k, v = heads(self.q_proj, self.q_bias), heads(self.k_proj, self.k_bias), heads(self.v_proj, self.v_bias)
        out = attention(q, k, v, None, dt)
        x = x + jnp.einsum("bhlk,hkd->bld", out, self.o_proj[...].astype(dt)) + self.o_bias[...].astype(dt)
        h = self.layer_norm2(x)
        h = quick_gelu(h @ self.fc1[...].astype(dt) + self.fc1_bias[...].astype(dt))
        return constrain(x + h @ self.fc2[...].astype(dt) + self.fc2_bias[...].astype(dt), RESIDUAL_AXES)


class ClipVisionModel(nnx.Module):
    def __init__(self, cfg: ClipVisionConfig, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        # The patch convolution (stride == kernel, no bias) as a matmul over patches flattened (channel, row, col).
        self.patch_embedding = param(rngs, (cfg.num_channels * p * p, d), ("patch", "embed"), dtype)
        self.class_embedding = param(rngs, (d,), ("embed",), dtype)
        self.position_embedding = param(rngs, (cfg.num_patches + 1, d), ("patch", "embed"), dtype)
        self.pre_layrnorm = LayerNorm(d, cfg.norm_eps, dtype, rngs)  # (sic: transformers' name)
        self.layers = stack_layers(lambda r: ClipEncoderLayer(cfg, dtype, r), cfg.num_hidden_layers, rngs)
        self.post_layernorm = LayerNorm(d, cfg.norm_eps, dtype, rngs)

    def __call__(self, pixel_values: jax.Array, num_layers: int, dtype, remat: str = "none") -> jax.Array:
        """pixel_values [N, C, H, W] -> hidden state after `num_layers` encoder layers [N, 1 + patches, D]."""
        cfg = self.cfg
        n, c, height, width = pixel_values.shape
        p, d = cfg.patch_size, cfg.hidden_size
        if (height, width) != (cfg.image_size, cfg.image_size):
            raise ValueError(f"pixel_values are {height}x{width}; this tower takes {cfg.image_size}x{cfg.image_size}")
        gh, gw = height // p, width // p
        patches = pixel_values.astype(dtype).reshape(n, c, gh, p, gw, p)
        patches = patches.transpose(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c * p * p)
        x = patches @ self.patch_embedding[...].astype(dtype)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(dtype), (n, 1, d))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...].astype(dtype)
        x = self.pre_layrnorm(x)
        x, _ = scan_layers(self.layers, lambda layer, h, _: (layer(h), None), x, stop=num_layers, remat=remat)
        return x
