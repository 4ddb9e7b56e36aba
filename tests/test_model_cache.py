"""Cached decoding primitives agree with the full forward pass, and the full-size presets build abstractly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from llava_cot_jax.models.mllama.config import MllamaConfig
from llava_cot_jax.models.mllama.hf_reference import hf_config, random_inputs
from llava_cot_jax.models.mllama.model import MllamaForConditionalGeneration, count_params, take_rows


@pytest.fixture(scope="module")
def model():
    return MllamaForConditionalGeneration(MllamaConfig.tiny(), rngs=nnx.Rngs(3))


def _perturb_gates(model):
    """Random init leaves cross-attention gates at zero; give them weight so the test sees the image."""
    cross = model.language_model.cross_layers
    cross.cross_attn_attn_gate[...] = jnp.full_like(cross.cross_attn_attn_gate[...], 0.8)
    cross.cross_attn_mlp_gate[...] = jnp.full_like(cross.cross_attn_mlp_gate[...], -0.6)


def test_prefill_then_decode_matches_full_forward(model):
    """Left-padded rows: prefill a prompt into the cache, then feed the rest one token at a time."""
    _perturb_gates(model)
    cfg = model.config
    rng = np.random.default_rng(0)
    inputs = random_inputs(cfg, rng, 2, 12, [1, 1], [[2], [4]])
    ids, cross = inputs["input_ids"], inputs["cross_attention_mask"]
    # Row 1 is left-padded by 3 slots.
    pad = 3
    mask = np.ones_like(ids)
    mask[1, :pad] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)

    full = model(
        ids,
        attention_mask=mask,
        pixel_values=inputs["pixel_values"],
        aspect_ratio_ids=inputs["aspect_ratio_ids"],
        aspect_ratio_mask=inputs["aspect_ratio_mask"],
        cross_attention_mask=cross,
        position_ids=positions,
    ).logits

    vision = model.encode_images(inputs["pixel_values"], inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"])
    cross_kv = model.cross_kv(vision)
    max_len, prompt = 16, 8
    cache = model.init_cache(2, max_len)
    key_valid = np.zeros((2, max_len), bool)
    key_valid[:, :prompt] = mask[:, :prompt]
    step = jax.jit(model.forward_cached)
    logits, cache = step(ids[:, :prompt], positions[:, :prompt], cache, 0, key_valid, cross_kv, cross[:, :prompt])
    got = [logits]
    for t in range(prompt, ids.shape[1]):
        key_valid[:, t] = True
        logits, cache = step(
            ids[:, t : t + 1], positions[:, t : t + 1], cache, t, key_valid, cross_kv, cross[:, t : t + 1]
        )
        got.append(logits)
    got = np.concatenate([np.asarray(g) for g in got], axis=1)
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], np.asarray(full)[valid], atol=1e-5, rtol=1e-5)


def test_rows_sharing_image_kv_match_rows_with_copies(model):
    """3 rows per image read one copy of its K/V (stage search's candidates) = each row with its own copy."""
    _perturb_gates(model)
    cfg = model.config
    inputs = random_inputs(cfg, np.random.default_rng(1), 2, 10, [1, 1], [[3], [2]])
    kv = model.cross_kv(
        model.encode_images(inputs["pixel_values"], inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"])
    )
    rows = np.repeat(np.arange(2), 3)
    ids = np.random.default_rng(2).integers(0, cfg.text.vocab_size, (6, 10))
    ids[:, 0] = cfg.image_token_id
    xmask = inputs["cross_attention_mask"][rows]
    xmask[1, :4] = 0  # rows of one group may see different tiles
    valid = np.ones((6, 10), bool)
    positions = np.broadcast_to(np.arange(10), (6, 10))
    run = lambda kv: model.forward_cached(ids, positions, model.init_cache(6, 10), 0, valid, kv, xmask)[0]
    shared, copied = run(kv), run(take_rows(kv, jnp.asarray(rows)))
    np.testing.assert_allclose(np.asarray(shared), np.asarray(copied), atol=1e-5, rtol=1e-5)
    assert not np.allclose(np.asarray(shared[0]), np.asarray(shared[1]), atol=1e-3)  # row 1's mask mattered
    with pytest.raises(ValueError, match="cannot share"):
        run(take_rows(kv, jnp.asarray([0, 1, 0, 1])))


def test_text_only_cache_skips_cross_layers(model):
    ids = np.arange(1, 7)[None]
    full = model(ids).logits
    cache = model.init_cache(1, 8)
    valid = np.zeros((1, 8), bool)
    valid[:, :6] = True
    logits, _ = model.forward_cached(ids, np.arange(6)[None], cache, 0, valid)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full), atol=1e-5)


def _hf_param_count(config: MllamaConfig) -> int:
    with torch.device("meta"):
        model = transformers.MllamaForConditionalGeneration(hf_config(config))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset, expected", [("llama_11b", 10_670_220_835), ("llama_90b", None)])
def test_full_size_presets_build_abstractly(preset, expected):
    config = getattr(MllamaConfig, preset)(param_dtype="bfloat16")
    abstract = nnx.eval_shape(lambda: MllamaForConditionalGeneration(config, rngs=nnx.Rngs(0)))
    ours = count_params(abstract)
    assert ours == _hf_param_count(config)
    if expected is not None:
        assert ours == expected
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) and x.dtype == jnp.bfloat16 for x in leaves)


def test_every_parameter_has_logical_axes(model):
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var[...].ndim, (path, names)


@pytest.mark.parametrize("cross_layers, layers", [((3,), 5), ((0, 2, 3), 6)])
def test_unscanned_layers_compute_the_same(cross_layers, layers):
    """scan_layers=False (a Python loop over per-layer weights, for decoding) is the same function."""
    import dataclasses

    from llava_cot_jax.models.mllama.layout import model_params, with_scan_layers

    cfg = MllamaConfig.tiny()
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, cross_attention_layers=cross_layers, num_hidden_layers=layers))
    scanned = MllamaForConditionalGeneration(cfg, rngs=nnx.Rngs(1))
    _perturb_gates(scanned)
    looped = with_scan_layers(scanned, False)
    assert not looped.config.scan_layers and isinstance(looped.language_model.self_layers, nnx.List)
    inputs = random_inputs(cfg, np.random.default_rng(4), 2, 10, [1, 2], [[3], [1, 2]])
    forward = nnx.jit(lambda m, x: m(**x).logits)
    np.testing.assert_allclose(np.asarray(forward(looped, inputs)), np.asarray(forward(scanned, inputs)), atol=1e-6)
    vision = scanned.encode_images(inputs["pixel_values"], inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"])
    looped_kv, scanned_kv = looped.cross_kv(vision), scanned.cross_kv(vision)
    for name in ("k", "v"):  # unscanned: one [B, K, N, hd] array per layer; scanned: stacked [layers, ...]
        np.testing.assert_allclose(np.stack(looped_kv[name]), np.asarray(scanned_kv[name]), atol=1e-6)
    back = model_params(looped)
    assert all(np.array_equal(np.asarray(v), np.asarray(back[k])) for k, v in model_params(scanned).items())
