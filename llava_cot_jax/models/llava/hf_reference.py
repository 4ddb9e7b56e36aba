"""Tiny random transformers LLaVA models: the torch-side reference of the llava family's parity tests and
benchmarks (built in-process; nothing is downloaded). torch and transformers are imported only when called."""

from __future__ import annotations

import numpy as np

from llava_cot_jax.models.llava.config import LlavaConfig
from llava_cot_jax.models.mllama.hf_reference import perturb_

# Input layouts of the logits-parity checks: name -> (sequence length, images per row, where each image's tokens
# start in its row, right padding per row).
PARITY_CASES = {
    "one_image": (12, [1], [[2]], None),
    "images_in_a_padded_batch": (16, [1, 2, 0], [[1], [1, 8], []], [0, 0, 5]),
    "image_in_the_second_turn": (16, [1], [[9]], None),
    "text_only": (10, [0, 0], [[], []], [0, 3]),
}


def hf_config(config: LlavaConfig):
    import transformers

    d = config.to_hf_dict()
    vision, text = dict(d.pop("vision_config")), dict(d.pop("text_config"))
    vision.pop("model_type")
    text.pop("model_type")
    return transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**vision),
        text_config=transformers.LlamaConfig(**text),
        image_token_index=config.image_token_id,
        image_seq_length=config.image_tokens,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        projector_hidden_act="gelu",
    )


def build_hf_model(config: LlavaConfig, seed: int = 0):
    """A random transformers LlavaForConditionalGeneration with perturbed norms and biases."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(hf_config(config)).eval()
    perturb_(model, seed)
    return model


def random_inputs(config: LlavaConfig, rng: np.random.Generator, seq: int, images_per_row, starts, pad_right=None):
    """transformers' inputs: rows of random text with `config.image_tokens` image tokens per image from
    `starts[b][i]`, right-padded by `pad_right[b]`; pixel_values [images in reading order, 3, H, W]."""
    batch, n = len(images_per_row), config.image_tokens
    ids = rng.integers(0, config.image_token_id, size=(batch, seq))
    ids[ids == config.text.pad_token_id] = 3
    attention_mask = np.ones((batch, seq), np.int64)
    for b in range(batch):
        for start in starts[b]:
            ids[b, start : start + n] = config.image_token_id
        if pad_right and pad_right[b]:
            attention_mask[b, seq - pad_right[b] :] = 0
            ids[b, seq - pad_right[b] :] = config.text.pad_token_id
    v = config.vision
    images = sum(images_per_row)
    pixel_values = rng.standard_normal((images, 3, v.image_size, v.image_size)).astype(np.float32)
    return dict(input_ids=ids, attention_mask=attention_mask, pixel_values=pixel_values if images else None)
