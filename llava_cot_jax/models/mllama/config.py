"""Mllama (Llama-3.2-Vision) configuration: frozen dataclasses, presets and HF config conversion.

Semantics follow Meta's reference as implemented by transformers 4.45 (the version LLaVA-CoT trained
with). In particular `intermediate_layers_indices` name the vision layers whose *input* is tapped
(4.45 collects hidden states before each local layer; transformers 5.x collects them after, so a 5.x
model needs the indices shifted by -1 to compute the same function).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

DEFAULT_ASPECT_RATIOS = ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1280
    num_hidden_layers: int = 32
    num_global_layers: int = 8
    attention_heads: int = 16
    intermediate_size: int = 5120
    vision_output_dim: int = 7680
    image_size: int = 560
    patch_size: int = 14
    num_channels: int = 3
    norm_eps: float = 1e-5
    max_num_tiles: int = 4
    intermediate_layers_indices: tuple[int, ...] = (3, 7, 15, 23, 30)
    supported_aspect_ratios: tuple[tuple[int, int], ...] = DEFAULT_ASPECT_RATIOS

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.attention_heads

    @property
    def num_patches(self) -> int:
        """Tokens per tile: the patch grid plus the class token (1601 for 560/14)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def padded_num_patches(self) -> int:
        """Tokens per tile after padding to a multiple of 8, as the reference encoder does (1608)."""
        return -(-self.num_patches // 8) * 8

    @property
    def max_aspect_ratio_id(self) -> int:
        return len(self.supported_aspect_ratios)

    def __post_init__(self):
        expected = self.hidden_size * (len(self.intermediate_layers_indices) + 1)
        if self.vision_output_dim != expected:
            raise ValueError(
                f"vision_output_dim={self.vision_output_dim} but hidden_size * (1 + len(intermediate_layers_indices))"
                f" = {expected}"
            )
        bad = [i for i in self.intermediate_layers_indices if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"intermediate_layers_indices {bad} outside [0, {self.num_hidden_layers})")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 128256
    hidden_size: int = 4096
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    intermediate_size: int = 14336
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # llama3 frequency scaling: (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings),
    # or None for plain RoPE.
    rope_llama3_scaling: tuple[float, float, float, int] | None = (8.0, 1.0, 4.0, 8192)
    max_position_embeddings: int = 131072
    cross_attention_layers: tuple[int, ...] = (3, 8, 13, 18, 23, 28, 33, 38)
    bos_token_id: int = 128000
    eos_token_id: tuple[int, ...] = (128001, 128008, 128009)
    pad_token_id: int = 128004
    # Mllama's embedding table has 8 rows beyond the vocabulary (its image token lives there); a plain Llama
    # decoder (LLaVA-1.5's) has none.
    extra_embedding_rows: int = 8

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def embedding_rows(self) -> int:
        return self.vocab_size + self.extra_embedding_rows

    @property
    def self_attention_layers(self) -> tuple[int, ...]:
        cross = set(self.cross_attention_layers)
        return tuple(i for i in range(self.num_hidden_layers) if i not in cross)

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        bad = [i for i in self.cross_attention_layers if not 0 <= i < self.num_hidden_layers]
        if bad or sorted(set(self.cross_attention_layers)) != list(self.cross_attention_layers):
            raise ValueError(
                f"cross_attention_layers must be sorted, unique and in [0, {self.num_hidden_layers}); "
                f"got {self.cross_attention_layers}"
            )


class ArchConfig:
    """What every family's architecture config (a frozen dataclass with `param_dtype` and `dtype`) offers."""

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **kwargs):
        return dataclasses.replace(self, **kwargs)


