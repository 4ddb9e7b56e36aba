"""Reading the original LLaVA repository's checkpoints (haotian-liu/LLaVA), one way, into the llava family.

The original releases split the model in three: the language model with the projector (`liuhaotian/llava-v1.5-7b`:
LlavaLlamaForCausalLM, `model.*`, `lm_head`, `model.mm_projector.{0,2}.*`, torch `.bin` shards), the vision tower
left in its own CLIP checkpoint (`openai/clip-vit-large-patch14-336`, CLIPModel, `vision_model.*`), and after stage 1
the projector alone (`mm_projector.bin`). `read_original` assembles any of these into one llava model's parameters:

- `lm_dir`: the language model, with or without a trained projector (a Vicuna checkpoint before stage 1 has none);
- `clip_dir`: the CLIP checkpoint (needed unless `lm_dir` carries `model.vision_tower.vision_tower.*` weights);
- `projector`: an `mm_projector.bin` whose weights replace (or supply) the projector, or "random" for a fresh one
  (stage 1 starting from Vicuna and CLIP: normal(0, 0.02) weights, zero biases).

The original vocabulary has 32,000 tokens and the image marker is not one of them (LLaVA splices features at a
placeholder index). Here the config keeps the 32,000-way head of the original (`vocab_size=32000`, the model never
predicts the added tokens) and 64 extra embedding rows, zero, for llava-hf's `<image>` (32000) and `<pad>` (32001),
so llava-hf's tokenizer and our processor drive it unchanged.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator

import numpy as np

from llava_cot_jax.models.llava.config import ClipVisionConfig, LlavaConfig, llama2_text
from llava_cot_jax.models.llava.params import abstract_params, hf_table
from llava_cot_jax.models.mllama import layout
from llava_cot_jax.models.mllama.config import _as_dict
from llava_cot_jax.models.mllama.params import iter_hf_tensors, read_by_table, rename

LLAVA_HF_EXTRA_ROWS = 64  # llava-hf pads the 32,000-token table to 32,064 (<image>, <pad>, then padding)

_TO_HUB = (
    (re.compile(r"^model\.mm_projector\.0\."), "multi_modal_projector.linear_1."),
    (re.compile(r"^model\.mm_projector\.2\."), "multi_modal_projector.linear_2."),
    (re.compile(r"^model\.vision_tower\.vision_tower\.vision_model\."), "vision_tower.vision_model."),
    (re.compile(r"^vision_model\."), "vision_tower.vision_model."),
    # a CLIPVisionModel saved by transformers 5.x has no `vision_model.` level
    (re.compile(r"^(?=(embeddings|encoder|pre_layrnorm|post_layernorm)\.)"), "vision_tower.vision_model."),
    (re.compile(r"^model\."), "language_model.model."),
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
)
# CLIP's text half and contrastive heads, the rotary and position-id buffers of older checkpoints: not weights of
# a LLaVA model.
_NOT_LLAVA = re.compile(
    r"^(text_model\.|visual_projection|text_projection|logit_scale)|(rotary_emb\.inv_freq|position_ids)$"
)


def hub_name(name: str) -> str:
    """An original checkpoint's tensor name -> the llava-hf Hub name."""
    return rename(name, _TO_HUB)


