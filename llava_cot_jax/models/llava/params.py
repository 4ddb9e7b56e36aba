"""The one table between llava-hf tensor names and this model's parameters, used in both directions.

Names follow the Hub's llava-hf checkpoints (transformers 4.45 layout: `vision_tower.vision_model.*`,
`multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head.*`); transformers >= 4.52 saves
`model.vision_tower.*` (without the `vision_model` level), `model.multi_modal_projector.*`, `model.language_model.*`
and a top-level `lm_head`, and `hub_name` maps those back. Reading and writing are Mllama's (`read_by_table`,
`tensors_by_table`) with this table.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterator

import numpy as np

from llava_cot_jax.models.llava.config import LlavaConfig
from llava_cot_jax.models.llava.model import LlavaForConditionalGeneration
from llava_cot_jax.models.mllama import layout
from llava_cot_jax.models.mllama.params import (
    CONV,
    HEADS_IN,
    HEADS_OUT,
    LINEAR,
    SAME,
    Entry,
    Layout,
    add_decoder_layer,
    iter_hf_tensors,
    read_by_table,
    rename,
    tensors_by_table,
)
from llava_cot_jax.models.mllama.params import abstract_params as _abstract_params

# q/k/v biases [heads * head_dim] <-> [heads, head_dim]
HEADS_BIAS = Layout("heads_bias", lambda a, shape: a.reshape(shape), lambda a: a.reshape(-1))


@functools.lru_cache(maxsize=8)
def hf_table(config: LlavaConfig) -> dict[str, Entry]:
    """Every tensor of an llava-hf checkpoint (Hub names) -> where it lives in this model."""
    v, t = config.vision, config.text
    conv = dataclasses.replace(
        CONV, to_hf=lambda a: a.T.reshape(v.hidden_size, v.num_channels, v.patch_size, v.patch_size)
    )
    table: dict[str, Entry] = {}

    def add(hf_name, path, layout=SAME, index=None):
        table[hf_name] = Entry(tuple(path), index, layout)

    hf, vt = "vision_tower.vision_model", "vision_tower"
    add(f"{hf}.embeddings.patch_embedding.weight", (vt, "patch_embedding"), conv)
    add(f"{hf}.embeddings.class_embedding", (vt, "class_embedding"))
    add(f"{hf}.embeddings.position_embedding.weight", (vt, "position_embedding"))
    for norm in ("pre_layrnorm", "post_layernorm"):
        add(f"{hf}.{norm}.weight", (vt, norm, "scale"))
        add(f"{hf}.{norm}.bias", (vt, norm, "bias"))
    for i in range(v.num_hidden_layers):
        layer, ours = f"{hf}.encoder.layers.{i}", (vt, "layers")
        for proj in ("q", "k", "v"):
            add(f"{layer}.self_attn.{proj}_proj.weight", (*ours, f"{proj}_proj"), HEADS_OUT, i)
            add(f"{layer}.self_attn.{proj}_proj.bias", (*ours, f"{proj}_bias"), HEADS_BIAS, i)
        add(f"{layer}.self_attn.out_proj.weight", (*ours, "o_proj"), HEADS_IN, i)
        add(f"{layer}.self_attn.out_proj.bias", (*ours, "o_bias"), SAME, i)
        for fc in ("fc1", "fc2"):
            add(f"{layer}.mlp.{fc}.weight", (*ours, fc), LINEAR, i)
            add(f"{layer}.mlp.{fc}.bias", (*ours, f"{fc}_bias"), SAME, i)
        for norm in ("layer_norm1", "layer_norm2"):
            add(f"{layer}.{norm}.weight", (*ours, norm, "scale"), SAME, i)
            add(f"{layer}.{norm}.bias", (*ours, norm, "bias"), SAME, i)

    for linear in ("linear_1", "linear_2"):
        add(f"multi_modal_projector.{linear}.weight", ("multi_modal_projector", linear), LINEAR)
        add(f"multi_modal_projector.{linear}.bias", ("multi_modal_projector", f"{linear}_bias"))

    lm = "language_model"
    add(f"{lm}.model.embed_tokens.weight", (lm, "embed_tokens"))
    add(f"{lm}.model.norm.weight", (lm, "norm", "scale"))
    add(f"{lm}.lm_head.weight", (lm, "lm_head"), LINEAR)
    for i in range(t.num_hidden_layers):
        layer, ours = f"{lm}.model.layers.{i}", (lm, "self_layers")
        add_decoder_layer(add, layer, ours, i)
    return table


# transformers 5.x holds the CLIP transformer itself as `vision_tower` (no `vision_model` level) and saves it so.
_NEW_TO_HUB = (
    (re.compile(r"^model\.language_model\."), "language_model.model."),
    (re.compile(r"^(model\.)?vision_tower\.(vision_model\.)?"), "vision_tower.vision_model."),
    (re.compile(r"^model\.multi_modal_projector\."), "multi_modal_projector."),
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
)


def hub_name(name: str) -> str:
    """Maps either naming scheme to the Hub's."""
    return rename(name, _NEW_TO_HUB)


def _ignored(name: str) -> bool:
    # Older CLIP checkpoints store the position-id buffer; it is arange(num_positions), not a weight.
    return name.endswith("embeddings.position_ids")


def abstract_params(config: LlavaConfig) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every parameter, by path, without allocating anything."""
    return _abstract_params(config, LlavaForConditionalGeneration)


def load_hf_params(hf_dir: str, config: LlavaConfig, dtype=None, progress=None) -> dict[tuple[str, ...], np.ndarray]:
    """Reads an llava-hf checkpoint into {parameter path: numpy array} in our layout (every problem reported)."""
    target_dtype = np.dtype(dtype or config.param_dtype)
    table, shapes = hf_table(config), abstract_params(config)
    return read_by_table(iter_hf_tensors(hf_dir), hf_dir, table, shapes, target_dtype, hub_name, progress, _ignored)


def hf_tensors(
    params: dict[tuple[str, ...], np.ndarray], config: LlavaConfig, names=None
) -> Iterator[tuple[str, np.ndarray]]:
    """Our parameters -> (Hub name, HF-layout array), for `names` (default: the whole table, in order)."""
    return tensors_by_table(params, hf_table(config), names)


def from_hf(
    path: str, dtype: str = "float32", compute_dtype: str | None = None, quantize: str | None = None, **config_overrides
):
    """Loads an llava-hf checkpoint directory (config.json + safetensors shards, Hub or new key names)."""
    config = LlavaConfig.from_hf_config(path, param_dtype=dtype, dtype=compute_dtype or dtype, **config_overrides)
    return layout.model_from_params(config, load_hf_params(path, config), quantize, LlavaForConditionalGeneration)
