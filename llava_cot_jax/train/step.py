"""The sharded train step: one `jax.jit` over (train state, batch) with explicit NamedShardings.

The train state is a plain dict pytree (what Orbax saves):
    step      int32 scalar
    params    the trainable parameters, nested by module path (nnx.to_pure_dict layout)
    frozen    the frozen parameters (never differentiated, never in the optimizer)
    opt_state optax state over `params`
    rng       a uint32 PRNG key, split every step (LoRA dropout draws from it; a resumed run's random stream is
              an uninterrupted one's)

With LoRA (`StepSpec.lora`), `params` holds the adapters only (models/mllama/lora.py) and `frozen` every weight of
the model, int8 where `quantize` asks (QLoRA); the adapters are differentiated and carry the optimizer state.

A batch holds the pipeline's fields with a leading micro-batch axis: [micro_batches, batch / micro_batches, ...],
split over (data, fsdp) on its second axis. Gradient accumulation scans the micro-batches summing the gradients
of the summed token NLL *and* the supervised-token counts, and divides once: 4 micro-batches give exactly the
update of one batch 4 times as large (a mean of per-micro-batch means would weight tokens unequally).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llava_cot_jax import loading
from llava_cot_jax import sharding as sharding_lib
from llava_cot_jax.models import reward as reward_lib
from llava_cot_jax.models.mllama import lora as lora_lib
from llava_cot_jax.models.mllama import quant
from llava_cot_jax.models.mllama.config import MllamaConfig
from llava_cot_jax.models.mllama.model import MllamaForConditionalGeneration
from llava_cot_jax.train import loss as loss_lib
from llava_cot_jax.train import optim, pairwise

OBJECTIVES = ("sft", "pairwise")  # next-token NLL of the answers | Bradley-Terry loss of a reward head on pairs

BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What a train step needs besides its arguments; built once per run by `build_step_spec`."""

    config: MllamaConfig
    graphdef: Any  # nnx.GraphDef of the model
    abstract_state: Any  # nnx.State of ShapeDtypeStructs carrying the logical axis metadata
    frozen_groups: tuple[str, ...]
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: jax.sharding.Mesh
    loss_chunk: int
    objective: str = "sft"  # OBJECTIVES; "pairwise": the model is the reward model (models/reward.py)
    lora: lora_lib.LoraConfig | None = None  # adapters train, the whole model is frozen
    lora_paths: tuple = ()  # the adapted weights' parameter paths
    quantize: str = ""  # "int8": the frozen base's text-decoder matrices in int8 (QLoRA; LoRA only)


def abstract_model(config: MllamaConfig, objective: str = "sft"):
    """(graphdef, abstract nnx.State) of the model (with a reward head for the pairwise objective), built
    without allocating or computing any weights."""
    if objective not in OBJECTIVES:
        raise ValueError(f"train.objective must be one of {OBJECTIVES}, got {objective!r}")
    if objective == "pairwise":
        model_class = reward_lib.reward_model_class(type(loading.abstract_model(config)))
        return nnx.split(nnx.eval_shape(lambda: model_class(config, rngs=nnx.Rngs(0))))
    return nnx.split(loading.abstract_model(config))


def with_reward_head(spec: StepSpec, params: Mapping, seed: int) -> dict:
    """`params` with a freshly initialised reward head added when the objective needs one and it has none (a
    reward model trained from an SFT checkpoint); unchanged otherwise."""
    if spec.objective != "pairwise" or reward_lib.HEAD_KEY in params:
        return dict(params)
    head = reward_lib.RewardHead(spec.config.text.hidden_size, rngs=nnx.Rngs(seed))
    return {**params, reward_lib.HEAD_KEY: nnx.to_pure_dict(nnx.state(head, nnx.Param))}


