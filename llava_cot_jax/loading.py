"""The one place a config's `model` group becomes a model: format detection, architecture, dtypes, scan layout,
mesh placement, int8, and the processor beside the weights. Training, inference, evaluation, the demo and the AOT
tools all resolve their model here, through the family registry (families.py), so a setting means the same thing
in every mode and a new family needs no caller changed.

`model.weights` may be
  - a converted checkpoint (tools/convert_hf_to_orbax.py; `llava_cot_config.json` + `params/`),
  - a training checkpoint `DIR/checkpoints/STEP` (the trainer's; its processor files are in `DIR/processor`),
  - an HF directory (`config.json` + safetensors), read on the host,
  - empty: a random init of `model.preset` (training, AOT).
"""

from __future__ import annotations

import os

from llava_cot_jax import checkpoint, config_schema, families, sharding

CONVERTED, HF = "converted", "hf"


def family(model_cfg) -> families.Family:
    return families.get(model_cfg.get("family", "mllama"))


def weights_format(path: str) -> str:
    """`CONVERTED` (a converted or training checkpoint) or `HF`; FileNotFoundError naming `model.weights` else,
    and a ValueError pointing at `model.adapter` for adapters (a LoRA run's checkpoint or a peft directory)."""
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"model.weights must be a checkpoint directory, got {path!r}")
    from llava_cot_jax.models.mllama import peft_format

    if os.path.isfile(_lora_settings(path)) or os.path.isfile(os.path.join(path, peft_format.CONFIG_NAME)):
        raise ValueError(
            f"model.weights={path} holds LoRA adapters, not a model. Load it as "
            f"model.adapter={path}, with model.weights the base model it was trained on{_base_of_run(path)}"
        )
    if checkpoint.is_checkpoint(path):
        return CONVERTED
    if os.path.exists(os.path.join(path, "config.json")):
        return HF
    raise FileNotFoundError(
        f"model.weights={path} is not a checkpoint: it has neither {checkpoint.CONFIG_FILE} (converted) nor "
        "config.json (HF)"
    )


def stored_config(model_cfg):
    """The architecture as stored with `model.weights` (whose family the weights themselves tell), else
    `model.preset`'s of `model.family`; dtypes and layout untouched."""
    if model_cfg.weights:
        if weights_format(model_cfg.weights) == CONVERTED:
            return checkpoint.load_config(model_cfg.weights)
        return families.of_hf_dir(model_cfg.weights).config_class.from_hf_config(model_cfg.weights)
    if not model_cfg.preset:
        raise ValueError("set model.weights (a checkpoint directory) or model.preset (an architecture)")
    return family(model_cfg).preset(model_cfg.preset)


def arch_config(model_cfg, *, training: bool = False):
    """The architecture with the config's dtypes applied; training scans the layers and applies `remat` and
    `attention_chunk`, inference loads them unscanned (the decoder converts when `model.scan_layers` asks; see
    generate/)."""
    config = stored_config(model_cfg).replace(
        param_dtype=config_schema.param_dtype(model_cfg), dtype=model_cfg.dtype, scan_layers=training
    )
    if not training:
        return config
    return config.replace(remat=model_cfg.remat, attention_chunk=model_cfg.attention_chunk)


