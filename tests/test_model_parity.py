"""Logits parity with transformers' MllamaForConditionalGeneration on tiny random models (fp32 and bf16)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llava_cot_jax.models.mllama.config import MllamaConfig
from llava_cot_jax.models.mllama.hf_reference import (
    PARITY_CASES,
    build_hf_model,
    hf_logits,
    parity_config,
    random_inputs,
    save_hf_checkpoint,
)
from llava_cot_jax.models.mllama.model import MllamaForConditionalGeneration
from llava_cot_jax.models.mllama.params import from_hf
from llava_cot_jax.models.mllama.text import layer_schedule
from llava_cot_jax.train import loss as loss_lib

FP32_TOL = 1e-4


@nnx.jit
def _logits(model, inputs):
    return model(**inputs).logits


class Pair:
    """A transformers model and the same weights loaded through our HF loader."""

    def __init__(self, config, tmp_path, dtype="float32"):
        self.config = config
        self.hf = build_hf_model(config, seed=1)
        path = save_hf_checkpoint(self.hf, config, str(tmp_path / "hf"))
        self.ours = from_hf(path, dtype=dtype)

    def max_diff(self, inputs, valid=None):
        ref = hf_logits(self.hf, inputs)
        ours = np.asarray(_logits(self.ours, {k: v for k, v in inputs.items() if v is not None}))
        assert ours.shape == ref.shape
        diff = np.abs(ours - ref)
        return float(diff[valid].max() if valid is not None else diff.max()), float(np.abs(ref).max())


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return Pair(parity_config(), tmp_path_factory.mktemp("pair"))


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_fp32_parity(pair, case):
    batch, seq, images, tiles, pad = PARITY_CASES[case]
    inputs = random_inputs(pair.config, np.random.default_rng(7), batch, seq, images, tiles, pad_right=pad)
    diff, scale = pair.max_diff(inputs, valid=inputs["attention_mask"].astype(bool))
    assert scale > 0.1  # logits are not trivially small
    assert diff <= FP32_TOL, f"{case}: max |dlogits| {diff:.2e}"


def test_text_only_skips_cross_attention(pair):
    inputs = random_inputs(pair.config, np.random.default_rng(3), 2, 9, [0, 0], [[], []])
    text_only = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    diff, _ = pair.max_diff(text_only)
    assert diff <= FP32_TOL


def test_images_change_the_logits(pair):
    """Guards the parity tests against a silently ignored vision path."""
    inputs = random_inputs(pair.config, np.random.default_rng(5), 1, 10, [1], [[4]])
    with_image = np.asarray(_logits(pair.ours, inputs))
    inputs["pixel_values"] = inputs["pixel_values"] * 0.5
    assert np.abs(with_image - np.asarray(_logits(pair.ours, inputs))).max() > 1e-3


@pytest.mark.parametrize("kv_heads", [4, 1])  # GQA ratios 1 and 4 (the shared fixture covers 2)
def test_gqa_ratios(kv_heads, tmp_path):
    p = Pair(parity_config(kv_heads=kv_heads), tmp_path)
    inputs = random_inputs(p.config, np.random.default_rng(11), 2, 10, [1, 1], [[2], [4]], pad_right=[0, 2])
    diff, _ = p.max_diff(inputs, valid=inputs["attention_mask"].astype(bool))
    assert diff <= FP32_TOL


def test_irregular_cross_layer_pattern(tmp_path):
    config = parity_config(cross_layers=(0, 2, 3), layers=6)
    assert layer_schedule(config.text)[0] == "irregular"
    p = Pair(config, tmp_path)
    inputs = random_inputs(p.config, np.random.default_rng(2), 1, 10, [1], [[3]])
    diff, _ = p.max_diff(inputs)
    assert diff <= FP32_TOL


def test_periodic_schedule_of_the_real_models():
    assert layer_schedule(MllamaConfig.llama_11b().text) == ("periodic", 3, 5, 8)
    assert layer_schedule(MllamaConfig.llama_90b().text) == ("periodic", 3, 5, 20)


def test_bf16_parity(pair, tmp_path):
    """bf16 weights and activations against the fp32 reference.

    bf16 keeps 8 significand bits: each rounding of weights and activations is off by up to 2^-9 ~ 2e-3
    relative. Roughly a dozen roundings compound along the path to a logit (weights, each residual add,
    norm outputs, attention probabilities), so errors of ~1% of the logit scale are expected; measured
    0.6-1.0% on every parity case (benchmarks/parity_table.py). The bound is 3% of the largest |logit|,
    3x that, and the argmax must agree on at least 90% of positions."""
    path = save_hf_checkpoint(pair.hf, pair.config, str(tmp_path / "hf"))
    bf16 = from_hf(path, dtype="bfloat16")
    inputs = random_inputs(pair.config, np.random.default_rng(9), 2, 12, [1, 1], [[4], [2]])
    ref = hf_logits(pair.hf, inputs)
    ours = np.asarray(_logits(bf16, inputs)).astype(np.float32)
    assert jax.tree.leaves(nnx.state(bf16, nnx.Param))[0].dtype == jnp.bfloat16
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel < 0.03, rel
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_attention_in_query_blocks(pair):
    """`attention_chunk` (blocks of 4 queries; 14 tokens pad to 16) gives the reference's logits and the unchunked
    model's gradients, through both attention kinds, two images and right padding."""
    config = pair.ours.config.replace(attention_chunk=4, remat="full")
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: MllamaForConditionalGeneration(config, rngs=nnx.Rngs(0))))
    chunked = nnx.merge(graphdef, nnx.state(pair.ours))
    inputs = random_inputs(pair.config, np.random.default_rng(4), 2, 14, [2, 1], [[2, 3], [4]], pad_right=[0, 3])
    valid = inputs["attention_mask"].astype(bool)
    ref = hf_logits(pair.hf, inputs)
    assert np.abs(np.asarray(_logits(chunked, inputs)) - ref)[valid].max() <= FP32_TOL

    labels = np.where(valid, inputs["input_ids"], -100)
    labels[labels == config.image_token_id] = -100
    batch = {**inputs, "labels": labels}

    @nnx.jit
    def grads(model):
        return nnx.grad(lambda m: loss_lib.loss_fn(m, batch, 5)[0])(model)

    want, got = grads(pair.ours), grads(chunked)
    for path, g in nnx.to_flat_state(got):
        w = dict(nnx.to_flat_state(want))[path]
        np.testing.assert_allclose(np.asarray(g.get_value()), np.asarray(w.get_value()), atol=1e-6, err_msg=str(path))
