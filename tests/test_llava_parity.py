"""The llava family (LLaVA-1.5) against transformers' LlavaForConditionalGeneration: logits of tiny random models
in fp32, conversion of their checkpoints, and full-size parameter counts."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from llava_cot_jax.models.llava import hf_reference, params
from llava_cot_jax.models.llava.config import LlavaConfig
from llava_cot_jax.models.llava.model import LlavaForConditionalGeneration
from llava_cot_jax.models.mllama import layout
from llava_cot_jax.models.mllama.model import count_params


@pytest.fixture(scope="module")
def tiny():
    """(config, transformers model, its checkpoint directory, our model loaded from that directory)."""
    config = LlavaConfig.tiny()
    hf_model = hf_reference.build_hf_model(config)
    return config, hf_model


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
    config, hf_model = tiny
    path = str(tmp_path_factory.mktemp("llava_hf"))
    hf_model.save_pretrained(path)
    return path


@pytest.mark.parametrize("case", sorted(hf_reference.PARITY_CASES))
@pytest.mark.parametrize("scan_layers", [True, False])
def test_logits_match_transformers(tiny, tiny_dir, case, scan_layers):
    config, hf_model = tiny
    ours = params.from_hf(tiny_dir, scan_layers=scan_layers)
    seq, images, starts, pad = hf_reference.PARITY_CASES[case]
    inputs = hf_reference.random_inputs(config, np.random.default_rng(len(case)), seq, images, starts, pad)
    with torch.no_grad():
        want = hf_model(**{k: torch.as_tensor(v) for k, v in inputs.items() if v is not None}).logits.numpy()
    got = np.asarray(ours(**inputs).logits)
    valid = inputs["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-4, rtol=1e-4)


def test_image_token_count_must_match_the_images(tiny, tiny_dir):
    config, _ = tiny
    ours = params.from_hf(tiny_dir)
    inputs = hf_reference.random_inputs(config, np.random.default_rng(0), 12, [1], [[2]])
    inputs["input_ids"][0, 2] = 5  # one image token fewer than the image's features
    with pytest.raises(ValueError, match=f"{config.image_tokens - 1} image tokens"):
        ours(**inputs)


def test_checkpoint_round_trip_is_bit_exact(tiny, tiny_dir):
    config, hf_model = tiny
    loaded = params.load_hf_params(tiny_dir, config)
    exported = dict(params.hf_tensors(loaded, config))
    state = {params.hub_name(k): v.numpy() for k, v in hf_model.state_dict().items()}
    assert sorted(exported) == sorted(state)
    for name, value in exported.items():
        np.testing.assert_array_equal(value, state[name], err_msg=name)
    model = layout.model_from_params(config, loaded, None, LlavaForConditionalGeneration)
    again = layout.model_params(model)
    assert all(np.array_equal(np.asarray(again[k]), loaded[k]) for k in loaded)


@pytest.mark.parametrize("preset", ["llava15_7b", "llava15_13b"])
def test_full_size_parameter_counts_equal_transformers(preset):
    config = getattr(LlavaConfig, preset)()
    abstract = nnx.eval_shape(lambda: LlavaForConditionalGeneration(config, rngs=nnx.Rngs(0)))
    with torch.device("meta"):
        hf_model = transformers.LlavaForConditionalGeneration(hf_reference.hf_config(config))
    assert count_params(abstract) == sum(p.numel() for p in hf_model.parameters())


def test_hf_config_round_trip(tiny_dir):
    config = LlavaConfig.from_hf_config(tiny_dir)
    assert config == LlavaConfig.tiny()
    assert LlavaConfig.from_json(config.to_json()) == config


def test_orbax_conversion_both_ways_loads_in_transformers(tiny, tiny_dir, tmp_path):
    """HF -> our checkpoint -> HF: bit-exact tensors, the same logits from our loader and from transformers'."""
    from safetensors.numpy import load_file

    from llava_cot_jax import checkpoint

    config, hf_model = tiny
    ours_dir = checkpoint.convert_hf_to_orbax(tiny_dir, str(tmp_path / "orbax"), progress=False)
    assert checkpoint.load_config(ours_dir) == config
    back = checkpoint.export_to_hf(ours_dir, str(tmp_path / "hf"), progress=False)
    original = {params.hub_name(k): v for k, v in load_file(f"{tiny_dir}/model.safetensors").items()}
    exported = {}
    for file in sorted(f for f in os.listdir(back) if f.endswith(".safetensors")):
        exported.update(load_file(f"{back}/{file}"))
    assert sorted(exported) == sorted(original)
    for name, value in exported.items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)

    inputs = hf_reference.random_inputs(config, np.random.default_rng(1), 12, [1], [[3]])
    reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(back).eval()
    with torch.no_grad():
        want = reloaded(**{k: torch.as_tensor(v) for k, v in inputs.items()}).logits.numpy()
    got = np.asarray(checkpoint.load_model(ours_dir, scan_layers=False)(**inputs).logits)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_greedy_generation_matches_transformers(tiny, tiny_dir):
    """Left-padded prompts with an image each, greedy, through the Sampler's cached decoding."""
    from llava_cot_jax.generate.sampler import generate

    config, hf_model = tiny
    rng = np.random.default_rng(7)
    seq, n = 11, config.image_tokens
    ids = rng.integers(0, config.image_token_id - 2, size=(2, seq))
    mask = np.ones((2, seq), np.int64)
    ids[0, 2 : 2 + n] = config.image_token_id
    ids[1, :3], mask[1, :3] = config.text.pad_token_id, 0  # left padding, as generation wants
    ids[1, 4 : 4 + n] = config.image_token_id
    pixels = rng.standard_normal((2, 1, 3, config.vision.image_size, config.vision.image_size)).astype(np.float32)

    with torch.no_grad():
        want = hf_model.generate(
            input_ids=torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            pixel_values=torch.as_tensor(pixels[:, 0]),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=config.text.pad_token_id,
            eos_token_id=list(config.text.eos_token_id),
        ).numpy()[:, seq:]
    ours = params.from_hf(tiny_dir, scan_layers=False)
    got = generate(ours, ids, mask, pixel_values=pixels, max_new_tokens=12)[:, seq:]
    assert got.shape[1] >= 6  # the comparison covers real decoding, not an immediate EOS
    np.testing.assert_array_equal(got, want[:, : got.shape[1]])