def load_model(model_cfg, mesh=None):
    """The inference model `model.weights` holds, unscanned, in the config's dtype (int8 text decoder with
    `model.quantize`). On a `mesh`, a converted checkpoint is read straight into each device's shards as the
    decoding rules place them; an HF directory is read on the host first."""
    if not model_cfg.weights:
        raise ValueError("model.weights is required: a converted checkpoint, a training checkpoint or an HF directory")
    dtype, quantize = config_schema.param_dtype(model_cfg), model_cfg.quantize or None
    if model_cfg.get("adapter"):
        if mesh is not None:
            raise ValueError(
                "model.adapter is merged on the host, for one device: merge it into the weights first "
                "(tools/export_lora.py --merge_into DIR) to load onto a mesh"
            )
        from llava_cot_jax.models.mllama import layout

        arch = stored_config(model_cfg).replace(param_dtype=dtype, dtype=model_cfg.dtype, scan_layers=True)
        merged = merged_params(model_cfg, arch)
        model_class = families.of(arch).model_class
        return layout.model_from_params(arch.replace(scan_layers=False), merged, quantize, model_class)
    if weights_format(model_cfg.weights) == CONVERTED:
        rules = None
        if mesh is not None:
            num_kv_heads = checkpoint.load_config(model_cfg.weights).text.num_key_value_heads
            rules = sharding.inference_rules(num_kv_heads, mesh)
        return checkpoint.load_model(
            model_cfg.weights,
            dtype=dtype,
            compute_dtype=model_cfg.dtype,
            scan_layers=False,
            mesh=mesh,
            rules=rules,
            quantize=quantize,
        )
    return families.of_hf_dir(model_cfg.weights).weights.from_hf(
        model_cfg.weights, dtype=dtype, compute_dtype=model_cfg.dtype, quantize=quantize, scan_layers=False
    )


def _lora_settings(step_dir: str) -> str:
    """A LoRA training checkpoint's record of its adapters (train/checkpointing.py's `lora` item)."""
    return os.path.join(step_dir, "lora", "lora_config.json")


