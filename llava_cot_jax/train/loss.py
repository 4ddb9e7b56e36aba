"""The supervised fine-tuning loss: next-token cross-entropy over the supervised (assistant) tokens.

`labels` follow transformers' convention: the same shape as `input_ids`, -100 where a token is not supervised,
and the shift happens here (the logits at position t predict `labels[t + 1]`). The loss equals
`MllamaForConditionalGeneration(..., labels=labels).loss` of transformers: the mean over supervised tokens.

Logits are never materialised for the whole batch: the final hidden states are cut into sequence chunks and each
chunk's fp32 logits live only inside a rematerialised scan step (at 128k vocabulary and 2k tokens a sample's fp32
logits alone are 1 GiB; a 512-token chunk is a quarter of that, and the backward pass recomputes it).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from llava_cot_jax.data.chat import IGNORE_INDEX
from llava_cot_jax.sharding import constrain

MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "aspect_ratio_ids",
    "aspect_ratio_mask",
    "cross_attention_mask",
)


def shifted_targets(labels: jax.Array) -> jax.Array:
    """[B, S] labels -> [B, S] targets: position t is scored against labels[t + 1]; the last position has none."""
    return jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)


def chunked_nll(logits_fn, hidden: jax.Array, targets: jax.Array, chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """(sum of -log p(target), number of scored targets) over [B, S, D] hidden states and [B, S] targets.

    `logits_fn` maps [B, C, D] hidden states to [B, C, V] fp32 logits. The sequence is padded to a multiple of
    the chunk (padding is not scored) and scanned chunk by chunk under jax.checkpoint."""
    b, s, d = hidden.shape
    chunk = min(chunk_size, s)
    pad = -s % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    n = (s + pad) // chunk
    hidden = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)
    targets = targets.reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(carry, xs):
        h, t = xs
        logits = constrain(logits_fn(h), ("batch", None, "vocab"))
        valid = t != IGNORE_INDEX
        target_logit = jnp.take_along_axis(logits, jnp.where(valid, t, 0)[..., None], axis=-1)[..., 0]
        nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
        total, count = carry
        return (total + jnp.sum(jnp.where(valid, nll, 0.0)), count + jnp.sum(valid, dtype=jnp.int32)), None

    total_dtype = jnp.promote_types(hidden.dtype, jnp.float32)  # float64 in gradient checks
    (total, count), _ = jax.lax.scan(one_chunk, (jnp.zeros((), total_dtype), jnp.int32(0)), (hidden, targets))
    return total, count


def model_inputs(batch: Mapping[str, jax.Array], dtype) -> dict[str, jax.Array]:
    """The model's keyword inputs from a training batch. uint8 pixels (the pipeline's `pixel_dtype="uint8"`) are
    normalised here, on the device, in `dtype`. A llava batch of text-only rows has an empty image axis
    ([B, 0, 3, H, W]); it goes to the model without pixels, so the vision tower does not run."""
    from llava_cot_jax.data.image import normalize_on_device

    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if "pixel_values" in inputs and inputs["pixel_values"].size == 0:
        del inputs["pixel_values"]
    pixels = inputs.get("pixel_values")
    if pixels is not None and pixels.dtype == jnp.uint8:
        inputs["pixel_values"] = normalize_on_device(
            pixels,
            aspect_ratio_ids=inputs.get("aspect_ratio_ids"),  # Mllama's padding tiles are zeroed with these
            aspect_ratio_mask=inputs.get("aspect_ratio_mask"),
            dtype=dtype,
        )
    return inputs


def nll_sum(model, batch: Mapping[str, jax.Array], chunk_size: int = 512) -> tuple[jax.Array, jax.Array]:
    """(summed token NLL, supervised token count) of one batch: the two numbers gradient accumulation adds up
    over micro-batches before dividing once."""
    hidden = model.last_hidden_state(**model_inputs(batch, model.config.jnp_dtype))
    return chunked_nll(model.language_model.logits, hidden, shifted_targets(batch["labels"]), chunk_size)


def loss_fn(model, batch: Mapping[str, jax.Array], chunk_size: int = 512) -> tuple[jax.Array, dict]:
    """Mean cross-entropy over the supervised tokens of `batch` (the processor's keys plus `labels`), and
    {"nll_sum", "tokens"}. Equals transformers' `MllamaForConditionalGeneration(..., labels=...).loss`.
    A batch without supervised tokens has loss 0 (and zero gradients), not NaN."""
    total, count = nll_sum(model, batch, chunk_size)
    return total / jnp.maximum(count, 1), {"nll_sum": total, "tokens": count}