def config_from_original(lm_dir: str, clip_dir: str | None = None, **kwargs) -> LlavaConfig:
    """The llava config of an original checkpoint: the decoder from `lm_dir/config.json` (llava_llama or llama),
    the tower from `clip_dir/config.json` (CLIPModel or CLIPVisionModel), the feature layer from
    `mm_vision_select_layer`."""
    lm = _as_dict(lm_dir)
    if lm.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ValueError(f"{lm_dir}: mm_projector_type {lm['mm_projector_type']!r}; LLaVA-1.5's is 'mlp2x_gelu'")
    vision = ClipVisionConfig()
    if clip_dir:
        clip = _as_dict(clip_dir)
        v = clip.get("vision_config", clip)
        vision = ClipVisionConfig(
            hidden_size=v.get("hidden_size", 1024),
            num_hidden_layers=v.get("num_hidden_layers", 24),
            attention_heads=v.get("num_attention_heads", 16),
            intermediate_size=v.get("intermediate_size", 4096),
            image_size=v.get("image_size", 336),
            patch_size=v.get("patch_size", 14),
            norm_eps=v.get("layer_norm_eps", 1e-5),
        )
    heads = lm.get("num_attention_heads", 32)
    vocab = lm.get("vocab_size", 32000)
    text = llama2_text(
        vocab_size=vocab,
        hidden_size=lm.get("hidden_size", 4096),
        num_hidden_layers=lm.get("num_hidden_layers", 32),
        num_attention_heads=heads,
        num_key_value_heads=lm.get("num_key_value_heads") or heads,
        intermediate_size=lm.get("intermediate_size", 11008),
        rms_norm_eps=lm.get("rms_norm_eps", 1e-5),
        rope_theta=float(lm.get("rope_theta", 10000.0)),
        max_position_embeddings=lm.get("max_position_embeddings", 4096),
        pad_token_id=vocab + 1,
        extra_embedding_rows=LLAVA_HF_EXTRA_ROWS,
    )
    return LlavaConfig(
        vision=vision,
        text=text,
        image_token_id=vocab,
        vision_feature_layer=lm.get("mm_vision_select_layer", -2),
        **kwargs,
    )


def iter_checkpoint_tensors(path: str) -> Iterator[tuple[str, str, np.ndarray]]:
    """(file, name, array) of a checkpoint directory in safetensors or torch `.bin` shards, or of one `.bin` file
    (`mm_projector.bin`). `.bin` files are torch pickles: read with torch, weights only."""
    if os.path.isdir(path) and any(f.endswith(".safetensors") for f in os.listdir(path)):
        yield from iter_hf_tensors(path)
        return
    import torch  # pylint: disable=g-import-not-at-top  (only the .bin route needs it)

    if os.path.isdir(path):
        index = os.path.join(path, "pytorch_model.bin.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".bin"))
        if not files:
            raise layout.CheckpointError(f"no *.safetensors or *.bin weights in {path}")
        files = [os.path.join(path, f) for f in files]
    else:
        files = [path]
    for file in files:
        state = torch.load(file, map_location="cpu", weights_only=True)
        for name, tensor in state.items():
            yield file, name, tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()


def read_original(
    lm_dir: str, clip_dir: str | None = None, projector: str | None = None, dtype: str = "float32"
) -> tuple[LlavaConfig, dict[tuple[str, ...], np.ndarray]]:
    """(config, parameters in our stacked layout) assembled from the original checkpoints (module docstring).
    Every missing, unexpected or misshapen tensor is reported at once."""
    config = config_from_original(lm_dir, clip_dir, param_dtype=dtype, dtype=dtype)
    rows = config.text.embedding_rows

    def tensors():
        sources = [lm_dir] + [p for p in (clip_dir, projector) if p and p != "random"]
        for source in sources:
            for file, name, array in iter_checkpoint_tensors(source):
                if source is lm_dir and projector and "mm_projector" in name:
                    continue  # replaced by the projector file (or a fresh one)
                if name.endswith("embed_tokens.weight") and array.shape[0] < rows:
                    array = np.concatenate([array, np.zeros((rows - array.shape[0], array.shape[1]), array.dtype)])
                yield file, name, array
        if projector == "random":
            rng, d_vision, d_text = np.random.default_rng(0), config.vision.hidden_size, config.text.hidden_size
            for index, (d_in, d_out) in ((0, (d_vision, d_text)), (2, (d_text, d_text))):
                name = f"model.mm_projector.{index}"
                yield "random", f"{name}.weight", (0.02 * rng.standard_normal((d_out, d_in))).astype(np.float32)
                yield "random", f"{name}.bias", np.zeros(d_out, np.float32)

    where = " + ".join(p for p in (lm_dir, clip_dir, projector) if p)
    params = read_by_table(
        tensors(),
        where,
        hf_table(config),
        abstract_params(config),
        np.dtype(dtype),
        hub_name,
        ignored=lambda name: bool(_NOT_LLAVA.search(name)),
    )
    return config, params
