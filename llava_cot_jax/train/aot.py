"""The real-size train step for tools/aot_compile.py: abstract train state and batch, compiled for a TPU slice.

    python tools/aot_compile.py --config configs/sft_llava_cot_11b.py --topology v5p-64

Nothing is allocated: the parameters, optimizer state and batch are ShapeDtypeStructs carrying the shardings the
trainer would give them, so the compiled program's memory analysis is the step's per-chip footprint.
"""

from __future__ import annotations

import jax
import numpy as np

from llava_cot_jax import loading
from llava_cot_jax.aot import Program, gib_per_device
from llava_cot_jax.data import pipeline
from llava_cot_jax.models.llava.config import LlavaConfig
from llava_cot_jax.models.mllama import lora
from llava_cot_jax.train import flops, optim
from llava_cot_jax.train import step as step_lib


def abstract_batch(config, model_config, mesh) -> dict:
    """The batch the pipeline would feed at the longest sequence bucket, as ShapeDtypeStructs [micro, B/micro, ...]."""
    c, v = config, model_config.vision
    micro = c.train.micro_batches
    b, seq, images = c.train.global_batch // micro, c.data.seq_buckets[-1], c.data.max_images
    pixel_dtype = np.uint8 if c.data.pixel_dtype == "uint8" else np.float32
    shapes = {
        "input_ids": ((b, seq), np.int32),
        "attention_mask": ((b, seq), np.int32),
        "labels": ((b, seq), np.int32),
    }
    if isinstance(model_config, LlavaConfig):
        shapes["pixel_values"] = ((b, images, 3, v.image_size, v.image_size), pixel_dtype)
        assert set(shapes) == set(pipeline.LLAVA_BATCH_KEYS)
    else:
        tiles = v.max_num_tiles
        shapes["pixel_values"] = ((b, images, tiles, 3, v.image_size, v.image_size), pixel_dtype)
        shapes["aspect_ratio_ids"] = ((b, images), np.int32)
        shapes["aspect_ratio_mask"] = ((b, images, tiles), np.int32)
        shapes["cross_attention_mask"] = ((b, seq, images, tiles), np.int32)
        assert set(shapes) == set(pipeline.BATCH_KEYS)
    sharding = step_lib.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct((micro, *shape), dtype, sharding=sharding) for k, (shape, dtype) in shapes.items()}


def programs(config, mesh) -> list[Program]:
    """[the train step] for `config` on `mesh` (built from the config's `mesh` group as the trainer builds it)."""
    c = config
    model_config = loading.arch_config(c.model, training=True)
    step_lib.check_heads(model_config, mesh)
    step_lib.check_batch(c.train.global_batch, c.train.micro_batches, mesh)
    frozen = optim.parse_groups(c.train.freeze)
    steps_per_epoch = 1000  # only the learning-rate schedule's shape depends on it, not the program's memory
    spec = step_lib.build_step_spec(
        model_config,
        c.optimizer,
        frozen,
        mesh,
        steps_per_epoch,
        c.train.epochs * steps_per_epoch,
        loss_chunk=c.model.loss_chunk,
        lora=lora.LoraConfig.from_config(c.train.lora),
        quantize=c.model.quantize,
    )
    state = step_lib.abstract_state(spec)
    seq = c.data.seq_buckets[-1]
    step_flops = flops.train_step_flops(model_config, c.train.global_batch, seq, c.data.max_images, frozen)
    notes = {
        "mesh": "x".join(str(mesh.shape[a]) for a in mesh.axis_names),
        "params_gib": gib_per_device({"p": state["params"], "f": state["frozen"]}),
        "optimizer_gib": gib_per_device(state["opt_state"]),
        "tflops_per_step": step_flops / 1e12,
    }
    return [
        Program(
            "train_step", step_lib.jit_train_step(spec), (state, abstract_batch(c, model_config, mesh)), notes=notes
        )
    ]
