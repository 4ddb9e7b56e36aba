"""LoRA adapters in peft's format: `adapter_config.json` + `adapter_model.safetensors`, one `lora_A.weight`
[rank, in] and `lora_B.weight` [out, rank] per adapted transformers module, keyed
`base_model.model.<module>.lora_{A,B}.weight`. Module names come from the one HF name table (params.hf_table), in
transformers' current scheme (`model.language_model.layers.N...`, what `PeftModel.from_pretrained` finds on a
model built by transformers >= 4.52) or the Hub's (`language_model.model.layers.N...`, transformers 4.45).
"""

from __future__ import annotations

import json
import os

import numpy as np

from llava_cot_jax.models.mllama import lora, params
from llava_cot_jax.models.mllama.config import MllamaConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
NAMINGS = ("transformers", "hub")


def module_names(config: MllamaConfig, path: tuple[str, ...], naming: str = "transformers") -> list[str]:
    """The transformers module of each layer of the (stacked) weight at `path`, in layer order."""
    if naming not in NAMINGS:
        raise ValueError(f"naming={naming!r}: expected one of {NAMINGS}")
    found = sorted(
        (entry.index or 0, name.removesuffix(".weight"))
        for name, entry in params.hf_table(config).items()
        if entry.path == tuple(path)
    )
    if not found:
        raise ValueError(f"no HF tensor lives at {'.'.join(path)}")
    return [params.new_name(n) if naming == "transformers" else n for _, n in found]


def peft_tensors(config: MllamaConfig, adapters: dict, naming: str = "transformers") -> dict[str, np.ndarray]:
    """Our nested adapter dict -> peft's state dict (float32 numpy)."""
    out = {}
    for path, ab in lora.flatten(adapters).items():
        a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
        names = module_names(config, path, naming)
        stacked = _stacked(config, path)
        for i, name in enumerate(names):
            lora_a, lora_b = lora.to_peft(a[i] if stacked else a, b[i] if stacked else b)
            out[f"{PREFIX}{name}.lora_A.weight"] = lora_a
            out[f"{PREFIX}{name}.lora_B.weight"] = lora_b
    return out


def _stacked(config: MllamaConfig, path) -> bool:
    return any(e.index is not None for e in params.hf_table(config).values() if e.path == tuple(path))


def from_peft_tensors(config: MllamaConfig, tensors: dict, specs: dict) -> dict:
    """peft's state dict -> our nested adapter dict of the shapes in `specs` (lora.adapter_specs); either naming."""
    by_name = {params.hub_name(k.removeprefix(PREFIX)): v for k, v in tensors.items()}
    flat = {}
    for path, ab in specs.items():
        a_shape, b_shape = ab["a"][0], ab["b"][0]
        names = module_names(config, path, "hub")
        stacked = _stacked(config, path)
        a = np.zeros(a_shape, np.float32)
        b = np.zeros(b_shape, np.float32)
        for i, name in enumerate(names):
            try:
                lora_a, lora_b = by_name[f"{name}.lora_A.weight"], by_name[f"{name}.lora_B.weight"]
            except KeyError as e:
                raise ValueError(f"adapter weights lack {e.args[0]} (the adapter config targets it)") from None
            layer_a, layer_b = lora.from_peft(
                lora_a, lora_b, a_shape[1:] if stacked else a_shape, b_shape[1:] if stacked else b_shape
            )
            if stacked:
                a[i], b[i] = layer_a, layer_b
            else:
                a[...], b[...] = layer_a, layer_b
        flat[path] = {"a": a, "b": b}
    return lora._nested(flat)


def target_regex(config: MllamaConfig, paths, naming: str = "transformers") -> str:
    """peft's `target_modules` as one regex that matches exactly the adapted modules (the vision tower has
    q_proj too, so plain suffixes would adapt more than was trained)."""
    names = sorted({n for path in paths for n in module_names(config, path, naming)})
    return "|".join(n.replace(".", r"\.") for n in names)


def write(
    directory: str,
    config: MllamaConfig,
    adapters: dict,
    lora_config: lora.LoraConfig,
    paths,
    naming: str = "transformers",
    base_model: str = "",
) -> str:
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    save_file(peft_tensors(config, adapters, naming), os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model or None,
        "r": lora_config.rank,
        "lora_alpha": lora_config.alpha,
        "lora_dropout": lora_config.dropout,
        "target_modules": target_regex(config, paths, naming),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(adapter_config, f, indent=2)
    return directory


def read(directory: str, config: MllamaConfig, abstract_state) -> tuple[dict, lora.LoraConfig]:
    """(nested adapters, their LoraConfig) of a peft adapter directory, for a model of `config`."""
    from safetensors.numpy import load_file

    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{directory} is not a peft adapter directory: no {CONFIG_NAME}")
    with open(config_path) as f:
        adapter_config = json.load(f)
    if adapter_config.get("peft_type") != "LORA" or adapter_config.get("use_rslora"):
        raise ValueError(f"{config_path}: only plain LoRA adapters are supported")
    tensors = load_file(os.path.join(directory, WEIGHTS_NAME))
    modules = {params.hub_name(k.removeprefix(PREFIX)).rsplit(".lora_", 1)[0] for k in tensors}
    paths = sorted({params.hf_table(config)[f"{m}.weight"].path for m in modules})
    rank = int(adapter_config["r"])
    lora_config = lora.LoraConfig(rank, float(adapter_config["lora_alpha"]))
    specs = lora.adapter_specs(abstract_state, paths, rank)
    return from_peft_tensors(config, tensors, specs), lora_config
