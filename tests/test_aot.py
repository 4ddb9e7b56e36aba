"""The AOT library: slice table, per-device memory report, config dispatch (libtpu itself is not needed here)."""

import os

import jax
import jax.numpy as jnp
import pytest

from llava_cot_jax import aot, aot_compile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_slice_table_counts_chips_as_cloud_tpu_names_them():
    # v4/v5p names count TensorCores (2 per chip, one megacore device); v5e/v6e names count chips.
    assert aot.topology("v5p-64").chips == 32 and aot.topology("v5p-8").chips == 4
    assert aot.topology("v5e-8").chips == 8 and aot.topology("v6e-64").chips == 64
    assert aot.topology("v2-8").devices == 8 and aot.topology("v2-8").chips == 4  # a device per TensorCore
    for t in aot.TOPOLOGIES.values():
        version, count = t.name.split("-")
        grid = [int(x) for x in t.topology_name.split(":")[1].split("x")]
        chips = grid[0] * grid[1] * (grid[2] if len(grid) > 2 else 1)
        assert t.topology_name.startswith(version + ":") and chips == t.chips, t
        per_chip = 2 if version in ("v2", "v3", "v4", "v5p") else 1
        assert int(count) == t.chips * per_chip, t
    with pytest.raises(ValueError, match="unknown TPU slice 'v9-8'"):
        aot.topology("v9-8")


def test_memory_report_adds_up_and_judges_fit():
    def step(cache, x):
        return cache.at[0].set(x.sum(0)), jnp.tanh(x @ x.T)

    jitted = jax.jit(step, donate_argnums=0)
    cache = jax.ShapeDtypeStruct((64, 256), jnp.float32)
    x = jax.ShapeDtypeStruct((128, 256), jnp.float32)
    result = aot.compile_program(aot.Program("step", jitted, (cache, x), notes={"cache": 0.5}), hbm_gib=1.0)
    m = result.memory
    gib = 2.0**30
    assert m.arguments == pytest.approx((64 + 128) * 256 * 4 / gib)
    assert m.outputs == pytest.approx((64 * 256 + 128 * 128) * 4 / gib, rel=1e-3)  # + a small tuple table
    assert m.total == pytest.approx(m.arguments + m.outputs - m.aliased + m.temporaries + m.generated_code)
    assert m.fits and m.headroom == pytest.approx(1.0 - m.total)
    assert "fits" in result.row() and "cache 0.50" in result.row()
    tiny = aot.memory_report(result.compiled, hbm_gib=m.total / 2)
    assert not tiny.fits and "does not fit" in tiny.row()


def _load(path):
    """A module of this repository loaded by its path (configs/ and tools/ are folders of scripts)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_dispatch_and_mesh():
    """An inference config left at one device is compiled tensor-parallel over the slice; a training config's
    mesh is the trainer's (FSDP as wide as the batch allows) and dispatches to the train step."""
    tool = aot_compile
    infer = _load(os.path.join(REPO, "configs", "infer.py")).get_config()
    mesh = tool.mesh_for(infer, jax.devices())
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": len(jax.devices())}
    train = _load(os.path.join(REPO, "configs", "sft_tiny.py")).get_config("runlocal")
    train.model.preset = "tiny"
    assert dict(tool.mesh_for(train, jax.devices()).shape)["fsdp"] == len(jax.devices())
    assert [p.name for p in tool.programs_for_config(train, tool.mesh_for(train, jax.devices()))] == ["train_step"]


def test_inference_programs_compile_for_the_search_shapes():
    """The programs tools/aot_compile.py describes for an inference config compile (here for this CPU) at the
    shapes the search uses, and note the weights / caches per device."""
    tool = aot_compile
    config = _load(os.path.join(REPO, "configs", "infer.py")).get_config()
    config.model.preset = "tiny"
    config.search.update(stage_max_new_tokens=16, judge_max_new_tokens=8, num_candidates=4)
    mesh = tool.mesh_for(config, jax.devices()[:1])
    programs = tool.programs_for_config(config, mesh)
    names = [p.name for p in programs]
    assert names == [
        "encode image x1",
        "prefill question 4x256",
        "decode candidates 4x256",
        "prefill judge prefix 1x512",
        "extend judges 2x64",
        "decode judges 2x512",
    ], names
    for program in programs[1:3]:
        result = aot.compile_program(program, hbm_gib=1.0)
        assert result.memory.fits and result.memory.arguments > 0
        assert program.notes["kv_cache"] > 0 and program.notes["weights"] > program.notes["kv_cache"]
