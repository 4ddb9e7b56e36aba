"""LoRA and QLoRA: zero-initialised adapters leave the model unchanged; logits and gradients equal peft's LoRA on
transformers' Mllama with the same adapter weights; training moves the adapters only, resumes exactly, and the
loss falls with an int8 base; the peft export loads in peft with the same logits, and inference merges adapters."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx

from llava_cot_jax import checkpoint as weights
from llava_cot_jax import loading
from llava_cot_jax.data import synthetic
from llava_cot_jax.models.mllama import lora, peft_format
from llava_cot_jax.models.mllama.hf_reference import (
    build_hf_model,
    hf_logits,
    parity_config,
    random_inputs,
    save_hf_checkpoint,
)
from llava_cot_jax.models.mllama.params import from_hf
from llava_cot_jax.train import config as train_config
from llava_cot_jax.train import loss as loss_lib
from llava_cot_jax.train import step as step_lib
from llava_cot_jax.train import trainer as trainer_lib

RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("xla"))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield path
    jax.config.update("jax_compilation_cache_dir", None)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny random transformers Mllama (GQA, a cross-attention layer) on disk and ours loaded from it, scanned.
    The reference side is `build_hf_model(config, seed=1)` again: reloading the directory with transformers would
    tap the vision encoder at 4.45's indices (see hf_reference)."""
    config = parity_config()
    path = save_hf_checkpoint(build_hf_model(config, seed=1), config, str(tmp_path_factory.mktemp("hf") / "base"))
    ours = from_hf(path, scan_layers=True)
    return config, path, ours


def random_adapters(state, targets=lora.DEFAULT_TARGETS, seed=3):
    """Adapters with a non-zero B, so the low-rank branch changes the output."""
    specs = lora.adapter_specs(state, lora.target_paths(state, targets), RANK)
    adapters = lora.init_adapters(specs, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 1000))
    return jax.tree.map(lambda x: 0.1 * jax.random.normal(next(keys), x.shape), adapters)


def run(graphdef, state, params, fn):
    """fn(the model with `params`), jitted (eager op-by-op dispatch of the tiny model is what costs time here)."""

    def call(p):
        filled = jax.tree.map(lambda x: x, state)
        nnx.replace_by_pure_dict(filled, p)
        return fn(nnx.merge(graphdef, filled))

    return jax.jit(call)(params)


def labelled(inputs, config, supervised_from=4):
    labels = np.where(inputs["attention_mask"] == 1, inputs["input_ids"], -100)
    labels[:, :supervised_from] = -100
    labels[labels == config.image_token_id] = -100
    return {**inputs, "labels": labels}


def peft_model(config, targets_paths):
    hf = build_hf_model(config, seed=1)
    target = peft_format.target_regex(config, targets_paths)
    return peft.get_peft_model(hf, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=target))


def test_zero_b_is_the_base_model(pair):
    config, _, ours = pair
    graphdef, state = nnx.split(ours)
    params = nnx.to_pure_dict(state)
    specs = lora.adapter_specs(state, lora.target_paths(state, lora.DEFAULT_TARGETS), RANK)
    adapters = lora.init_adapters(specs, jax.random.key(0))
    assert all(np.any(ab["a"] != 0) and not np.any(ab["b"]) for ab in lora.flatten(adapters).values())
    inputs = random_inputs(config, np.random.default_rng(0), 2, 12, [1, 1], [[2], [1]])
    base = run(graphdef, state, params, lambda m: m(**inputs).logits)
    adapted = run(
        graphdef, state, lora.apply(params, adapters, lora.LoraConfig(RANK, ALPHA)), lambda m: m(**inputs).logits
    )
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(base))


