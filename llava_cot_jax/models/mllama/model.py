"""MllamaForConditionalGeneration in Flax NNX: vision tower -> projector -> text decoder with cross-attention.

`model(**inputs)` takes transformers' keyword inputs and returns `.logits`; generation lives above the model
(`llava_cot_jax.generate.generate(model, **inputs, ...)`). Cached decoding is split into primitives the sampler
composes: `encode_images` (vision tower + projector, once per image), `cross_kv` (cross-attention keys/values,
once per image, shared by every candidate and judge call), `init_cache` and `forward_cached`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from llava_cot_jax.models.mllama.config import MllamaConfig
from llava_cot_jax.models.mllama.layers import param
from llava_cot_jax.models.mllama.text import TextModel
from llava_cot_jax.models.mllama.vision import VisionModel


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MllamaOutput:
    logits: jax.Array  # [B, S, vocab] float32


class MllamaForConditionalGeneration(nnx.Module):
    # The decoder reads the image through cross-attention at every step, masked by cross_attention_mask (the
    # sampler passes `image_context` to each decode step; a LLaVA model reads it once, in the prompt).
    cross_attends_images = True

    def __init__(self, config: MllamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        pdt = config.jnp_param_dtype
        self.vision_model = VisionModel(config.vision, pdt, rngs)
        self.multi_modal_projector = param(
            rngs, (config.vision.vision_output_dim, config.text.hidden_size), ("vision_out", "embed"), pdt
        )
        self.multi_modal_projector_bias = param(rngs, (config.text.hidden_size,), ("embed",), pdt, init="zeros")
        self.language_model = TextModel.of(config, rngs)

    # ------------------------------------------------------------------------------------------ inference

    def encode_images(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask) -> jax.Array:
        """[B, I, T, 3, H, W] pixels -> projected vision tokens [B, I * T * num_patches, text hidden]."""
        dt = self.config.jnp_dtype
        features = self.vision_model(
            jnp.asarray(pixel_values),
            jnp.asarray(aspect_ratio_ids),
            jnp.asarray(aspect_ratio_mask),
            dt,
            self.config.remat,
        )
        projected = features @ self.multi_modal_projector[...].astype(dt) + self.multi_modal_projector_bias[...].astype(
            dt
        )
        return projected.reshape(projected.shape[0], -1, projected.shape[-1])

    def image_context(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask) -> dict:
        """What decoding reads of a batch of images (the sampler's family-independent entry): every
        cross-attention layer's keys/values of the projected vision tokens (see `cross_kv`)."""
        return self.cross_kv(self.encode_images(pixel_values, aspect_ratio_ids, aspect_ratio_mask))

    def cross_kv(self, vision_states: jax.Array) -> dict:
        """{'k', 'v'}: [num_cross_layers, B, kv_heads, N_vision, head_dim]; rows (axis 1) can be gathered freely."""
        return self.language_model.cross_kv(vision_states)

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> dict:
        """An empty self-attention KV cache {'k', 'v'}: [num_self_layers, B, kv_heads, max_len, head_dim] when the
        layers are scanned; unscanned, a tuple of [B, kv_heads, max_len, head_dim] per layer (separate buffers
        are updated in place; see MllamaConfig.scan_layers). Rows sit 4 axes from the end (take_rows)."""
        t = self.config.text
        shape = (batch_size, t.num_key_value_heads, max_len, t.head_dim)
        dtype = dtype or self.config.jnp_dtype
        layers = len(t.self_attention_layers)
        if self.config.scan_layers:
            return {"k": jnp.zeros((layers, *shape), dtype), "v": jnp.zeros((layers, *shape), dtype)}
        return {name: tuple(jnp.zeros(shape, dtype) for _ in range(layers)) for name in ("k", "v")}

    def forward_cached(
        self, input_ids, positions, cache, cache_index, key_valid, cross_kv=None, cross_attention_mask=None
    ):
        """Runs S new tokens per row against the cache; returns (logits [B, S, V] fp32, new cache).

        The tokens are written at slots [cache_index, cache_index + S) of every row (of its own row, when cache_index
        is [B]); `key_valid` [B, max_len] marks slots holding real tokens (including the new ones). Causality is
        by slot. Without `cross_kv` the cross-attention layers are skipped, as the reference does for text-only
        input."""
        return self.language_model(
            jnp.asarray(input_ids),
            jnp.asarray(positions),
            jnp.asarray(key_valid),
            self.config.jnp_dtype,
            cache=cache,
            cache_index=cache_index,
            cross_kv=cross_kv,
            cross_attention_mask=None if cross_attention_mask is None else jnp.asarray(cross_attention_mask),
            num_vision_tokens_per_tile=self.config.vision.num_patches,
        )

    # ---------------------------------------------------------------------------------------- full forward

    def __call__(self, *args, **kwargs) -> MllamaOutput:
        """The forward pass of transformers' MllamaForConditionalGeneration: the arguments of
        `last_hidden_state` (transformers' names), logits out."""
        return MllamaOutput(logits=self.language_model.logits(self.last_hidden_state(*args, **kwargs)))

    def last_hidden_state(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        aspect_ratio_ids=None,
        aspect_ratio_mask=None,
        cross_attention_mask=None,
        position_ids=None,
        cross_attention_states=None,
    ) -> jax.Array:
        """The decoder's final-norm hidden states [B, S, D] (the logits are `language_model.logits` of them).
        Keyword-compatible with transformers' MllamaForConditionalGeneration.forward."""
        input_ids = jnp.asarray(input_ids)
        b, s = input_ids.shape
        if pixel_values is not None and cross_attention_states is not None:
            raise ValueError("pass either pixel_values or cross_attention_states, not both")
        if pixel_values is not None:
            if aspect_ratio_ids is None:
                raise ValueError("aspect_ratio_ids is required with pixel_values")
            if aspect_ratio_mask is None:
                aspect_ratio_mask = jnp.ones(jnp.shape(pixel_values)[:3], jnp.int32)
            cross_attention_states = self.encode_images(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        cross_kv = None if cross_attention_states is None else self.cross_kv(cross_attention_states)
        key_valid = jnp.ones((b, s), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        positions = jnp.broadcast_to(jnp.arange(s), (b, s)) if position_ids is None else jnp.asarray(position_ids)
        hidden, _ = self.language_model(
            input_ids,
            positions,
            key_valid,
            self.config.jnp_dtype,
            cross_kv=cross_kv,
            cross_attention_mask=None if cross_attention_mask is None else jnp.asarray(cross_attention_mask),
            num_vision_tokens_per_tile=self.config.vision.num_patches,
            return_hidden=True,
        )
        return hidden


def take_rows(tree, rows: jax.Array):
    """Rows `rows` of a KV cache or cross-attention K/V tree, scanned or not: every leaf keeps its batch axis
    4 axes from the end ([layers, B, K, T, hd] or [B, K, T, hd])."""
    return jax.tree.map(lambda x: jnp.take(x, rows, axis=x.ndim - 4), tree)


def count_params(model_or_state) -> int:
    """Number of parameters of a model (concrete or abstract, e.g. from nnx.eval_shape)."""
    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))