@dataclasses.dataclass(frozen=True)
class MllamaConfig(ArchConfig):
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    image_token_id: int = 128256
    param_dtype: str = "float32"  # storage dtype of the weights
    dtype: str = "float32"  # compute dtype of activations and matmuls
    # Activation checkpointing of each scanned layer: "none", "full" (save nothing) or "dots" (save matmul
    # outputs without batch dims, jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims).
    remat: str = "none"
    # True: the text decoder's layers run as lax.scan over stacked weights (compile time independent of depth;
    # what training wants). False: a Python loop over per-layer weights. Small-batch decoding wants False on
    # CPU: XLA copies a scanned layer's weight slice before each matmul, tripling the bytes read per token.
    scan_layers: bool = True
    # Queries per block of the text decoder's attention (layers.query_chunked_attention): the score matrices of
    # long training sequences exist one block at a time. 0: all queries at once.
    attention_chunk: int = 0

    # ---------------------------------------------------------------------------------------------- presets

    @classmethod
    def llama_11b(cls, **kwargs) -> MllamaConfig:
        """Llama-3.2-11B-Vision(-Instruct), the base of LLaVA-CoT."""
        return cls(**kwargs)

    @classmethod
    def llama_90b(cls, **kwargs) -> MllamaConfig:
        """Llama-3.2-90B-Vision(-Instruct): the same vision tower, a wider and deeper text stack."""
        text = TextConfig(
            hidden_size=8192,
            num_hidden_layers=100,
            num_attention_heads=64,
            num_key_value_heads=8,
            intermediate_size=28672,
            cross_attention_layers=tuple(range(3, 100, 5)),
        )
        return cls(text=text, **kwargs)

    @classmethod
    def bench(cls, **kwargs) -> MllamaConfig:
        """The shared ~163M-parameter CPU benchmark configuration (docs/design.md#the-bench-model)."""
        vision = VisionConfig(
            hidden_size=512,
            num_hidden_layers=8,
            num_global_layers=2,
            intermediate_layers_indices=(3, 7),
            attention_heads=8,
            intermediate_size=2048,
            image_size=224,
            patch_size=14,
            max_num_tiles=4,
            vision_output_dim=1536,
        )
        text = TextConfig(
            vocab_size=32000,
            hidden_size=768,
            num_hidden_layers=12,
            cross_attention_layers=(3, 8),
            num_attention_heads=12,
            num_key_value_heads=4,
            intermediate_size=2048,
            rope_theta=500000.0,
            bos_token_id=1,
            eos_token_id=(2,),
            pad_token_id=0,
        )
        return cls(vision=vision, text=text, image_token_id=32000, **kwargs)

    @classmethod
    def tiny(cls, vocab_size: int = 1024, **kwargs) -> MllamaConfig:
        """A few-MB model for tests and the CPU demo (image token id == vocab_size, as in the real models)."""
        vision = VisionConfig(
            hidden_size=32,
            num_hidden_layers=4,
            num_global_layers=2,
            intermediate_layers_indices=(1, 3),
            attention_heads=4,
            intermediate_size=64,
            image_size=28,
            patch_size=14,
            max_num_tiles=4,
            vision_output_dim=96,
        )
        text = TextConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            num_hidden_layers=5,
            cross_attention_layers=(3,),
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            bos_token_id=vocab_size - 256,
            eos_token_id=(vocab_size - 255, vocab_size - 248, vocab_size - 247),
            pad_token_id=vocab_size - 252,
        )
        return cls(vision=vision, text=text, image_token_id=vocab_size, **kwargs)

    @classmethod
    def demo(cls, vocab_size: int = 1024, image_size: int = 64, **kwargs) -> MllamaConfig:
        """The CPU demo's model (configs/demo.py), ~2M parameters: an image is one tile of `image_size` pixels cut
        into 8-px patches; a 128-wide text decoder of 3 self-attention and 2 cross-attention layers. Token ids
        follow the tiny tokenizer (`vocab_size` - 256 base tokens, then the Llama-3 specials)."""
        vision = VisionConfig(
            hidden_size=64,
            num_hidden_layers=3,
            num_global_layers=1,
            intermediate_layers_indices=(1, 2),
            attention_heads=4,
            intermediate_size=128,
            vision_output_dim=192,
            image_size=image_size,
            patch_size=8,
            max_num_tiles=1,
            supported_aspect_ratios=((1, 1),),
        )
        tiny = cls.tiny(vocab_size).text
        text = dataclasses.replace(
            tiny, hidden_size=128, num_hidden_layers=5, cross_attention_layers=(1, 3), intermediate_size=384
        )
        return cls(vision=vision, text=text, image_token_id=vocab_size, **kwargs)

    # ------------------------------------------------------------------------------------- HF conversion

    @classmethod
    def from_hf_config(cls, hf_config: Any, **kwargs) -> MllamaConfig:
        """Builds a config from a transformers `MllamaConfig`, its dict, or a path to `config.json`/its directory.

        Accepts both the 4.45 layout (`rope_theta` + `rope_scaling`) and the 5.x one (`rope_parameters`).
        """
        d = _as_dict(hf_config)
        model_type = d.get("model_type")
        if model_type != "mllama":
            raise ValueError(
                f"unsupported model_type {model_type!r}: only 'mllama' (Llama-3.2-Vision) checkpoints load"
            )
        v, t = d["vision_config"], d["text_config"]
        vision = VisionConfig(
            hidden_size=v["hidden_size"],
            num_hidden_layers=v["num_hidden_layers"],
            num_global_layers=v["num_global_layers"],
            attention_heads=v["attention_heads"],
            intermediate_size=v["intermediate_size"],
            vision_output_dim=v["vision_output_dim"],
            image_size=_scalar_size(v["image_size"]),
            patch_size=_scalar_size(v["patch_size"]),
            num_channels=v.get("num_channels", 3),
            norm_eps=v.get("norm_eps", 1e-5),
            max_num_tiles=v["max_num_tiles"],
            intermediate_layers_indices=tuple(v["intermediate_layers_indices"]),
            supported_aspect_ratios=tuple(tuple(r) for r in v["supported_aspect_ratios"]),
        )
        for act, want in ((v.get("hidden_act", "gelu"), "gelu"), (t.get("hidden_act", "silu"), "silu")):
            if act != want:
                raise ValueError(f"unsupported activation {act!r} (Mllama uses {want!r})")
        rope = t.get("rope_parameters") or dict(t.get("rope_scaling") or {}, rope_theta=t.get("rope_theta", 500000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "llama3":
            scaling = (
                float(rope["factor"]),
                float(rope["low_freq_factor"]),
                float(rope["high_freq_factor"]),
                int(rope["original_max_position_embeddings"]),
            )
        elif rope_type == "default":
            scaling = None
        else:
            raise ValueError(f"unsupported rope type {rope_type!r} (expected 'llama3' or 'default')")
        eos = t.get("eos_token_id", 128001)
        text = TextConfig(
            vocab_size=t["vocab_size"],
            hidden_size=t["hidden_size"],
            num_hidden_layers=t["num_hidden_layers"],
            num_attention_heads=t["num_attention_heads"],
            num_key_value_heads=t["num_key_value_heads"],
            intermediate_size=t["intermediate_size"],
            rms_norm_eps=t.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope.get("rope_theta", 500000.0)),
            rope_llama3_scaling=scaling,
            max_position_embeddings=t.get("max_position_embeddings", 131072),
            cross_attention_layers=tuple(t["cross_attention_layers"]),
            bos_token_id=t.get("bos_token_id", 128000),
            eos_token_id=tuple(eos) if isinstance(eos, list) else (eos,),
            pad_token_id=t.get("pad_token_id", 128004),
        )
        image_token_id = d.get("image_token_index", d.get("image_token_id", 128256))
        return cls(vision=vision, text=text, image_token_id=image_token_id, **kwargs)

    def to_hf_dict(self) -> dict:
        """The `config.json` contents of an HF checkpoint with this architecture (transformers 4.45 layout,
        which later versions also read)."""
        v, t = self.vision, self.text
        rope_scaling = None
        if t.rope_llama3_scaling is not None:
            factor, low, high, original = t.rope_llama3_scaling
            rope_scaling = {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": original,
            }
        eos = list(t.eos_token_id)
        return {
            "architectures": ["MllamaForConditionalGeneration"],
            "model_type": "mllama",
            "image_token_index": self.image_token_id,
            "torch_dtype": self.param_dtype,
            "vision_config": {
                "model_type": "mllama_vision_model",
                "hidden_size": v.hidden_size,
                "hidden_act": "gelu",
                "num_hidden_layers": v.num_hidden_layers,
                "num_global_layers": v.num_global_layers,
                "attention_heads": v.attention_heads,
                "num_channels": v.num_channels,
                "intermediate_size": v.intermediate_size,
                "vision_output_dim": v.vision_output_dim,
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "norm_eps": v.norm_eps,
                "max_num_tiles": v.max_num_tiles,
                "intermediate_layers_indices": list(v.intermediate_layers_indices),
                "supported_aspect_ratios": [list(r) for r in v.supported_aspect_ratios],
            },
            "text_config": {
                "model_type": "mllama_text_model",
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "hidden_act": "silu",
                "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads,
                "intermediate_size": t.intermediate_size,
                "rope_theta": t.rope_theta,
                "rope_scaling": rope_scaling,
                "rms_norm_eps": t.rms_norm_eps,
                "max_position_embeddings": t.max_position_embeddings,
                "cross_attention_layers": list(t.cross_attention_layers),
                "tie_word_embeddings": False,
                "bos_token_id": t.bos_token_id,
                "eos_token_id": eos[0] if len(eos) == 1 else eos,
                "pad_token_id": t.pad_token_id,
            },
        }

    # ---------------------------------------------------------------------------- our own serialisation

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> MllamaConfig:
        d = json.loads(text)
        vision = VisionConfig(**{k: _tuples(x) for k, x in d.pop("vision").items()})
        text_cfg = TextConfig(**{k: _tuples(x) for k, x in d.pop("text").items()})
        return cls(vision=vision, text=text_cfg, **d)


def _tuples(x):
    return tuple(_tuples(i) for i in x) if isinstance(x, list) else x


def _scalar_size(x) -> int:
    if isinstance(x, (list, tuple)):
        if len(set(x)) != 1:
            raise ValueError(f"non-square sizes are not supported: {x}")
        return int(x[0])
    return int(x)


def _as_dict(hf_config: Any) -> dict:
    if isinstance(hf_config, dict):
        return hf_config
    if isinstance(hf_config, (str, os.PathLike)):
        path = os.fspath(hf_config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            try:
                return json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON ({err}): restore the checkpoint's config.json") from None
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise TypeError(f"cannot read an HF config from {type(hf_config).__name__}")
