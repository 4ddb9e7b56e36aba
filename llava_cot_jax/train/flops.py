"""Analytic FLOPs of a train step, for MFU.

Counted per sample from the shapes the step actually computes (the padded sequence bucket, every tile slot of
every image slot), 2 FLOPs per multiply-add, matmuls and attention only (norms, softmax and elementwise work
are negligible at these sizes). Attention is counted over the full key range (our kernels compute the masked
scores too), and rematerialisation's recomputation is not counted (MFU counts model FLOPs, not hardware FLOPs).

Backward costs twice the forward for a trained part (activation gradients + weight gradients); a frozen part
costs its forward, plus one more forward's worth for the activation gradients when a trained part lies before
it (vision tower -> projector -> language model).
"""

from __future__ import annotations

import dataclasses

from llava_cot_jax.models.llava.config import LlavaConfig
from llava_cot_jax.models.mllama.config import MllamaConfig

# Dense bf16 peak FLOP/s per device, by the start of `jax.Device.device_kind` (vendor data sheets).
PEAK_FLOPS = {
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # v5p reports "TPU v5"
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
}


def peak_flops(device_kind: str) -> float | None:
    """The dense bf16 peak of a device kind, or None when unknown (e.g. CPUs)."""
    for prefix in sorted(PEAK_FLOPS, key=len, reverse=True):
        if device_kind.startswith(prefix):
            return PEAK_FLOPS[prefix]
    return None


@dataclasses.dataclass(frozen=True)
class ForwardFlops:
    """Forward FLOPs of one sample, per part."""

    vision: float
    projector: float
    language: float


def forward_flops(config, seq_len: int, max_images: int, with_images: bool = True) -> ForwardFlops:
    if isinstance(config, LlavaConfig):
        return _llava_forward_flops(config, seq_len, max_images if with_images else 0)
    return _mllama_forward_flops(config, seq_len, max_images if with_images else 0)


def _decoder_layer_flops(t, seq_len: int) -> float:
    """One self-attention decoder layer over `seq_len` tokens (projections, scores and values, MLP)."""
    D, F, hd = t.hidden_size, t.intermediate_size, t.head_dim
    H, K, L = t.num_attention_heads, t.num_key_value_heads, seq_len
    return 2 * L * D * (2 * H + 2 * K) * hd + 4 * L * L * H * hd + 2 * L * 3 * D * F


def _llava_forward_flops(config: LlavaConfig, seq_len: int, images: int) -> ForwardFlops:
    """The CLIP layers that run (to the selected hidden state) over patches + class token per image slot; the
    two-layer projector per image token; the decoder over the whole sequence, image tokens included."""
    v, t = config.vision, config.text
    tokens, d, f = v.num_patches + 1, v.hidden_size, v.intermediate_size
    layer = 2 * tokens * (4 * d * d + 2 * d * f) + 4 * tokens * tokens * d
    patch = 2 * v.num_patches * v.num_channels * v.patch_size**2 * d
    vision = images * (patch + v.layers_run(config.vision_feature_layer) * layer)
    projector = images * 2 * config.image_tokens * (d * t.hidden_size + t.hidden_size * t.hidden_size)
    language = t.num_hidden_layers * _decoder_layer_flops(t, seq_len) + 2 * seq_len * t.hidden_size * t.vocab_size
    return ForwardFlops(float(vision), float(projector), float(language))


def _mllama_forward_flops(config: MllamaConfig, seq_len: int, images: int) -> ForwardFlops:
    v, t = config.vision, config.text
    tiles = v.max_num_tiles
    vision_tokens = tiles * v.padded_num_patches  # per image, as the encoder runs them
    patch_tokens = tiles * (v.num_patches - 1)
    d, f = v.hidden_size, v.intermediate_size
    layer = 2 * vision_tokens * (4 * d * d + 2 * d * f) + 4 * vision_tokens * vision_tokens * d
    patch = 2 * patch_tokens * v.num_channels * v.patch_size**2 * d
    vision = images * (patch + (v.num_hidden_layers + v.num_global_layers) * layer)

    image_tokens = images * tiles * v.num_patches  # what the projector and cross-attention see
    projector = 2 * image_tokens * v.vision_output_dim * t.hidden_size

    D, F, hd = t.hidden_size, t.intermediate_size, t.head_dim
    H, K, L = t.num_attention_heads, t.num_key_value_heads, seq_len
    mlp = 2 * L * 3 * D * F
    self_layer = _decoder_layer_flops(t, seq_len)
    cross_layer = 2 * L * 2 * D * H * hd + mlp
    if image_tokens:  # text-only input skips the cross-attention layers
        cross_layer += 2 * image_tokens * 2 * D * K * hd + 4 * L * image_tokens * H * hd
    else:
        cross_layer = 0
    head = 2 * L * D * t.vocab_size
    language = len(t.self_attention_layers) * self_layer + len(t.cross_attention_layers) * cross_layer + head
    return ForwardFlops(float(vision), float(projector), float(language))


def train_flops_per_sample(forward: ForwardFlops, frozen_groups: tuple[str, ...]) -> float:
    """Forward + backward FLOPs of one sample under the given frozen groups (see the module docstring)."""
    total, trained_before = 0.0, False
    for group, flops in (("vision", forward.vision), ("projector", forward.projector), ("language", forward.language)):
        trained = group not in frozen_groups
        total += flops * (3 if trained else 2 if trained_before else 1)
        trained_before = trained_before or trained
    return total


def train_step_flops(
    config, global_batch: int, seq_len: int, max_images: int, frozen_groups: tuple[str, ...] = ()
) -> float:
    """FLOPs of one optimizer step over `global_batch` samples padded to `seq_len` tokens."""
    return global_batch * train_flops_per_sample(forward_flops(config, seq_len, max_images), frozen_groups)
