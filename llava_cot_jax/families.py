"""The model families this package runs, by the name `model.family` gives: what loading.py needs of each.

A family is its architecture config class (with presets, `from_hf_config`, JSON I/O), its model class, its HF
weights module, and its processor. Everything above this file (loading.py, and through it train, infer, eval, the
demo and AOT) asks the registry rather than naming a family, so a second family plugs in by adding an entry here
(docs/design.md, "How to add a model family").
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    hf_model_type: str  # `model_type` in an HF config.json of this family
    config_class: type  # architecture config: .replace(**kw), .from_hf_config(dir), .from_json(text)
    model_class: type  # model_class(config, rngs=...)
    presets: Mapping[str, Callable[[], Any]]  # preset name -> architecture config
    tiny_preset: str  # the preset of smoke runs and tests (`runlocal`)
    # The HF weights table and its readers/writers: hf_table(config), abstract_params(config),
    # load_hf_params(dir, config, dtype=, progress=), hf_tensors(params, config, names),
    # from_hf(dir, dtype=, compute_dtype=, quantize=, scan_layers=).
    weights: ModuleType
    processor_class: type  # .from_pretrained(dir)
    # A processor for a random init without a tokenizer directory (small presets only): (config) -> processor.
    built_in_processor: Callable[[Any], Any] | None = None
    built_in_processor_presets: tuple[str, ...] = ()

    def preset(self, name: str, **kwargs):
        """The architecture of preset `name`; `kwargs` go to the preset (e.g. the demo's `image_size`)."""
        if name not in self.presets:
            raise ValueError(f"model.preset={name!r} is not a {self.name} preset; choose one of {sorted(self.presets)}")
        return self.presets[name](**kwargs)


def _mllama() -> Family:
    from llava_cot_jax.data.image import MllamaImageProcessor
    from llava_cot_jax.data.processor import MllamaProcessor
    from llava_cot_jax.data.tokenizer import build_tiny_tokenizer
    from llava_cot_jax.models.mllama import params
    from llava_cot_jax.models.mllama.config import MllamaConfig
    from llava_cot_jax.models.mllama.model import MllamaForConditionalGeneration

    def tiny_processor(config: MllamaConfig):
        v = config.vision
        image = MllamaImageProcessor(size=v.image_size, max_image_tiles=v.max_num_tiles)
        return MllamaProcessor(image, build_tiny_tokenizer(num_base_tokens=config.text.vocab_size - 256))

    return Family(
        name="mllama",
        hf_model_type="mllama",
        config_class=MllamaConfig,
        model_class=MllamaForConditionalGeneration,
        presets={
            "tiny": MllamaConfig.tiny,
            "demo": MllamaConfig.demo,
            "bench": MllamaConfig.bench,
            "11b": MllamaConfig.llama_11b,
            "90b": MllamaConfig.llama_90b,
        },
        tiny_preset="tiny",
        weights=params,
        processor_class=MllamaProcessor,
        built_in_processor=tiny_processor,
        built_in_processor_presets=("tiny", "demo"),
    )


def _llava() -> Family:
    from llava_cot_jax.data.llava_image import LlavaImageProcessor
    from llava_cot_jax.data.llava_processor import LlavaProcessor
    from llava_cot_jax.data.tokenizer import build_tiny_vicuna_tokenizer
    from llava_cot_jax.models.llava import params
    from llava_cot_jax.models.llava.config import LlavaConfig
    from llava_cot_jax.models.llava.model import LlavaForConditionalGeneration

    return Family(
        name="llava",
        hf_model_type="llava",
        config_class=LlavaConfig,
        model_class=LlavaForConditionalGeneration,
        presets={
            "llava15_tiny": LlavaConfig.tiny,
            "demo": LlavaConfig.demo,
            "llava15_bench": LlavaConfig.bench,
            "llava15_7b": LlavaConfig.llava15_7b,
            "llava15_13b": LlavaConfig.llava15_13b,
        },
        tiny_preset="llava15_tiny",
        weights=params,
        processor_class=LlavaProcessor,
        built_in_processor=lambda config: LlavaProcessor(
            LlavaImageProcessor(size=config.vision.image_size, patch_size=config.vision.patch_size),
            build_tiny_vicuna_tokenizer(config.text.vocab_size),
        ),
        built_in_processor_presets=("llava15_tiny", "demo"),
    )


# name -> a function building the Family (imports happen only for the family asked for).
FAMILIES: dict[str, Callable[[], Family]] = {"mllama": _mllama, "llava": _llava}


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"model.family={name!r} is not one of {sorted(FAMILIES)}")
    return FAMILIES[name]()


def of(arch) -> Family:
    """The family whose architecture config `arch` is."""
    for build in FAMILIES.values():
        fam = build()
        if isinstance(arch, fam.config_class):
            return fam
    raise TypeError(f"{type(arch).__name__} is no registered family's architecture config")


def of_hf_dir(hf_dir: str) -> Family:
    """The family whose checkpoints carry the `model_type` of `hf_dir/config.json`."""
    from llava_cot_jax.models.mllama.config import _as_dict

    model_type = _as_dict(hf_dir).get("model_type")
    for build in FAMILIES.values():
        fam = build()
        if fam.hf_model_type == model_type:
            return fam
    known = sorted(build().hf_model_type for build in FAMILIES.values())
    raise ValueError(f"{hf_dir}: model_type {model_type!r} is not one this package reads ({', '.join(known)})")


def config_from_json(text: str):
    """An architecture config from our own JSON (`config.to_json()`); JSON without a "family" key is Mllama's,
    as every checkpoint written before the llava family was."""
    return get(json.loads(text).get("family", "mllama")).config_class.from_json(text)
