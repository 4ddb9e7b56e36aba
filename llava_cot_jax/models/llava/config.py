"""LLaVA-1.5 configuration: a CLIP vision tower, a two-layer MLP projector and a Llama-2 decoder.

The decoder is Mllama's text model without cross-attention layers (`mllama.config.TextConfig` with
`cross_attention_layers=()`, plain RoPE and no extra embedding rows), so both families run the same decoder code.
Facts from Liu et al. 2023 ("Improved Baselines with Visual Instruction Tuning", arXiv 2310.03744) and the llava-hf
checkpoints: CLIP ViT-L/14 at 336 px, features of the second-to-last layer without the class token (576 per image),
Vicuna-7B/13B v1.5.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from llava_cot_jax.models.mllama.config import ArchConfig, TextConfig, _as_dict, _scalar_size, _tuples


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig:
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    attention_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def layers_run(self, feature_layer: int) -> int:
        """How many encoder layers produce hidden state `feature_layer` (transformers' hidden_states index:
        0 is the embeddings, -1 the last layer's output)."""
        n = feature_layer if feature_layer >= 0 else self.num_hidden_layers + 1 + feature_layer
        if not 0 <= n <= self.num_hidden_layers:
            raise ValueError(f"vision_feature_layer={feature_layer} is outside a {self.num_hidden_layers}-layer tower")
        return n


def llama2_text(**kwargs) -> TextConfig:
    """A Llama-2 decoder (Vicuna v1.5) in Mllama's TextConfig: multi-head attention, RoPE theta 10,000 unscaled."""
    defaults = dict(
        vocab_size=32064,
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_llama3_scaling=None,
        max_position_embeddings=4096,
        cross_attention_layers=(),
        bos_token_id=1,
        eos_token_id=(2,),
        pad_token_id=32001,
        extra_embedding_rows=0,
    )
    return TextConfig(**{**defaults, **kwargs})


@dataclasses.dataclass(frozen=True)
class LlavaConfig(ArchConfig):
    vision: ClipVisionConfig = ClipVisionConfig()
    text: TextConfig = dataclasses.field(default_factory=llama2_text)
    image_token_id: int = 32000
    vision_feature_layer: int = -2
    # "default" drops the class token (576 features per 336-px image); "full" keeps it.
    vision_feature_select_strategy: str = "default"
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"  # as MllamaConfig.remat
    scan_layers: bool = True  # as MllamaConfig.scan_layers
    attention_chunk: int = 0  # as MllamaConfig.attention_chunk

    def __post_init__(self):
        if self.text.cross_attention_layers:
            raise ValueError("a LLaVA decoder has no cross-attention layers")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                f"vision_feature_select_strategy must be 'default' or 'full', not "
                f"{self.vision_feature_select_strategy!r}"
            )
        self.vision.layers_run(self.vision_feature_layer)

    @property
    def image_tokens(self) -> int:
        """Image tokens per image in the prompt (576 for CLIP-L/14 at 336 px)."""
        return self.vision.num_patches + (self.vision_feature_select_strategy == "full")

    # ---------------------------------------------------------------------------------------------- presets

    @classmethod
    def llava15_7b(cls, **kwargs) -> LlavaConfig:
        """llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 + Vicuna-7B v1.5."""
        return cls(**kwargs)

    @classmethod
    def llava15_13b(cls, **kwargs) -> LlavaConfig:
        """llava-hf/llava-1.5-13b-hf: the same tower, Vicuna-13B v1.5."""
        text = llama2_text(
            hidden_size=5120,
            num_hidden_layers=40,
            num_attention_heads=40,
            num_key_value_heads=40,
            intermediate_size=13824,
        )
        return cls(text=text, **kwargs)

    @classmethod
    def bench(cls, **kwargs) -> LlavaConfig:
        """A ~160M-parameter CPU benchmark model of the LLaVA-1.5 shape (256 image tokens of a 224-px image)."""
        vision = ClipVisionConfig(
            hidden_size=512, num_hidden_layers=8, attention_heads=8, intermediate_size=2048, image_size=224
        )
        text = llama2_text(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            num_key_value_heads=12,
            intermediate_size=2048,
        )
        return cls(vision=vision, text=text, **kwargs)

    @classmethod
    def tiny(cls, vocab_size: int = 1024, **kwargs) -> LlavaConfig:
        """A few-MB model for tests: 4 image tokens per 28-px image; ids as `build_tiny_vicuna_tokenizer`'s
        (`<image>` vocab_size - 2, `<pad>` vocab_size - 1, as llava-hf appends them)."""
        vision = ClipVisionConfig(
            hidden_size=32, num_hidden_layers=3, attention_heads=4, intermediate_size=64, image_size=28
        )
        text = llama2_text(
            vocab_size=vocab_size,
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=128,
            pad_token_id=vocab_size - 1,
            max_position_embeddings=2048,
        )
        return cls(vision=vision, text=text, image_token_id=vocab_size - 2, **kwargs)

    @classmethod
    def demo(cls, vocab_size: int = 1024, image_size: int = 64, **kwargs) -> LlavaConfig:
        """The CPU demo's model (configs/demo.py with model.family=llava), 1.26M parameters, sized as
        `MllamaConfig.demo`: 8-px patches of an `image_size`-px image (64 image tokens at 64 px) through a 64-wide
        CLIP tower (features of its second-to-last layer, as LLaVA-1.5's), and a 128-wide decoder of 4 layers; ids
        as `build_tiny_vicuna_tokenizer(vocab_size)`'s."""
        vision = ClipVisionConfig(
            hidden_size=64,
            num_hidden_layers=3,
            attention_heads=4,
            intermediate_size=128,
            image_size=image_size,
            patch_size=8,
        )
        tiny = cls.tiny(vocab_size).text
        text = dataclasses.replace(tiny, hidden_size=128, num_hidden_layers=4, intermediate_size=384)
        return cls(vision=vision, text=text, image_token_id=vocab_size - 2, **kwargs)

    # ------------------------------------------------------------------------------------- HF conversion

    @classmethod
    def from_hf_config(cls, hf_config: Any, **kwargs) -> LlavaConfig:
        """From a transformers `LlavaConfig`, its dict, or a path to `config.json`/its directory."""
        d = _as_dict(hf_config)
        if d.get("model_type") != "llava":
            raise ValueError(
                f"unsupported model_type {d.get('model_type')!r}: the llava family reads 'llava' (llava-hf) checkpoints"
            )
        v, t = d["vision_config"], d["text_config"]
        if v.get("hidden_act", "quick_gelu") != "quick_gelu":
            raise ValueError(f"unsupported vision activation {v['hidden_act']!r} (CLIP uses 'quick_gelu')")
        if d.get("projector_hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported projector activation {d['projector_hidden_act']!r} (LLaVA-1.5: 'gelu')")
        if not isinstance(d.get("vision_feature_layer", -2), int):
            raise ValueError("a list of vision_feature_layer values is not supported (LLaVA-1.5 uses one layer)")
        rope = t.get("rope_parameters") or dict(t.get("rope_scaling") or {}, rope_theta=t.get("rope_theta", 10000.0))
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"unsupported rope scaling {rope} (LLaVA-1.5's Llama-2 uses plain RoPE)")
        heads = t.get("num_attention_heads", 32)
        eos = t.get("eos_token_id", 2)
        vision = ClipVisionConfig(
            hidden_size=v.get("hidden_size", 1024),
            num_hidden_layers=v.get("num_hidden_layers", 24),
            attention_heads=v.get("num_attention_heads", 16),
            intermediate_size=v.get("intermediate_size", 4096),
            image_size=_scalar_size(v.get("image_size", 336)),
            patch_size=_scalar_size(v.get("patch_size", 14)),
            num_channels=v.get("num_channels", 3),
            norm_eps=v.get("layer_norm_eps", 1e-5),
        )
        text = llama2_text(
            vocab_size=t.get("vocab_size", 32064),
            hidden_size=t.get("hidden_size", 4096),
            num_hidden_layers=t.get("num_hidden_layers", 32),
            num_attention_heads=heads,
            num_key_value_heads=t.get("num_key_value_heads") or heads,
            intermediate_size=t.get("intermediate_size", 11008),
            rms_norm_eps=t.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            max_position_embeddings=t.get("max_position_embeddings", 4096),
            bos_token_id=t.get("bos_token_id", 1),
            eos_token_id=tuple(eos) if isinstance(eos, list) else (eos,),
            pad_token_id=t.get("pad_token_id", d.get("pad_token_id", 32001)),
        )
        return cls(
            vision=vision,
            text=text,
            image_token_id=d.get("image_token_index", d.get("image_token_id", 32000)),
            vision_feature_layer=d.get("vision_feature_layer", -2),
            vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
            **kwargs,
        )

    def to_hf_dict(self) -> dict:
        """The `config.json` of an llava-hf checkpoint with this architecture."""
        v, t = self.vision, self.text
        eos = list(t.eos_token_id)
        return {
            "architectures": ["LlavaForConditionalGeneration"],
            "model_type": "llava",
            "image_token_index": self.image_token_id,
            # transformers 4.45 expands an <image> itself (its legacy path) when a row holds fewer image tokens
            # than this; the default, 576, is right only for 336-px towers.
            "image_seq_length": self.image_tokens,
            "projector_hidden_act": "gelu",
            "vision_feature_layer": self.vision_feature_layer,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "pad_token_id": t.pad_token_id,
            "torch_dtype": self.param_dtype,
            "vision_config": {
                "model_type": "clip_vision_model",
                "hidden_size": v.hidden_size,
                "num_hidden_layers": v.num_hidden_layers,
                "num_attention_heads": v.attention_heads,
                "intermediate_size": v.intermediate_size,
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "num_channels": v.num_channels,
                "layer_norm_eps": v.norm_eps,
                "hidden_act": "quick_gelu",
            },
            "text_config": {
                "model_type": "llama",
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads,
                "intermediate_size": t.intermediate_size,
                "hidden_act": "silu",
                "rms_norm_eps": t.rms_norm_eps,
                "rope_theta": t.rope_theta,
                "max_position_embeddings": t.max_position_embeddings,
                "tie_word_embeddings": False,
                "bos_token_id": t.bos_token_id,
                "eos_token_id": eos[0] if len(eos) == 1 else eos,
                "pad_token_id": t.pad_token_id,
            },
        }

    # ---------------------------------------------------------------------------- our own serialisation

    def to_json(self) -> str:
        return json.dumps({"family": "llava", **dataclasses.asdict(self)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> LlavaConfig:
        d = json.loads(text)
        d.pop("family", None)
        vision = ClipVisionConfig(**d.pop("vision"))
        text_cfg = TextConfig(**{k: _tuples(x) for k, x in d.pop("text").items()})
        return cls(vision=vision, text=text_cfg, **d)
