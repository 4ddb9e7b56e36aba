"""The two layouts of the text decoder's layers and the conversions between them.

Stacked (`scan_layers=True`): one parameter per kind with a leading "layers" axis, run by `nnx.scan`; the layout
checkpoints store and training uses. Looped (`scan_layers=False`): one parameter per layer, run by a Python loop;
what small-batch decoding uses. Parameters are exchanged in the stacked layout (`model_params`,
`model_from_params`), so either model reads and writes the same values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_cot_jax.models.mllama import quant
from llava_cot_jax.models.mllama.config import MllamaConfig
from llava_cot_jax.models.mllama.model import MllamaForConditionalGeneration


class CheckpointError(ValueError):
    """Parameters (an HF or converted checkpoint) that do not match the architecture their config describes."""


def stacked_location(path: tuple) -> tuple[tuple[str, ...], int | None]:
    """Where a parameter of an unscanned model (`language_model/self_layers/3/q_proj`) lives in the stacked
    layout (`language_model/self_layers/q_proj`, index 3); stacked paths map to themselves."""
    if len(path) > 2 and path[1] in ("self_layers", "cross_layers") and isinstance(path[2], int):
        return tuple(str(k) for k in path[:2] + path[3:]), path[2]
    return tuple(str(k) for k in path), None


def model_from_params(
    config: MllamaConfig,
    params: dict[tuple[str, ...], np.ndarray],
    quantize: str | None = None,
    model_class=MllamaForConditionalGeneration,
):
    """Builds the model around parameters in the stacked layout (cast to config.param_dtype), without
    random init; an unscanned config (`scan_layers=False`) takes each layer's slice. `quantize="int8"` stores the
    text decoder's matrices as int8 as they are placed (see quant.py): the device never holds them unquantized."""
    abstract = nnx.eval_shape(lambda: model_class(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        key, index = stacked_location(path)
        if key not in params:
            raise CheckpointError(f"no value for parameter {'/'.join(key)}")
        value = params[key] if index is None else params[key][index]
        if tuple(value.shape) != tuple(var.shape):
            raise CheckpointError(
                f"parameter {'/'.join(key)}: expected shape {tuple(var.shape)}, found {tuple(value.shape)}"
            )
        var.set_value(quant.maybe_quantize(path, var, jnp.asarray(value, dtype=config.jnp_param_dtype), quantize))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def model_params(model) -> dict[tuple[str, ...], jax.Array]:
    """A model's parameters in the stacked layout, whether or not its layers are scanned."""
    stacked, per_layer = {}, {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key, index = stacked_location(path)
        if index is None:
            stacked[key] = var[...]
        else:
            per_layer.setdefault(key, {})[index] = var[...]
    for key, layers in per_layer.items():
        stacked[key] = jnp.stack([layers[i] for i in range(len(layers))])
    return stacked


def with_scan_layers(model, scan_layers: bool):
    """The same weights with the text layers scanned (training) or looped (small-batch decoding); a copy."""
    if model.config.scan_layers == scan_layers:
        return model
    return model_from_params(model.config.replace(scan_layers=scan_layers), model_params(model), None, type(model))
