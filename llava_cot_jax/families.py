"""The model families this package runs, by the name `model.family` gives: what loading.py needs of each.

A family is its architecture config class (with presets, `from_hf_config`, JSON I/O), its model class, its HF
weight reading, and its processor. Everything above this file (loading.py, and through it train, infer, eval, the
demo and AOT) asks the registry rather than naming a family, so a second family plugs in by adding an entry here
(docs/design.md, "How to add a model family").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    config_class: type  # architecture config: .replace(**kw), .from_hf_config(dir), .from_json(text)
    model_class: type  # model_class(config, rngs=...)
    presets: Mapping[str, Callable[[], Any]]  # preset name -> architecture config
    from_hf: Callable[..., Any]  # (dir, dtype=, compute_dtype=, quantize=, scan_layers=) -> model
    load_hf_params: Callable[[str, Any], dict]  # (dir, config) -> {stacked param path: array}
    processor_class: type  # .from_pretrained(dir)
    # A processor for a random init without a tokenizer directory (small presets only): (config) -> processor.
    built_in_processor: Callable[[Any], Any] | None = None
    built_in_processor_presets: tuple[str, ...] = ()

    def preset(self, name: str):
        if name not in self.presets:
            raise ValueError(f"model.preset={name!r} is not a {self.name} preset; choose one of {sorted(self.presets)}")
        return self.presets[name]()


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
        config_class=MllamaConfig,
        model_class=MllamaForConditionalGeneration,
        presets={
            "tiny": MllamaConfig.tiny,
            "demo": MllamaConfig.demo,
            "bench": MllamaConfig.bench,
            "11b": MllamaConfig.llama_11b,
            "90b": MllamaConfig.llama_90b,
        },
        from_hf=params.from_hf,
        load_hf_params=params.load_hf_params,
        processor_class=MllamaProcessor,
        built_in_processor=tiny_processor,
        built_in_processor_presets=("tiny", "demo"),
    )


# name -> a function building the Family (imports happen only for the family asked for).
FAMILIES: dict[str, Callable[[], Family]] = {"mllama": _mllama}


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
