"""Train-state checkpoints: an Orbax CheckpointManager under DIR/checkpoints, one step directory per save.

Items of a step directory:
    params        every parameter (trained and frozen), nested by module path: the layout `checkpoint.py` reads,
                  so inference and tools/export_to_hf.py load a step directory like converted weights
    train_state   {step, opt_state, rng}
    data          the Grain iterator state, one JSON file per process
    model_config  the MllamaConfig (`checkpoint.CONFIG_FILE`)

A LoRA run saves `adapters` (the nested adapter dict, models/mllama/lora.py) and `lora` (rank, alpha, dropout,
targets) instead of `params`: its model is frozen, rebuilt from model.weights on resume, and a step is a few MB.

Saves are asynchronous (device arrays are copied to host, then written in the background) and atomic: Orbax
writes a temporary directory and renames it when every item is complete, so a run killed at any moment, during
a save too, leaves only complete steps, and `latest_step()` is the last of them.
"""

from __future__ import annotations

import json
import os

import grain
import jax
import orbax.checkpoint as ocp

from llava_cot_jax import checkpoint as weights
from llava_cot_jax.models.mllama.config import MllamaConfig

CHECKPOINT_DIR = "checkpoints"
LORA_FILE = "lora_config.json"


def make_manager(workdir: str, every_steps: int, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        # Every `every_steps` steps; the trainer forces the final and the preemption saves. (Orbax's default
        # policy would also save the first step, a full copy of the model for nothing.)
        save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(max(every_steps, 1)),
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,  # a save killed half-way leaves a temporary directory: removed at start
    )
    handlers = {
        "params": ocp.StandardCheckpointHandler(),
        "train_state": ocp.StandardCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
        "model_config": ocp.JsonCheckpointHandler(filename=weights.CONFIG_FILE),
        "adapters": ocp.StandardCheckpointHandler(),
        "lora": ocp.JsonCheckpointHandler(filename=LORA_FILE),
    }
    return ocp.CheckpointManager(
        os.path.join(workdir, CHECKPOINT_DIR), options=options, item_names=tuple(handlers), item_handlers=handlers
    )


def save(
    manager: ocp.CheckpointManager,
    state: dict,
    iterator,
    model_config: MllamaConfig,
    force: bool = False,
    lora: dict | None = None,
):
    """Starts saving `state` (see step.py) and the data iterator at the state's step; True if a save started.
    `lora`: the LoRA settings of a LoRA run (its `params` are the adapters)."""
    step = int(jax.device_get(state["step"]))
    train_state = {"step": state["step"], "opt_state": state["opt_state"], "rng": state["rng"]}
    config_dict = json.loads(model_config.replace(scan_layers=True).to_json())  # the family's own JSON
    if lora is not None:
        weight_items = {"adapters": ocp.args.StandardSave(state["params"]), "lora": ocp.args.JsonSave(lora)}
    else:
        weight_items = {"params": ocp.args.StandardSave({**state["params"], **state["frozen"]})}
    return manager.save(
        step,
        args=ocp.args.Composite(
            **weight_items,
            train_state=ocp.args.StandardSave(train_state),
            data=grain.checkpoint.CheckpointSave(iterator),
            model_config=ocp.args.JsonSave(config_dict),
        ),
        force=force,
    )


def restore(
    manager: ocp.CheckpointManager, step: int, abstract_state: dict, iterator, frozen: dict | None = None
) -> dict:
    """The train state saved at `step`, placed with the shardings of `abstract_state`; sets `iterator`'s state.
    A LoRA run passes its `frozen` model (not in the checkpoint) and gets its adapters back as `params`."""
    abstract_train = {k: abstract_state[k] for k in ("step", "opt_state", "rng")}
    if frozen is not None:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                adapters=ocp.args.StandardRestore(abstract_state["params"]),
                train_state=ocp.args.StandardRestore(abstract_train),
                data=grain.checkpoint.CheckpointRestore(iterator),
            ),
        )
        return {**restored["train_state"], "params": restored["adapters"], "frozen": frozen}
    abstract_params = {**abstract_state["params"], **abstract_state["frozen"]}
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            train_state=ocp.args.StandardRestore(abstract_train),
            data=grain.checkpoint.CheckpointRestore(iterator),
        ),
    )
    params = restored["params"]
    return {
        **restored["train_state"],
        "params": {k: params[k] for k in abstract_state["params"]},
        "frozen": {k: params[k] for k in abstract_state["frozen"]},
    }