def build_step_spec(
    config: MllamaConfig,
    optim_cfg,
    frozen_groups,
    mesh,
    steps_per_epoch: int,
    total_steps: int,
    loss_chunk: int = 512,
    objective: str = "sft",
    lora: lora_lib.LoraConfig | None = None,
    quantize: str = "",
) -> StepSpec:
    graphdef, abstract_state = abstract_model(config, objective)
    schedule = optim.learning_rate_schedule(optim_cfg, steps_per_epoch, total_steps)
    if quantize and lora is None:
        raise ValueError(
            f"model.quantize={quantize!r} in training needs train.lora: int8 weights can only be a frozen base"
        )
    if lora is not None and (frozen_groups or objective != "sft"):
        raise ValueError("train.lora trains adapters on a frozen model: leave train.freeze empty, objective sft")
    lora_paths = lora_lib.target_paths(abstract_state, lora.targets) if lora is not None else ()
    return StepSpec(
        config,
        graphdef,
        abstract_state,
        tuple(frozen_groups),
        optim.make_optimizer(optim_cfg, schedule),
        schedule,
        mesh,
        loss_chunk,
        objective,
        lora,
        lora_paths,
        quantize or "",
    )


def merge_model(spec: StepSpec, params: Mapping) -> MllamaForConditionalGeneration:
    """The model with `params` (a full parameter dict) as its weights; used inside jitted functions."""
    state = jax.tree.map(lambda x: x, spec.abstract_state)  # a fresh State to fill
    nnx.replace_by_pure_dict(state, dict(params))
    return nnx.merge(spec.graphdef, state)


# --------------------------------------------------------------------------------------------------- shardings


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def param_shardings(spec: StepSpec) -> dict:
    """NamedSharding of every parameter from the logical-axis rules table (checks divisibility by name)."""
    return nnx.to_pure_dict(sharding_lib.param_shardings(spec.abstract_state, spec.mesh))


def abstract_params(spec: StepSpec) -> dict:
    return nnx.to_pure_dict(spec.abstract_state)


# ------------------------------------------------------------------------------------------------------- LoRA


def adapter_specs(spec: StepSpec) -> dict:
    return lora_lib.adapter_specs(spec.abstract_state, spec.lora_paths, spec.lora.rank)


def _quantized_abstract_state(spec: StepSpec) -> nnx.State:
    """The abstract model state with the text decoder's matrices as abstract `Int8Weight`s."""
    return nnx.map_state(
        lambda path, var: var.replace(
            jax.eval_shape(lambda v: quant.maybe_quantize(path, var, v, "int8"), var.get_value())
        ),
        spec.abstract_state,
    )


def frozen_base(spec: StepSpec) -> tuple[dict, dict]:
    """(shapes, shardings) of a LoRA run's frozen model: every parameter, int8 where `quantize` asks."""
    if spec.quantize:
        state = _quantized_abstract_state(spec)
        return nnx.to_pure_dict(state), nnx.to_pure_dict(
            quant.param_shardings(state, spec.mesh, sharding_lib.LOGICAL_AXIS_RULES)
        )
    return abstract_params(spec), param_shardings(spec)


def adapter_shardings(spec: StepSpec) -> dict:
    """The adapters' NamedShardings from their logical axis names (a mesh axis that does not divide a dimension
    is left out: the rank axis is replicated anyway)."""
    names = lora_lib.adapter_names(adapter_specs(spec))
    shapes = lora_lib.abstract_adapters(adapter_specs(spec))
    return jax.tree.map(
        lambda a, n: NamedSharding(spec.mesh, sharding_lib.dividing_spec(a.shape, n, spec.mesh)),
        shapes,
        names,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def place_frozen(spec: StepSpec, params: Mapping) -> dict:
    """A LoRA run's frozen model on the mesh from a full parameter dict: placed, then quantized where asked."""
    full = param_shardings(spec)
    dtype_of = jax.tree.map(lambda a: a.dtype, abstract_params(spec))
    placed = jax.tree.map(
        lambda x, s, d: jax.device_put(np.asarray(x, d) if not isinstance(x, jax.Array) else x.astype(d), s),
        dict(params),
        full,
        dtype_of,
    )
    if not spec.quantize:
        return placed
    _, shardings = frozen_base(spec)
    state = jax.tree.map(lambda x: x, spec.abstract_state)
    nnx.replace_by_pure_dict(state, placed)
    del placed
    return jax.device_put(nnx.to_pure_dict(quant.quantize_state(state)), shardings)


def _model_params(spec: StepSpec, trainable, frozen, dropout_key=None) -> dict:
    """The full parameter dict the model runs with: adapters applied to the frozen model under LoRA."""
    if spec.lora is None:
        return {**trainable, **frozen}
    return lora_lib.apply(frozen, trainable, spec.lora, dropout_key)


def state_shardings(spec: StepSpec) -> dict:
    """Shardings of the whole train state: optimizer moments follow their parameters; counters are replicated."""
    if spec.lora is not None:
        trainable, abstract_trainable = adapter_shardings(spec), lora_lib.abstract_adapters(adapter_specs(spec))
        frozen = frozen_base(spec)[1]
    else:
        trainable, frozen = optim.split_params(param_shardings(spec), spec.frozen_groups)
        abstract_trainable, _ = optim.split_params(abstract_params(spec), spec.frozen_groups)
    abstract_opt = jax.eval_shape(spec.tx.init, abstract_trainable)
    opt = optax.tree_utils.tree_map_params(
        spec.tx, lambda _, s: s, abstract_opt, trainable, transform_non_params=lambda _: replicated(spec.mesh)
    )
    rep = replicated(spec.mesh)
    return {"step": rep, "params": trainable, "frozen": frozen, "opt_state": opt, "rng": rep}


def batch_sharding(mesh) -> NamedSharding:
    """Every batch field: [micro_batches, batch, ...] with the batch axis over (data, fsdp)."""
    return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))


