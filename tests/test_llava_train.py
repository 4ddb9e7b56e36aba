"""The llava family on the shared trainer: Vicuna-templated batches from the same Grain pipeline, frozen groups
(LLaVA-1.5's stage 1 trains the projector only), Orbax checkpoints with exact resume, and falling loss."""

import json
import os

import jax
import numpy as np
import pytest

from llava_cot_jax import loading
from llava_cot_jax.data import synthetic
from llava_cot_jax.data.chat import IGNORE_INDEX
from llava_cot_jax.train import config as train_config
from llava_cot_jax.train import step as step_lib
from llava_cot_jax.train import trainer as trainer_lib


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return synthetic.write_synthetic_dataset(tmp_path_factory.mktemp("data") / "synth", 48, image_size=56)


def llava_config(data_dir, **overrides):
    c = train_config.runlocal(train_config.default_config())
    c.data.train, c.data.synthetic_samples, c.compilation_cache = str(data_dir), 0, ""
    c.model.family, c.model.preset = "llava", "llava15_tiny"
    c.log_every = 1
    for key, value in overrides.items():
        group, leaf = key.split(".")
        c[group][leaf] = value
    return c


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_batches_carry_vicuna_labels_and_per_row_images(scenes, tmp_path):
    trainer = trainer_lib.Trainer(llava_config(scenes.jsonl_path.parent), str(tmp_path / "run"))
    batch = next(iter(trainer._dataset(trainer.source, train=True)))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    image_id = trainer.processor.image_token_id
    per_row = (batch["input_ids"] == image_id).sum(axis=1)
    assert set(per_row.tolist()) <= {0, trainer.processor.image_tokens}
    assert batch["pixel_values"].shape[1:] == (1, 3, 28, 28)
    assert not np.any(batch["labels"][batch["input_ids"] == image_id] != IGNORE_INDEX)
    first = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX]
    assert trainer.processor.decode(first).endswith("</s>")  # an answer and its end-of-sequence are trained on


def test_projector_only_stage_freezes_the_tower_and_the_decoder(scenes, tmp_path, xla_cache):
    config = llava_config(scenes.jsonl_path.parent, **{"train.freeze": "vision,language", "train.num_steps": 2})
    trainer = trainer_lib.Trainer(config, str(tmp_path / "run"))
    params = loading.initial_params(config.model, trainer.model_config, seed=0)
    state = step_lib.init_state(trainer.spec, params, seed=0)
    assert set(state["params"]) == {"multi_modal_projector"}
    assert set(state["frozen"]) == {"vision_tower", "language_model"}
    train_step = step_lib.jit_train_step(trainer.spec)
    iterator = iter(trainer._dataset(trainer.source, train=True))
    frozen_before, trained_before = jax.device_get(state["frozen"]), jax.device_get(state["params"])
    for _ in range(2):
        state, _ = train_step(state, trainer._device_batch(next(iterator)))
    for before, after in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(jax.device_get(state["frozen"]))):
        np.testing.assert_array_equal(before, after)
    for before, after in zip(jax.tree.leaves(trained_before), jax.tree.leaves(jax.device_get(state["params"]))):
        assert not np.array_equal(before, after)


def test_resume_equals_an_uninterrupted_run_and_the_loss_falls(scenes, tmp_path, xla_cache):
    data = scenes.jsonl_path.parent
    run = {"train.num_steps": 6, "checkpointing.every_steps": 2, "optimizer.learning_rate": 3e-3}
    reference = str(tmp_path / "reference")
    assert trainer_lib.run(llava_config(data, **run), reference) == 0
    interrupted = str(tmp_path / "interrupted")
    trainer_lib.run(llava_config(data, **{**run, "train.num_steps": 4}), interrupted)
    trainer_lib.run(llava_config(data, **run), interrupted)  # resumes from step 4's checkpoint
    want, got = losses(reference), losses(interrupted)
    assert len(want) == len(got) == 6
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.mean(want[3:]) < np.mean(want[:3])


def test_the_train_step_lowers_for_the_real_recipe_shapes():
    """The AOT path (tools/aot_compile.py) builds the llava batch and lowers stage 2's step for the 7B shapes on
    this host's devices without allocating them: parameters, optimizer state and batch are abstract."""
    import importlib.util

    from llava_cot_jax import aot_compile
    from llava_cot_jax.data import pipeline

    path = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "llava15_finetune_7b.py"
    )
    spec = importlib.util.spec_from_file_location("llava15_finetune_7b", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.train.global_batch = len(jax.devices())
    mesh = aot_compile.mesh_for(config, jax.devices())
    (program,) = aot_compile.programs_for_config(config, mesh)
    state, batch = program.args
    assert set(batch) == set(pipeline.LLAVA_BATCH_KEYS) and batch["pixel_values"].shape[2:] == (1, 3, 336, 336)
    assert set(state["params"]) == {"multi_modal_projector", "language_model"}  # the tower is frozen in stage 2
    assert program.jitted.lower(*program.args, **program.kwargs).as_text()
    assert program.notes["tflops_per_step"] > 0


def test_batches_grouped_by_modality_train_and_text_batches_skip_the_tower(scenes, tmp_path, xla_cache):
    """LLaVA-1.5's finetune grouping on the trainer: 16 records with an image and 8 text-only ones, global batch 8,
    one epoch: every step is one modality, the text-only step counts no vision FLOPs, and the loss stays finite."""
    mixed = tmp_path / "mixed.jsonl"
    with open(scenes.jsonl_path) as f, open(mixed, "w") as out:
        lines = f.readlines()
        out.writelines(lines[:16])
        for line in lines[16:24]:
            record = json.loads(line)
            del record["image"]
            record["conversations"][0]["value"] = record["conversations"][0]["value"].replace("<image>\n", "")
            out.write(json.dumps(record) + "\n")
    overrides = {"data.image_root": str(scenes.image_root), "data.record_filter": "llava", "train.num_steps": 3}
    config = llava_config(mixed, **overrides, **{"data.group_by_modality": True})
    workdir = str(tmp_path / "run")
    trainer = trainer_lib.Trainer(config, workdir)
    image_id = trainer.processor.image_token_id
    iterator = iter(trainer._dataset(trainer.source, train=True))
    for _ in range(3):
        rows_with_image = (next(iterator)["input_ids"] == image_id).any(1)
        assert rows_with_image.all() or not rows_with_image.any()
    assert trainer_lib.run(config, workdir) == 0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 3 and all(np.isfinite(r["loss"]) for r in records)
    text_only = [r["flops_per_step"] == trainer.step_flops(r["seq_len"], with_images=False) for r in records]
    assert sum(text_only) == 1  # the text-only step counts the decoder alone
