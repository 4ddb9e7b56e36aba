"""LlavaForConditionalGeneration in Flax NNX: CLIP vision tower -> two-layer MLP projector -> Llama decoder.

Each image becomes `config.image_tokens` feature vectors that replace, in order, the embeddings of the image
tokens in `input_ids` (the prompt holds one image token per feature, as transformers' llava processor writes it).
The decoder is Mllama's text model without cross-attention layers, so cached decoding is the same code: the
image features enter once, with the prompt, through `forward_cached(..., image_context=)`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_cot_jax.models.llava.clip import ClipVisionModel
from llava_cot_jax.models.llava.config import LlavaConfig
from llava_cot_jax.models.mllama.layers import param
from llava_cot_jax.models.mllama.text import TextModel


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LlavaOutput:
    logits: jax.Array  # [B, S, vocab] float32


class Projector(nnx.Module):
    """linear -> GELU (exact) -> linear, vision width -> text width."""

    def __init__(self, vision_dim: int, text_dim: int, dtype, rngs: nnx.Rngs):
        self.linear_1 = param(rngs, (vision_dim, text_dim), ("vision_out", "embed"), dtype)
        self.linear_1_bias = param(rngs, (text_dim,), ("embed",), dtype, init="zeros")
        self.linear_2 = param(rngs, (text_dim, text_dim), ("mlp", "embed"), dtype)
        self.linear_2_bias = param(rngs, (text_dim,), ("embed",), dtype, init="zeros")

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        h = jax.nn.gelu(x @ self.linear_1[...].astype(dt) + self.linear_1_bias[...].astype(dt), approximate=False)
        return h @ self.linear_2[...].astype(dt) + self.linear_2_bias[...].astype(dt)


class LlavaForConditionalGeneration(nnx.Module):
    # The image enters once, spliced into the prompt's embeddings; decode steps do not read it (see
    # MllamaForConditionalGeneration.cross_attends_images).
    cross_attends_images = False

    def __init__(self, config: LlavaConfig, *, rngs: nnx.Rngs):
        self.config = config
        pdt = config.jnp_param_dtype
        self.vision_tower = ClipVisionModel(config.vision, pdt, rngs)
        self.multi_modal_projector = Projector(config.vision.hidden_size, config.text.hidden_size, pdt, rngs)
        self.language_model = TextModel.of(config, rngs)

    def encode_images(self, pixel_values) -> jax.Array:
        """[N, 3, H, W] pixels -> projected image features [N, image_tokens, text hidden]."""
        cfg = self.config
        hidden = self.vision_tower(
            jnp.asarray(pixel_values), cfg.vision.layers_run(cfg.vision_feature_layer), cfg.jnp_dtype, cfg.remat
        )
        if cfg.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]
        return self.multi_modal_projector(hidden)

    def embed(self, input_ids, image_features=None) -> jax.Array:
        """Token embeddings [B, S, D] with the image tokens' rows replaced, in reading order, by the rows of
        `image_features` [N, image_tokens, D] (every image's features, images in order: transformers' layout)."""
        input_ids = jnp.asarray(input_ids)
        x = self.language_model.embed(input_ids).astype(self.config.jnp_dtype)
        if image_features is None:
            return x
        features = image_features.reshape(-1, image_features.shape[-1]).astype(x.dtype)
        is_image = input_ids == self.config.image_token_id
        if not isinstance(is_image, jax.core.Tracer):
            found = int(np.asarray(is_image).sum())
            if found != features.shape[0]:
                raise ValueError(
                    f"the prompt holds {found} image tokens but the images give {features.shape[0]} features "
                    f"({image_features.shape[0]} image(s) x {self.config.image_tokens})"
                )
        order = jnp.cumsum(is_image.reshape(-1)) - 1  # the feature row each image token takes
        spliced = features[jnp.clip(order, 0, features.shape[0] - 1)].reshape(x.shape)
        return jnp.where(is_image[..., None], spliced, x)

    def embed_rows(self, input_ids, image_context) -> jax.Array:
        """Token embeddings [B, S, D] with row b's image tokens replaced, in order, by row b's features of
        `image_context` [B, 1, M, D] (see `image_context`); features beyond a row's image tokens (padding image
        slots) are not read. With R = r * B token rows, each run of r consecutive rows reads one context row, as
        rows share Mllama's cross-attention K/V (the candidates or judge prompts of one question)."""
        input_ids = jnp.asarray(input_ids)
        features = image_context[:, 0]
        if input_ids.shape[0] % features.shape[0]:
            raise ValueError(f"{input_ids.shape[0]} token rows cannot share {features.shape[0]} rows of image features")
        features = jnp.repeat(features, input_ids.shape[0] // features.shape[0], axis=0)
        is_image = input_ids == self.config.image_token_id
        order = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, features.shape[1] - 1)
        spliced = jnp.take_along_axis(features, order[..., None], axis=1).astype(self.config.jnp_dtype)
        return jnp.where(is_image[..., None], spliced, self.language_model.embed(input_ids).astype(spliced.dtype))

    # ------------------------------------------------------------------------------------------ inference

    def image_context(self, pixel_values, aspect_ratio_ids=None, aspect_ratio_mask=None) -> jax.Array:
        """What decoding reads of a batch of images: pixel_values [B, I, 3, H, W] (I images per prompt row) ->
        each row's image features in order, [B, 1, I * image_tokens, D]. The singleton axis gives the array the
        layout of one layer's cross-attention K/V ([B, K, T, hd]), so the sampler gathers and shards it as it
        does Mllama's. The aspect-ratio arguments are Mllama's tiling; a LLaVA image is one square."""
        del aspect_ratio_ids, aspect_ratio_mask
        pixel_values = jnp.asarray(pixel_values)
        b, i = pixel_values.shape[:2]
        features = self.encode_images(pixel_values.reshape(b * i, *pixel_values.shape[2:]))
        return features.reshape(b, 1, i * features.shape[1], features.shape[2])

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> dict:
        """An empty KV cache, as MllamaForConditionalGeneration.init_cache."""
        t = self.config.text
        shape = (batch_size, t.num_key_value_heads, max_len, t.head_dim)
        dtype = dtype or self.config.jnp_dtype
        layers = t.num_hidden_layers
        if self.config.scan_layers:
            return {"k": jnp.zeros((layers, *shape), dtype), "v": jnp.zeros((layers, *shape), dtype)}
        return {name: tuple(jnp.zeros(shape, dtype) for _ in range(layers)) for name in ("k", "v")}

    def forward_cached(
        self, input_ids, positions, cache, cache_index, key_valid, image_context=None, cross_attention_mask=None
    ):
        """Runs S new tokens per row against the cache (see MllamaForConditionalGeneration.forward_cached);
        with `image_context` (from `image_context`), row b's image tokens take row b's features in order.
        `cross_attention_mask` is Mllama's and unused. Returns (logits [B, S, V] fp32, new cache)."""
        del cross_attention_mask
        input_ids = jnp.asarray(input_ids)
        embeddings = None if image_context is None else self.embed_rows(input_ids, image_context)
        return self.language_model(
            input_ids,
            jnp.asarray(positions),
            jnp.asarray(key_valid),
            self.config.jnp_dtype,
            cache=cache,
            cache_index=cache_index,
            embeddings=embeddings,
        )

    # ---------------------------------------------------------------------------------------- full forward

    def __call__(self, *args, **kwargs) -> LlavaOutput:
        """The forward pass of transformers' LlavaForConditionalGeneration (its argument names), logits out."""
        return LlavaOutput(logits=self.language_model.logits(self.last_hidden_state(*args, **kwargs)))

    def last_hidden_state(self, input_ids, attention_mask=None, pixel_values=None, position_ids=None) -> jax.Array:
        """The decoder's final-norm hidden states [B, S, D]. `pixel_values` in transformers' layout [N, 3, H, W]
        (images in reading order over the batch) or per row [B, I, 3, H, W] (the training pipeline's)."""
        input_ids = jnp.asarray(input_ids)
        b, s = input_ids.shape
        if pixel_values is None:
            embeddings = self.embed(input_ids)
        elif jnp.ndim(pixel_values) == 5:
            embeddings = self.embed_rows(input_ids, self.image_context(pixel_values))
        else:
            embeddings = self.embed(input_ids, self.encode_images(pixel_values))
        key_valid = jnp.ones((b, s), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        positions = jnp.broadcast_to(jnp.arange(s), (b, s)) if position_ids is None else jnp.asarray(position_ids)
        hidden, _ = self.language_model(
            input_ids,
            positions,
            key_valid,
            self.config.jnp_dtype,
            embeddings=embeddings,
            return_hidden=True,
        )
        return hidden