def test_logits_and_gradients_equal_peft(pair):
    """Self- and cross-attention q/k/v/o and both MLPs adapted; two images per row, multi-tile, right padding."""
    config, path, ours = pair
    graphdef, state = nnx.split(ours)
    params = nnx.to_pure_dict(state)
    adapters = random_adapters(state)
    lora_config = lora.LoraConfig(RANK, ALPHA)
    reference = peft_model(config, sorted(lora.flatten(adapters)))
    tensors = peft_format.peft_tensors(config, adapters)
    result = reference.load_state_dict(
        {k.replace(".weight", ".default.weight"): torch.as_tensor(v) for k, v in tensors.items()}, strict=False
    )
    assert not result.unexpected_keys
    assert sum("lora_" in n for n, _ in reference.named_parameters()) == len(tensors)

    inputs = random_inputs(config, np.random.default_rng(5), 2, 14, [2, 2], [[2, 4], [3, 1]], pad_right=[0, 4])
    batch = labelled(inputs, config)
    reference.zero_grad()
    out = reference(**{k: torch.as_tensor(v) for k, v in batch.items()})
    out.loss.backward()
    ref_logits = out.logits.detach().numpy()
    ref_grads = {
        n.replace(".default.weight", ".weight"): p.grad.numpy()
        for n, p in reference.named_parameters()
        if "lora_" in n and p.grad is not None
    }

    def loss(a):
        return run(graphdef, state, lora.apply(params, a, lora_config), lambda m: loss_lib.loss_fn(m, batch, 5))[0]

    logits = run(graphdef, state, lora.apply(params, adapters, lora_config), lambda m: m(**inputs).logits)
    base_logits = run(graphdef, state, params, lambda m: m(**inputs).logits)
    assert float(np.abs(np.asarray(base_logits) - ref_logits).max()) > 0.1  # the adapters matter
    np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=1e-5, rtol=0)

    value, grads = jax.jit(jax.value_and_grad(loss))(adapters)
    assert abs(float(value) - out.loss.item()) < 1e-5
    ours_peft = peft_format.peft_tensors(config, jax.device_get(grads))
    assert set(ours_peft) == set(ref_grads)
    scale = max(float(np.abs(g).max()) for g in ref_grads.values())
    worst = max((float(np.abs(ours_peft[n] - g).max()), n) for n, g in ref_grads.items())
    assert worst[0] <= 1e-5 * max(scale, 1.0), worst
    cross = [n for n in ref_grads if "cross_attn.k_proj.lora_A" in n]
    assert cross and np.abs(ref_grads[cross[0]]).max() > 1e-6  # the image reaches the cross-attention adapters


def test_peft_export_loads_in_peft_and_inference_merges(pair, tmp_path):
    """Adapters written in peft's format load with PeftModel.from_pretrained and give our adapted logits; the same
    directory as model.adapter (merged at load) gives them too, and so does the merged checkpoint."""
    config, path, ours = pair
    graphdef, state = nnx.split(ours)
    params = nnx.to_pure_dict(state)
    adapters = jax.device_get(random_adapters(state, targets="q_proj,cross_layers.o_proj,mlp.down_proj"))
    lora_config = lora.LoraConfig(RANK, ALPHA)
    out = peft_format.write(str(tmp_path / "peft"), config, adapters, lora_config, sorted(lora.flatten(adapters)))
    assert sorted(os.listdir(out)) == [peft_format.CONFIG_NAME, peft_format.WEIGHTS_NAME]

    inputs = random_inputs(config, np.random.default_rng(7), 2, 12, [1, 1], [[2], [1]])
    expected = np.asarray(run(graphdef, state, lora.apply(params, adapters, lora_config), lambda m: m(**inputs).logits))
    loaded = peft.PeftModel.from_pretrained(build_hf_model(config, seed=1), out).eval()
    np.testing.assert_allclose(hf_logits(loaded, inputs), expected, atol=1e-5, rtol=0)

    model_cfg = loading.config_schema.model_group()
    model_cfg.weights, model_cfg.adapter, model_cfg.dtype = path, out, "float32"
    merged = loading.load_model(model_cfg)
    np.testing.assert_allclose(np.asarray(merged(**inputs).logits), expected, atol=1e-5, rtol=0)

    read, read_config = peft_format.read(out, config, state)
    assert read_config == lora_config
    for ab, ab_read in zip(lora.flatten(adapters).values(), lora.flatten(read).values()):
        np.testing.assert_array_equal(ab["a"], ab_read["a"])
        np.testing.assert_array_equal(ab["b"], ab_read["b"])


# ---------------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return synthetic.write_synthetic_dataset(tmp_path_factory.mktemp("data") / "synth", 32, image_size=56)


def lora_config(data_dir, **overrides):
    """sft_tiny's runlocal with rank-4 adapters, dropout on (the resumed random stream is checked with it)."""
    c = train_config.runlocal(train_config.default_config())
    c.data.train = str(data_dir)
    c.data.synthetic_samples = 0
    c.compilation_cache = ""
    c.train.lora.rank = RANK
    c.train.lora.dropout = 0.1
    c.optimizer.learning_rate = 1e-2
    c.optimizer.schedule = "constant"
    c.checkpointing.async_save = False
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return c


