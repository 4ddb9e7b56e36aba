"""The groups every mode's config shares, defined once: `model` (what to load and how), `mesh` (the device mesh) and
the top-level `mode`, `seed` and `compilation_cache`. A key means the same thing in every mode; each mode's
defaults (`train/config.py`, `generate/config.py`, `eval/config.py`) build on these and configs/*.py state only what
differs.

    model.family       the model family (families.py) of model.preset: mllama | llava (LLaVA-1.5); weights
                       carry their own family
    model.weights      weights to load: a converted checkpoint, a training checkpoint DIR/checkpoints/STEP, or an
                       HF directory; empty: random init of model.preset
    model.preset       the family's architecture preset for a random init or an AOT compile (mllama: tiny | demo |
                       bench | 11b | 90b; llava: llava15_tiny | llava15_bench | llava15_7b | llava15_13b); with
                       weights set, ignored
    model.processor    tokenizer/image-processor directory; empty: the files beside the weights
    model.dtype        compute dtype (activations, matmuls)
    model.param_dtype  storage dtype of the parameters; empty: model.dtype
    model.quantize     "" | "int8": int8 text-decoder weights (inference; in training, the frozen base of LoRA)
    model.adapter      LoRA adapters merged into model.weights at load (inference): a peft adapter directory
                       (tools/export_lora.py) or a LoRA training checkpoint DIR/checkpoints/STEP
    model.scan_layers  decode with the text layers scanned (training always scans)
    model.remat        activation checkpointing per layer in training: none | full | dots
    model.loss_chunk   tokens per chunk of the training cross-entropy
    model.attention_chunk
                       queries per block of the text decoder's attention in training (0: all at once); long
                       sequences then hold one block's score matrices at a time
    mesh.data, mesh.fsdp, mesh.tensor
                       the (data, fsdp, tensor) device mesh (sharding.mesh_from_config); -1 takes the devices left
                       over; tensor = 0 lets training choose (FSDP as wide as the batch allows, tensor parallelism
                       over the rest); all 1: one device

Keys that older versions had elsewhere are listed in `MOVED_KEYS`: the command line names the new key for them.
"""

from __future__ import annotations

import ml_collections

DEFAULT_COMPILATION_CACHE = "~/.cache/llava_cot_jax/xla"


def base(mode: str) -> ml_collections.ConfigDict:
    """A config of `mode` with the shared top-level keys and the `model` and `mesh` groups at their defaults."""
    c = ml_collections.ConfigDict()
    c.mode = mode
    c.seed = 0
    c.compilation_cache = DEFAULT_COMPILATION_CACHE  # compiled programs kept across runs; "" = off
    c.model = model_group()
    c.mesh = mesh_group()
    return c


def model_group() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.family = "mllama"
    m.weights = ""
    m.preset = ""
    m.processor = ""
    m.dtype = "bfloat16"
    m.param_dtype = ""
    m.quantize = ""
    m.adapter = ""
    m.scan_layers = False
    m.remat = "full"
    m.loss_chunk = 512
    m.attention_chunk = 0
    return m


def mesh_group(data: int = 1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
    g = ml_collections.ConfigDict()
    g.data, g.fsdp, g.tensor = data, fsdp, tensor
    return g


# Keys a config that runs several modes (configs/demo.py, configs/study.py) sets once at its top level; its
# per-mode sub-configs (`trainer`, `eval`) do not repeat them.
SHARED_KEYS = ("mode", "seed", "compilation_cache", "model", "mesh", "search")


def without_shared(sub: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of a mode's config without the SHARED_KEYS: a sub-config of a multi-mode config."""
    sub = ml_collections.ConfigDict(sub.to_dict())
    for key in SHARED_KEYS:
        if key in sub:
            del sub[key]
    return sub


def param_dtype(model_cfg) -> str:
    """The storage dtype a `model` group asks for."""
    return model_cfg.param_dtype or model_cfg.dtype


# Old key (as given on the command line after --config.) -> the key that replaced it.
MOVED_KEYS = {
    "checkpoint": "model.weights",
    "model.init_from": "model.weights",
    "dtype": "model.dtype",
    "model.compute_dtype": "model.dtype",
    "quantize": "model.quantize",
    "scan_layers": "model.scan_layers",
    "mesh_data": "mesh.data",
    "mesh_fsdp": "mesh.fsdp",
    "mesh_tensor": "mesh.tensor",
    "checkpoint.every_steps": "checkpointing.every_steps",
    "checkpoint.keep": "checkpointing.keep",
    "checkpoint.async_save": "checkpointing.async_save",
    "checkpoint.restore_step": "checkpointing.restore_step",
    "num_candidates": "search.num_candidates",
    "procedure": "search.procedure",
    "bracket": "search.bracket",
    "screen": "search.screen",
    "fallback": "search.fallback",
    "sentence_end": "search.sentence_end",
    "temperature": "search.temperature",
    "top_p": "search.top_p",
    "top_k": "search.top_k",
    "stage_max_new_tokens": "search.stage_max_new_tokens",
    "max_new_tokens": "search.max_new_tokens",
    "sentence_max_new_tokens": "search.sentence_max_new_tokens",
    "judge_max_new_tokens": "search.judge_max_new_tokens",
    "judge_do_sample": "search.judge_do_sample",
    "bos": "search.bos",
    "stop_at_eos": "search.stop_at_eos",
    "prompts_file": "search.prompts_file",
}


def moved_key(key: str) -> str | None:
    """The new name of an old config key (also under a prefix such as `infer.` or `eval.infer.`), or None."""
    for old, new in MOVED_KEYS.items():
        if key == old:
            return new
        if key.endswith("." + old):
            prefix = key[: -len(old)]
            return (prefix.removesuffix("infer.") if prefix.endswith("infer.") else prefix) + new
    return None