def check_batch(global_batch: int, micro_batches: int, mesh) -> None:
    """A global batch that the micro-batches and the mesh's batch axes cannot split evenly fails here."""
    if micro_batches < 1 or global_batch % micro_batches:
        raise ValueError(f"global batch {global_batch} is not divisible into {micro_batches} micro-batches")
    micro = global_batch // micro_batches
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if micro % ways:
        raise ValueError(
            f"micro-batch of {micro} samples (global batch {global_batch} / {micro_batches} micro-batches) is not "
            f"divisible by mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']} = {ways}"
        )


def check_heads(config: MllamaConfig, mesh) -> None:
    """Tensor parallelism splits attention heads; a head count the tensor axis does not divide fails here with the
    count named (the per-parameter check in sharding.param_shardings names the parameter as well)."""
    tensor = mesh.shape["tensor"]
    counts = {
        "text num_attention_heads": config.text.num_attention_heads,
        "text num_key_value_heads": config.text.num_key_value_heads,
        "vision attention_heads": config.vision.attention_heads,
    }
    bad = [f"{name}={n}" for name, n in counts.items() if n % tensor]
    if bad:
        raise ValueError(f"mesh tensor={tensor} does not divide {', '.join(bad)}")


# ------------------------------------------------------------------------------------------------------ state


def init_state(spec: StepSpec, params: Mapping, seed: int) -> dict:
    """The train state for `params` (a full parameter dict of host or device arrays), placed on the mesh."""
    shardings = state_shardings(spec)
    if spec.lora is not None:
        frozen = place_frozen(spec, params)
        adapters = lora_lib.init_adapters(adapter_specs(spec), jax.random.fold_in(jax.random.key(seed), 1))
        trainable = jax.device_put(adapters, shardings["params"])
    else:
        full = param_shardings(spec)
        dtype_of = jax.tree.map(lambda a: a.dtype, abstract_params(spec))
        placed = jax.tree.map(
            lambda x, s, d: jax.device_put(np.asarray(x, d) if not isinstance(x, jax.Array) else x.astype(d), s),
            dict(params),
            full,
            dtype_of,
        )
        trainable, frozen = optim.split_params(placed, spec.frozen_groups)
    opt_state = jax.jit(spec.tx.init, out_shardings=shardings["opt_state"])(trainable)
    rep = shardings["step"]
    return {
        "step": jax.device_put(jnp.int32(0), rep),
        "params": trainable,
        "frozen": frozen,
        "opt_state": opt_state,
        "rng": jax.device_put(jax.random.PRNGKey(seed), rep),
    }


def abstract_state(spec: StepSpec) -> dict:
    """ShapeDtypeStructs (with shardings) of the train state: the restore target and the AOT compile input."""
    shardings = state_shardings(spec)
    if spec.lora is not None:
        trainable, frozen = lora_lib.abstract_adapters(adapter_specs(spec)), frozen_base(spec)[0]
    else:
        trainable, frozen = optim.split_params(abstract_params(spec), spec.frozen_groups)
    opt = jax.eval_shape(spec.tx.init, trainable)
    shapes = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": trainable,
        "frozen": frozen,
        "opt_state": opt,
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
    }
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


