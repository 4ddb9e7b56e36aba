"""Runs in a subprocess with 8 simulated CPU devices (tests/test_train.py): the sharded train step against the
one-device step, gradient accumulation against one big batch, and the start-up errors that need a multi-device
mesh. Prints one JSON object with what it measured; the test asserts on it."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import dataclasses
import json
import sys

import jax
import numpy as np
from flax import nnx

from llava_cot_jax import sharding
from llava_cot_jax.models.mllama.config import MllamaConfig
from llava_cot_jax.models.mllama.hf_reference import random_inputs
from llava_cot_jax.models.mllama.model import MllamaForConditionalGeneration
from llava_cot_jax.train import config as train_config
from llava_cot_jax.train import step as step_lib

jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def batch(config, seed, size=8):
    """A batch of `size` rows with varied tiles, right padding and labels on the second half of each row."""
    rng = np.random.default_rng(seed)
    tiles = [[int(t)] for t in rng.integers(1, 5, size)]
    inputs = random_inputs(config, rng, size, 16, [1] * size, tiles, pad_right=list(rng.integers(0, 6, size)))
    labels = np.where(inputs["attention_mask"] == 1, inputs["input_ids"], -100)
    labels[:, :8] = -100
    labels[labels == config.image_token_id] = -100
    return {**inputs, "labels": labels}


def run(mesh, params, batches, micro_batches=1):
    """Losses and final parameters after one step per batch, from `params`.

    Adam's update is about lr * sign(gradient) for gradients far above eps, which would hide gradient differences
    (and amplify the noise of near-zero gradients); with eps = 1 it is about lr * gradient for the gradients of this
    model, so parameter differences measure the differences of the gradients themselves."""
    optim_cfg = train_config.default_config().optimizer
    optim_cfg.learning_rate, optim_cfg.eps = 0.5, 1.0
    spec = step_lib.build_step_spec(CONFIG, optim_cfg, (), mesh, steps_per_epoch=10, total_steps=10, loss_chunk=7)
    state = step_lib.init_state(spec, params, seed=0)
    train_step = step_lib.jit_train_step(spec)
    losses = []
    for b in batches:
        split = {k: v.reshape(micro_batches, -1, *v.shape[1:]) for k, v in b.items()}
        device_batch = jax.device_put(split, step_lib.batch_sharding(mesh))
        state, metrics = train_step(state, device_batch)
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state["params"])


def max_diff(a, b):
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


text = dataclasses.replace(MllamaConfig.tiny().text, num_attention_heads=4, num_key_value_heads=2)
CONFIG = MllamaConfig.tiny().replace(text=text, remat="full")
model = MllamaForConditionalGeneration(CONFIG, rngs=nnx.Rngs(0))
cross = model.language_model.cross_layers  # open the gates: zero gates would hide the cross-attention path
cross.cross_attn_attn_gate[...] = cross.cross_attn_attn_gate[...] + 0.7
cross.cross_attn_mlp_gate[...] = cross.cross_attn_mlp_gate[...] - 0.4
params = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
batches = [batch(CONFIG, seed) for seed in (1, 2)]
devices = jax.devices()
results = {}

one_device = sharding.make_mesh(1, 1, 1, devices=devices[:1])
ref_losses, ref_params = run(one_device, params, batches)
results["reference_losses"] = ref_losses
for name, shape in {"fsdp8": (1, 8, 1), "fsdp4_tensor2": (1, 4, 2), "data2_fsdp2_tensor2": (2, 2, 2)}.items():
    losses, new_params = run(sharding.make_mesh(*shape, devices=devices), params, batches)
    results[name] = {
        "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)),
        "param_diff": max_diff(new_params, ref_params),
    }
results["param_change"] = max_diff(ref_params, params)

# Four micro-batches of 2 against one batch of 8 (one step each, on the fsdp=2 x tensor=2 x data=2 mesh).
mesh = sharding.make_mesh(2, 2, 2, devices=devices)
big_losses, big_params = run(mesh, params, batches[:1], micro_batches=1)
acc_losses, acc_params = run(sharding.make_mesh(1, 2, 1, devices=devices[:2]), params, batches[:1], micro_batches=4)
results["accumulation"] = {
    "loss_diff": abs(big_losses[0] - acc_losses[0]),
    "param_diff": max_diff(big_params, acc_params),
}

# Start-up errors that need several devices.
errors = {}
try:
    step_lib.check_heads(
        CONFIG.replace(text=dataclasses.replace(text, num_key_value_heads=1, num_attention_heads=3)),
        sharding.make_mesh(1, 4, 2, devices=devices),
    )
except ValueError as err:
    errors["heads"] = str(err)
try:
    step_lib.check_batch(12, 1, sharding.make_mesh(1, 8, 1, devices=devices))
except ValueError as err:
    errors["batch"] = str(err)
try:
    odd = CONFIG.replace(text=dataclasses.replace(text, intermediate_size=100))
    spec = step_lib.build_step_spec(
        odd, train_config.default_config().optimizer, (), sharding.make_mesh(1, 1, 8, devices=devices), 1, 1
    )
    step_lib.param_shardings(spec)
except ValueError as err:
    errors["parameter"] = str(err)
try:
    sharding.make_mesh(3, -1, 1, devices=devices)
except ValueError as err:
    errors["devices"] = str(err)
mesh_cfg = train_config.default_config().mesh
mesh_cfg.tensor = 0  # auto: FSDP as wide as the batch allows (4), tensor parallelism over the rest (2)
results["auto_mesh"] = dict(sharding.mesh_from_config(mesh_cfg, devices, global_batch=4, micro_batches=1).shape)
results["errors"] = errors
print("RESULTS " + json.dumps(results))
