"""Generation and stage search on a device mesh equal the single-device results (8 simulated CPU devices).

Runs in a subprocess: the device count is fixed when XLA starts. A tiny model with 4 query heads and 2 kv heads:
on tensor=2 the kv heads are split, on tensor=4 they are replicated (4 query heads, 2 kv heads).
"""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np, PIL.Image
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    from llava_cot_jax.models.mllama.hf_reference import random_inputs
    from llava_cot_jax import sharding
    from llava_cot_jax.data.image import MllamaImageProcessor
    from llava_cot_jax.data.processor import MllamaProcessor
    from llava_cot_jax.data.tokenizer import build_tiny_tokenizer
    from llava_cot_jax.generate import sampler as S
    from llava_cot_jax.generate import stage_search as SS
    from llava_cot_jax.models.mllama.config import MllamaConfig
    from llava_cot_jax.models.mllama.model import MllamaForConditionalGeneration

    cfg = MllamaConfig.tiny(scan_layers=False)
    model = MllamaForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
    cross = model.language_model.cross_layers  # zero-initialised gates would hide the image path
    for layer in cross:
        layer.cross_attn_attn_gate[...] = jnp.full((1,), 0.7)
        layer.cross_attn_mlp_gate[...] = jnp.full((1,), -0.6)
    rng = np.random.default_rng(0)
    inputs = random_inputs(cfg, rng, 2, 12, [1, 1], [[3], [2]])
    image_processor = MllamaImageProcessor(size=cfg.vision.image_size, max_image_tiles=4)
    processor = MllamaProcessor(image_processor, build_tiny_tokenizer())
    image = PIL.Image.fromarray((rng.random((30, 56, 3)) * 255).astype(np.uint8))
    search = SS.SearchConfig(
        num_candidates=4, stage_max_new_tokens=6, judge_max_new_tokens=4, judge_bucket_step=128, seed=3
    )
    questions = ["How many cubes are there?", "What color is the car?"]

    def rounded(tree):  # tensor-parallel sums round differently: log-probabilities agree to ~1e-6, not bit for bit
        if isinstance(tree, dict):
            return {{k: rounded(v) for k, v in tree.items()}}
        if isinstance(tree, list):
            return [rounded(v) for v in tree]
        return float(f"{{tree:.5g}}") if isinstance(tree, float) else tree

    def run(mesh):
        sampler = S.Sampler(model, mesh=mesh)
        greedy = S.generate(model, **inputs, max_new_tokens=48, eos_token_id=None, sampler=sampler)
        searcher = SS.Searcher(model, processor, search, mesh=mesh)
        searcher.sampler.eos_token_ids = ()
        return sampler, greedy, rounded([r.as_dict() for r in searcher.ask(questions, [[image], [image]])])

    _, greedy, results = run(None)
    assert len({{r["text"] for r in results}}) == 2 and greedy.shape == (2, 12 + 48)

    def placed(x, *spec):  # equivalence, not spec equality: XLA drops mesh axes of size 1 from specs it returns
        assert x.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, P(*spec)), x.ndim), (x.sharding, spec)
        return True

    rows = ("data", "fsdp")
    for data, tensor in ((1, 2), (1, 4), (2, 4)):
        mesh = sharding.make_mesh(data=data, fsdp=1, tensor=tensor, devices=jax.devices()[: data * tensor])
        sampler, got, got_results = run(mesh)
        np.testing.assert_array_equal(got, greedy)
        assert got_results == results, (data, tensor)

        kv = "tensor" if tensor == 2 else None  # 2 kv heads: split on tensor=2, replicated on tensor=4
        params = nnx.merge(sampler.graphdef, sampler.params).language_model
        layer = params.self_layers[0]
        assert placed(layer.q_proj[...], "fsdp", "tensor", None) and placed(layer.k_proj[...], "fsdp", kv, None)
        assert placed(layer.mlp.down_proj[...], "tensor", "fsdp") and placed(params.lm_head[...], "fsdp", "tensor")
        pixels = (inputs["pixel_values"], inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"])
        cross_kv = sampler.encode_images(*pixels)
        assert placed(cross_kv["k"][0], rows, kv, None, None)  # one per cross-attention layer
        state = sampler.prefill(inputs["input_ids"], inputs["attention_mask"], cross_kv, inputs["cross_attention_mask"],
                                cache_len=64, rows=[0, 0, 1, 1])
        assert placed(state.cache["k"][0], rows, kv, None, None) and placed(state.cache["v"][-1], rows, kv, None, None)
        assert placed(state.key_valid, rows, None) and placed(state.logits, rows, None)
        for leaf in jax.tree.leaves(state.cache):
            assert leaf.sharding.mesh.devices.size == data * tensor

    # int8 weights (quantized where their shards live) decode as on one device.
    int8 = lambda mesh: S.generate(model, **inputs, max_new_tokens=16, eos_token_id=None,
                                   sampler=S.Sampler(model, mesh=mesh, quantize="int8"))
    np.testing.assert_array_equal(int8(mesh), int8(None))
    # So do the text layers scanned (what docs/meshes.md suggests on TPUs, where the layer slice fuses into the matmul).
    scanned = lambda mesh: S.generate(model, **inputs, max_new_tokens=16, eos_token_id=None,
                                      sampler=S.Sampler(model, mesh=mesh, scan_layers=True))
    np.testing.assert_array_equal(scanned(mesh), scanned(None))

    # A converted checkpoint loads straight onto the mesh: every parameter in its decoding shards, same values.
    import tempfile
    from llava_cot_jax import checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.save_model(tmp + "/ckpt", model)
        rules = sharding.inference_rules(cfg.text.num_key_value_heads, mesh)
        loaded = checkpoint.load_model(tmp + "/ckpt", scan_layers=False, mesh=mesh, rules=rules)
    want = nnx.to_flat_state(sharding.param_shardings(nnx.state(model, nnx.Param), mesh, rules))
    got = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
    expected_values = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, target in want:
        value = got[path][...]
        assert value.sharding.is_equivalent_to(target.get_value(), value.ndim), (path, value.sharding)
        np.testing.assert_array_equal(np.asarray(value), np.asarray(expected_values[path][...]))

    wide = sharding.make_mesh(data=1, fsdp=1, tensor=8)
    try:
        S.Sampler(model, mesh=wide)
        raise SystemExit("no error")
    except ValueError as e:
        message = str(e)
    assert message.count("ValueError") == 0 and "does not fit the model" in message, message
    assert "q_proj (64, 4, 16): dimension 4 (heads) is not divisible by mesh axes tensor of size 8" in message, message
    print("OK")
""")


def test_generation_and_search_on_meshes_equal_one_device():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.format()], capture_output=True, text=True, timeout=1200, check=False
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-5000:]
