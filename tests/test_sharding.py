"""Sharding the model from the logical-axis rules table on 8 simulated CPU devices."""

import subprocess
import sys
import textwrap

import pytest
from flax import nnx

from llava_cot_jax import sharding
from llava_cot_jax.models.mllama.config import MllamaConfig
from llava_cot_jax.models.mllama.model import MllamaForConditionalGeneration


def test_every_logical_axis_has_a_rule():
    abstract = nnx.eval_shape(lambda: MllamaForConditionalGeneration(MllamaConfig.llama_11b(), rngs=nnx.Rngs(0)))
    for _, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        sharding.logical_to_spec(var.get_metadata()["out_sharding"])  # raises on an axis without a rule


def test_mesh_errors_say_what_does_not_fit():
    with pytest.raises(ValueError, match="needs 4 devices, have 1"):
        sharding.make_mesh(data=2, fsdp=2, tensor=1)


SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import dataclasses
    import jax, numpy as np
    from flax import nnx
    from llava_cot_jax.models.mllama.hf_reference import random_inputs
    from llava_cot_jax import sharding
    from llava_cot_jax.models.mllama.config import MllamaConfig
    from llava_cot_jax.models.mllama.model import MllamaForConditionalGeneration

    cfg = MllamaConfig.tiny()
    model = MllamaForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
    inputs = random_inputs(cfg, np.random.default_rng(0), 4, 8, [1] * 4, [[2]] * 4)
    forward = nnx.jit(lambda m, x: m(**x).logits)
    expected = np.asarray(forward(model, inputs))

    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.device_put(state, sharding.param_shardings(state, mesh)))
    q = model.language_model.self_layers.q_proj[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None), q.sharding.spec
    spec = lambda ndim: sharding.logical_to_spec(("batch",) + (None,) * (ndim - 1))
    batch = {{k: jax.device_put(v, jax.sharding.NamedSharding(mesh, spec(v.ndim))) for k, v in inputs.items()}}
    got = np.asarray(forward(model, batch))
    np.testing.assert_allclose(got, expected, atol=1e-5)

    wide = sharding.make_mesh(data=1, fsdp=1, tensor=8)
    try:
      sharding.param_shardings(nnx.state(model, nnx.Param), wide)
      raise SystemExit("no error")
    except ValueError as e:
      assert "not divisible by mesh axes" in str(e), e
    print("OK")
""")


def test_sharded_forward_matches_single_device():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.format()], capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