# ------------------------------------------------------------------------------------------------------- step


def _micro_nll(spec: StepSpec, trainable, frozen, micro_batch, dropout_key=None):
    model = merge_model(spec, _model_params(spec, trainable, frozen, dropout_key))
    # The mesh as context while tracing: activations inside the model are pinned to it (sharding.constrain).
    with jax.sharding.use_abstract_mesh(spec.mesh.abstract_mesh):
        if spec.objective == "pairwise":  # (summed pair losses, pairs): the same accumulate-then-divide as tokens
            total, pairs, _ = pairwise.pairwise_sum(model, loss_lib.model_inputs(micro_batch, model.config.jnp_dtype))
            return total, pairs
        return loss_lib.nll_sum(model, micro_batch, spec.loss_chunk)


def _accumulate(spec: StepSpec, trainable, frozen, batch, key):
    """Summed NLL, supervised tokens and the gradient of the summed NLL (fp32) over the micro-batches. `key`: the
    step's random key (LoRA dropout; each micro-batch folds in its index)."""
    uses_key = spec.lora is not None and spec.lora.dropout > 0
    grad_fn = jax.value_and_grad(
        lambda p, mb, i: _micro_nll(spec, p, frozen, mb, jax.random.fold_in(key, i) if uses_key else None),
        has_aux=True,
    )
    to_f32 = lambda tree: jax.tree.map(lambda g: g.astype(jnp.float32), tree)
    micro_batches = jax.tree.leaves(batch)[0].shape[0]
    if micro_batches == 1:
        (total, count), grads = grad_fn(trainable, jax.tree.map(lambda x: x[0], batch), 0)
        return total, count, to_f32(grads)

    def body(carry, xs):
        total, count, grads = carry
        micro_batch, index = xs
        (t, c), g = grad_fn(trainable, micro_batch, index)
        return (total + t, count + c, jax.tree.map(jnp.add, grads, to_f32(g))), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
    xs = (batch, jnp.arange(micro_batches))
    (total, count, grads), _ = jax.lax.scan(body, (jnp.float32(0), jnp.int32(0), zeros), xs)
    return total, count, grads


def train_step(spec: StepSpec, state: dict, batch: Mapping) -> tuple[dict, dict]:
    """One optimizer update on one global batch; returns (new state, metrics of this step)."""
    rng, step_key = jax.random.split(state["rng"])
    total, count, grads = _accumulate(spec, state["params"], state["frozen"], batch, step_key)
    denominator = jnp.maximum(count, 1).astype(jnp.float32)
    grads = jax.tree.map(lambda g: g / denominator, grads)
    updates, opt_state = spec.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": rng}
    metrics = {
        "loss": total / denominator,
        "supervised_tokens": count,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": spec.schedule(state["step"]),
        # The size of this update against the weights it changed: the one metric about the weights being saved
        # (loss and gradient norm describe the weights before the update). The trainer's divergence check reads it.
        "update_ratio": optax.tree.norm(updates) / jnp.maximum(optax.tree.norm(state["params"]), 1e-12),
    }
    return new_state, metrics


def eval_step(spec: StepSpec, state: dict, batch: Mapping) -> tuple[jax.Array, jax.Array]:
    """(summed token NLL, supervised tokens) of a held-out batch under the current parameters."""
    micro = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch)
    return _micro_nll(spec, state["params"], state["frozen"], micro)


def jit_train_step(spec: StepSpec):
    """`train_step` jitted with explicit shardings: state in and out with the state's shardings (donated), the
    batch over (data, fsdp), metrics replicated."""
    shardings = state_shardings(spec)
    return jax.jit(
        lambda state, batch: train_step(spec, state, batch),
        in_shardings=(shardings, batch_sharding(spec.mesh)),
        out_shardings=(shardings, replicated(spec.mesh)),
        donate_argnums=0,
    )


def jit_eval_step(spec: StepSpec):
    """`eval_step` jitted like the train step (the state is read, not donated); its two scalars replicated."""
    return jax.jit(
        lambda state, batch: eval_step(spec, state, batch),
        in_shardings=(state_shardings(spec), batch_sharding(spec.mesh)),
        out_shardings=replicated(spec.mesh),
    )