def _base_of_run(step_dir: str) -> str:
    """ " (RUN's model.weights: BASE)" from the run's DIR/config.json beside DIR/checkpoints/STEP, if it names one."""
    import json

    run_config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(step_dir))), "config.json")
    try:
        with open(run_config) as f:
            base = json.load(f)["model"]["weights"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return f" ({run_config} has model.weights={base})" if base else ""


def read_adapter(path: str, arch):
    """(nested adapters, lora.LoraConfig) of a peft adapter directory or a LoRA training checkpoint
    DIR/checkpoints/STEP, for a model of `arch`."""
    import json

    import jax
    import numpy as np
    from flax import nnx

    from llava_cot_jax.models.mllama import lora, peft_format

    abstract_state = nnx.state(abstract_model(arch.replace(scan_layers=True)))
    if os.path.isfile(os.path.join(path, peft_format.CONFIG_NAME)):
        return peft_format.read(path, arch, abstract_state)
    settings = _lora_settings(path)
    if not os.path.isfile(settings):
        raise FileNotFoundError(
            f"model.adapter={path} holds no adapters: expected {peft_format.CONFIG_NAME} (peft) or a LoRA training "
            "checkpoint DIR/checkpoints/STEP"
        )
    import orbax.checkpoint as ocp

    with open(settings) as f:
        record = json.load(f)
    config = lora.LoraConfig(record["rank"], record["alpha"], record["dropout"], record["targets"])
    specs = lora.adapter_specs(abstract_state, [tuple(p) for p in record["paths"]], config.rank)
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(os.path.join(os.path.abspath(path), "adapters"), lora.abstract_adapters(specs))
    return jax.tree.map(np.asarray, restored), config


def merged_params(model_cfg, arch) -> dict:
    """{stacked parameter path: host array} of model.weights with model.adapter folded in (float32 merge)."""
    from llava_cot_jax.models.mllama import lora

    if weights_format(model_cfg.weights) == CONVERTED:
        _, params = checkpoint.load_params(model_cfg.weights)
    else:
        params = families.of(arch).weights.load_hf_params(model_cfg.weights, arch)
    adapters, config = read_adapter(model_cfg.adapter, arch)
    merged = lora.merge(checkpoint.nested(params), adapters, config)
    out = dict(params)
    for path in lora.flatten(adapters):
        node = merged
        for key in path:
            node = node[key]
        out[path] = node
    return out


def abstract_model(arch):
    """The model of `arch` with no memory behind it (`nnx.eval_shape`): 90B is as quick to build as the tiny one."""
    from flax import nnx

    model_class = families.of(arch).model_class
    return nnx.eval_shape(lambda: model_class(arch, rngs=nnx.Rngs(0)))


def initial_params(model_cfg, arch, seed: int, mesh=None) -> dict:
    """The parameters a training run starts from, nested by module path. From a converted checkpoint with a
    `mesh`, every device's shard is read from disk by itself, already placed by the rules table
    (`checkpoint.load_model`), so no host holds the whole model (90B in float32 is 360 GB); otherwise host
    arrays (an HF directory is read on the host); without weights, a random init of `arch`."""
    from flax import nnx

    weights = model_cfg.weights
    if weights and weights_format(weights) == CONVERTED:
        if mesh is not None:
            model = checkpoint.load_model(
                weights, dtype=arch.param_dtype, compute_dtype=arch.dtype, scan_layers=True, mesh=mesh
            )
            return nnx.to_pure_dict(nnx.state(model, nnx.Param))
        _, params = checkpoint.load_params(weights)
        return checkpoint.nested(params)
    if weights:
        return checkpoint.nested(families.of(arch).weights.load_hf_params(weights, arch))
    model = families.of(arch).model_class(arch, rngs=nnx.Rngs(seed))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def load_processor(model_cfg, arch=None):
    """The tokenizer + image processor: `model.processor`, else the files beside `model.weights`, else (small
    presets only) the family's built-in one for `arch`."""
    fam = families.of(arch) if arch is not None else family(model_cfg)
    source = model_cfg.processor or (checkpoint.side_files_dir(model_cfg.weights) if model_cfg.weights else "")
    if source:
        return fam.processor_class.from_pretrained(source)
    if fam.built_in_processor is None or model_cfg.preset not in fam.built_in_processor_presets:
        raise ValueError("model.processor (a directory with tokenizer files) is required without model.weights")
    return fam.built_in_processor(arch if arch is not None else arch_config(model_cfg))


def check_processor(processor, arch) -> None:
    """A tokenizer that does not belong to the model fails here rather than training or decoding wrong ids."""
    problems = []
    if processor.image_token_id != arch.image_token_id:
        problems.append(
            f"{processor.image_token} is id {processor.image_token_id}, the model's image token: {arch.image_token_id}"
        )
    if len(processor.tokenizer) > arch.text.embedding_rows:
        problems.append(f"{len(processor.tokenizer)} tokens, the model embeds {arch.text.embedding_rows}")
    if processor.image_processor.image_size != arch.vision.image_size:
        problems.append(
            f"images (tiles) of {processor.image_processor.image_size} px, the model's are {arch.vision.image_size}"
        )
    if problems:
        raise ValueError("the tokenizer/image processor does not match the model: " + "; ".join(problems))


def export_adapter(adapter: str, out_dir: str, naming: str = "transformers", base_model: str = "") -> str:
    """A LoRA training checkpoint (or peft directory) -> a peft adapter directory (tools/export_lora.py)."""
    from llava_cot_jax.models.mllama import lora, peft_format

    arch = checkpoint.load_config(adapter) if checkpoint.is_checkpoint(adapter) else None
    if arch is None:
        raise FileNotFoundError(f"{adapter} is not a LoRA training checkpoint DIR/checkpoints/STEP")
    adapters, config = read_adapter(adapter, arch)
    paths = sorted(lora.flatten(adapters))
    return peft_format.write(out_dir, arch, adapters, config, paths, naming=naming, base_model=base_model)


def merge_adapter(weights: str, adapter: str, out_dir: str, overwrite: bool = False) -> str:
    """model.weights with `adapter` folded in, written as a converted checkpoint (export_to_hf takes it on)."""
    model_cfg = config_schema.model_group()
    model_cfg.weights, model_cfg.adapter = weights, adapter
    arch = stored_config(model_cfg)
    arch = arch.replace(dtype=arch.param_dtype, scan_layers=True)
    merged = merged_params(model_cfg, arch)
    side_files = checkpoint.side_files_dir(weights) if weights_format(weights) == CONVERTED else weights
    return checkpoint.save_checkpoint(out_dir, arch, merged, side_files_from=side_files, overwrite=overwrite)