@pytest.mark.parametrize("layout", ["transformers", "per_row"])
def test_loss_and_gradients_equal_transformers(tiny, tiny_dir, layout):
    """Images in two rows of a right-padded batch, answers labelled; pixel values in transformers' flat layout or
    the training pipeline's per-row one (row 2 holds a padding image slot that no token reads)."""
    import jax

    from llava_cot_jax.train import loss as loss_lib

    config, hf_model = tiny
    inputs = hf_reference.random_inputs(config, np.random.default_rng(3), 16, [1, 2], [[1], [1, 8]], [0, 3])
    labels = np.where(inputs["attention_mask"] == 1, inputs["input_ids"], -100)
    labels[inputs["input_ids"] == config.image_token_id] = -100
    labels[:, :6] = -100  # the prompt part
    batch = {**inputs, "labels": labels}

    hf_model.zero_grad()
    ref = hf_model(**{k: torch.as_tensor(v) for k, v in batch.items()})
    ref.loss.backward()
    ref_grads = {params.hub_name(n): p.grad.numpy() for n, p in hf_model.named_parameters() if p.grad is not None}

    if layout == "per_row":  # [B, I, 3, H, W]: row 0's one image and an all-zero slot, row 1's two images
        pixels = inputs["pixel_values"]
        batch["pixel_values"] = np.stack([np.stack([pixels[0], np.zeros_like(pixels[0])]), pixels[1:3]])
    graphdef, state = nnx.split(params.from_hf(tiny_dir))
    (loss, _), grads = jax.value_and_grad(
        lambda s: loss_lib.loss_fn(nnx.merge(graphdef, s), batch, chunk_size=5), has_aux=True
    )(state)
    assert abs(float(loss) - ref.loss.item()) < 1e-5
    flat = {tuple(str(k) for k in path): np.asarray(v) for path, v in nnx.to_flat_state(grads)}
    ours = dict(params.hf_tensors(flat, config))
    scale = max(float(np.abs(g).max()) for g in ref_grads.values())
    worst = max((float(np.abs(ours[n] - g).max()), n) for n, g in ref_grads.items())
    assert worst[0] <= 1e-5 * max(scale, 1.0), worst
    for name in ("vision_tower.vision_model.embeddings.class_embedding", "multi_modal_projector.linear_1.weight"):
        assert np.abs(ref_grads[name]).max() > 1e-6  # the image path receives gradient