def read_losses(workdir):
    import json

    with open(os.path.join(workdir, trainer_lib.METRICS_FILE)) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_only_adapters_train_and_the_model_stays_bit_identical(scenes, tmp_path, xla_cache):
    config = lora_config(scenes.jsonl_path.parent)
    trainer = trainer_lib.Trainer(config, str(tmp_path / "run"))
    params = loading.initial_params(config.model, trainer.model_config, seed=0)
    state = step_lib.init_state(trainer.spec, params, seed=0)
    adapter_count = sum(x.size for x in jax.tree.leaves(state["params"]))
    assert adapter_count < 0.1 * sum(x.size for x in jax.tree.leaves(state["frozen"]))
    assert sum(x.size for x in jax.tree.leaves(state["opt_state"])) <= 2 * adapter_count + 8  # moments of adapters
    train_step = step_lib.jit_train_step(trainer.spec)
    iterator = iter(trainer._dataset(trainer.source, train=True))
    frozen_before = jax.device_get(state["frozen"])
    adapters_before = jax.device_get(state["params"])
    for _ in range(2):
        state, _ = train_step(state, trainer._device_batch(next(iterator)))
    frozen_after = jax.device_get(state["frozen"])
    for before, after in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen_after)):
        np.testing.assert_array_equal(before, after)
    # A random init's cross-attention gates are 0 (as a fresh Llama-3.2-Vision's): nothing after them reaches the
    # loss, so their adapters get no gradient. Every self-attention layer's A and B moves.
    adapters_after = lora.flatten(jax.device_get(state["params"]))
    for path, ab in lora.flatten(adapters_before).items():
        for key in ab:
            moved = not np.array_equal(ab[key], adapters_after[path][key])
            assert moved == (path[1] == "self_layers"), (path, key)
    trainer.manager.close()


def test_resume_equals_an_uninterrupted_run(scenes, tmp_path, xla_cache):
    data = scenes.jsonl_path.parent
    straight = str(tmp_path / "straight")
    assert trainer_lib.Trainer(lora_config(data, **{"train.num_steps": 4}), straight).train() == 0
    interrupted = str(tmp_path / "interrupted")
    assert trainer_lib.Trainer(lora_config(data, **{"train.num_steps": 2}), interrupted).train() == 0
    assert trainer_lib.Trainer(lora_config(data, **{"train.num_steps": 4}), interrupted).train() == 0
    assert read_losses(interrupted) == read_losses(straight)
    step_dir = os.path.join(interrupted, "checkpoints", "4")
    assert "adapters" in os.listdir(step_dir) and "params" not in os.listdir(step_dir)  # adapters only

    # The step directory exports to peft and merges into the base for inference.
    arch = weights.load_config(step_dir)
    adapters, settings = loading.read_adapter(step_dir, arch)
    assert settings.rank == RANK and len(lora.flatten(adapters)) == 14
    peft_dir = loading.export_adapter(step_dir, str(tmp_path / "peft"))
    assert os.path.isfile(os.path.join(peft_dir, peft_format.WEIGHTS_NAME))


def test_qlora_runs_and_the_loss_falls(scenes, tmp_path, xla_cache):
    config = lora_config(scenes.jsonl_path.parent, **{"model.quantize": "int8", "train.num_steps": 6})
    trainer = trainer_lib.Trainer(config, str(tmp_path / "qlora"))
    assert trainer.train() == 0
    losses = read_losses(str(tmp_path / "qlora"))
    assert losses[6] < losses[1] - 0.05, losses
    abstract = step_lib.abstract_state(trainer.spec)
    frozen = jax.tree.leaves(abstract["frozen"])
    assert any(x.dtype == jnp.int8 for x in frozen)  # the decoder's matrices are int8


def test_bad_settings_are_one_clear_error(scenes, tmp_path):
    data = scenes.jsonl_path.parent
    with pytest.raises(ValueError, match="needs train.lora"):
        trainer_lib.Trainer(lora_config(data, **{"train.lora.rank": 0, "model.quantize": "int8"}), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="matches no adaptable weight"):
        trainer_lib.Trainer(lora_config(data, **{"train.lora.targets": "lm_head"}), str(tmp_path / "b"))


def test_adapters_given_as_model_weights_are_one_clear_error(scenes, tmp_path, xla_cache, tiny_checkpoint):
    """A LoRA run's checkpoint or its peft export holds adapters only: as model.weights, one error says to load it
    as model.adapter and names the base the run trained on; loaded that way, it works."""
    config = lora_config(scenes.jsonl_path.parent, **{"model.weights": tiny_checkpoint, "train.num_steps": 1})
    run_dir = str(tmp_path / "run")
    assert trainer_lib.Trainer(config, run_dir).train() == 0
    step_dir = os.path.join(run_dir, "checkpoints", "1")
    peft_dir = loading.export_adapter(step_dir, str(tmp_path / "peft"))

    model_cfg = loading.config_schema.model_group()
    model_cfg.dtype = "float32"
    for adapter in (step_dir, peft_dir):
        model_cfg.weights = adapter
        with pytest.raises(ValueError, match="holds LoRA adapters, not a model") as error:
            loading.load_model(model_cfg)
        assert f"Load it as model.adapter={adapter}," in str(error.value)
    model_cfg.weights = step_dir  # the run's DIR/config.json names its base
    with pytest.raises(ValueError, match=re.escape(f"has model.weights={tiny_checkpoint})")):
        loading.load_model(model_cfg)

    model_cfg.weights, model_cfg.adapter = tiny_checkpoint, step_dir
    assert loading.load_model(model_cfg).config.text.vocab_size > 0  # the advice works
