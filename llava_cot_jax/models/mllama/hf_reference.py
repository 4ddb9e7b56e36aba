"""Tiny random transformers Mllama models: the torch-side reference that the parity tests and the benchmarks
compare against (built in-process; nothing is downloaded). torch and transformers are imported only when a function
here is called, so the package stays importable without them.

transformers 5.x taps the vision encoder's intermediate states *after* each local layer, 4.45 (Meta's
reference, which LLaVA-CoT trained with) *before* it. Our configs follow 4.45, so the 5.x reference model
is built with every intermediate index shifted by -1: the same weights then compute 4.45's function.
The checkpoint written to disk carries the 4.45 indices, as real Hub checkpoints do.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING

import numpy as np

from llava_cot_jax.models.mllama.config import MllamaConfig

if TYPE_CHECKING:
    import torch
    import transformers

# Input layouts of the logits-parity checks (tests/test_model_parity.py, benchmarks/parity_table.py):
# name: (batch, seq, images per row, tiles per image, right padding per row)
PARITY_CASES = {
    "one_image_one_tile": (1, 10, [1], [[1]], None),
    "multi_tile_aspect_ratios": (2, 12, [1, 1], [[4], [3]], None),
    "two_images_in_one_sample": (1, 14, [2], [[2, 4]], None),
    "padded_tiles_and_image_slot": (2, 14, [2, 1], [[1, 2], [2]], None),  # row 1's second image slot is padding
    "right_padded_text": (2, 12, [1, 1], [[2], [1]], [0, 4]),
}


def parity_config(kv_heads: int = 2, cross_layers: tuple[int, ...] = (3,), layers: int = 5) -> MllamaConfig:
    """MllamaConfig.tiny() with the text decoder's GQA ratio and cross-attention layers chosen."""
    cfg = MllamaConfig.tiny()
    text = dataclasses.replace(
        cfg.text, num_key_value_heads=kv_heads, cross_attention_layers=cross_layers, num_hidden_layers=layers
    )
    return cfg.replace(text=text)


def hf_config(config: MllamaConfig) -> transformers.MllamaConfig:
    import transformers

    d = config.to_hf_dict()
    vision, text = dict(d["vision_config"]), dict(d["text_config"])
    vision["intermediate_layers_indices"] = [i - 1 for i in vision["intermediate_layers_indices"]]  # 5.x taps after
    rope = dict(text.pop("rope_scaling") or {"rope_type": "default"}, rope_theta=text.pop("rope_theta"))
    text["rope_parameters"] = rope
    for sub in (vision, text):
        sub.pop("model_type")
    return transformers.MllamaConfig(vision_config=vision, text_config=text, image_token_index=config.image_token_id)


def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 1.0) -> None:
    """Random non-trivial gates, norms and biases: zero-initialised gates would hide bugs in gated branches."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "gate" in leaf and p.numel() == 1:
                p.copy_(torch.empty_like(p).uniform_(-1.2, 1.2, generator=g))
            elif "norm" in name and leaf in ("weight", "bias"):
                base = 1.0 if leaf == "weight" else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            elif leaf == "bias":
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.mul_(scale)


def build_hf_model(config: MllamaConfig, seed: int = 0, scale: float = 1.0):
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.MllamaForConditionalGeneration(hf_config(config)).eval()
    perturb_(model, seed, scale)
    return model


def save_hf_checkpoint(model, config: MllamaConfig, path: str, **kwargs) -> str:
    """save_pretrained, then restore the 4.45 intermediate indices in config.json."""
    model.save_pretrained(path, **kwargs)
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        d = json.load(f)
    d["vision_config"]["intermediate_layers_indices"] = list(config.vision.intermediate_layers_indices)
    with open(cfg_path, "w") as f:
        json.dump(d, f, indent=2)
    return path


def random_inputs(
    config: MllamaConfig,
    rng: np.random.Generator,
    batch: int,
    seq: int,
    images_per_row,
    tiles_per_image,
    pad_right=None,
):
    """Inputs in transformers' layout. images_per_row[b]: images of row b; tiles_per_image[b][i]: their tiles.
    Rows are given an image token at a random position per image; pad_right[b] pads row b on the right."""
    v = config.vision
    max_images = max(max(images_per_row), 1)
    t_max = v.max_num_tiles
    ids = rng.integers(0, config.text.vocab_size - 256, size=(batch, seq))
    attention_mask = np.ones((batch, seq), np.int64)
    pixel_values = rng.standard_normal((batch, max_images, t_max, 3, v.image_size, v.image_size)).astype(np.float32)
    aspect_ratio_ids = np.zeros((batch, max_images), np.int64)
    aspect_ratio_mask = np.zeros((batch, max_images, t_max), np.int64)
    cross = np.zeros((batch, seq, max_images, t_max), np.int64)
    ratios = [tuple(r) for r in v.supported_aspect_ratios]
    for b in range(batch):
        positions = sorted(rng.choice(np.arange(1, seq // 2), size=images_per_row[b], replace=False))
        for i, pos in enumerate(positions):
            tiles = tiles_per_image[b][i]
            candidates = [k for k, (h, w) in enumerate(ratios) if h * w == tiles]
            aspect_ratio_ids[b, i] = candidates[rng.integers(len(candidates))] + 1
            aspect_ratio_mask[b, i, :tiles] = 1
            ids[b, pos] = config.image_token_id
            cross[b, pos:, i, :tiles] = 1  # each token from the image token onwards sees that image's real tiles
        if pad_right and pad_right[b]:
            attention_mask[b, seq - pad_right[b] :] = 0
            ids[b, seq - pad_right[b] :] = config.text.pad_token_id
            cross[b, seq - pad_right[b] :] = 0
    # zero the pixels of padded tiles, as the image processor does
    pixel_values *= aspect_ratio_mask[:, :, :, None, None, None]
    return dict(
        input_ids=ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        aspect_ratio_ids=aspect_ratio_ids,
        aspect_ratio_mask=aspect_ratio_mask,
        cross_attention_mask=cross,
    )


def hf_logits(model, inputs) -> np.ndarray:
    import torch

    with torch.no_grad():
        torch_inputs = {k: torch.as_tensor(v) for k, v in inputs.items() if v is not None}
        return model(**torch_inputs).logits.float().numpy()
