"""What tools/aot_compile.py compiles for a config: the training step (train/aot.py) or the inference programs
(generate/aot.py), on the config's mesh over a TPU slice's abstract devices (aot.py). It sits above train/ and
generate/ (it picks between them), as main.py does."""

from __future__ import annotations

from llava_cot_jax import aot, sharding


def mesh_for(config, devices):
    """The config's mesh over `devices`: training as the trainer builds it (from its global batch); inference as
    asked, or tensor parallelism over every device when the config asks for one device."""
    if config.mode == "train":
        t = config.train
        return sharding.mesh_from_config(
            config.mesh, devices, global_batch=t.global_batch, micro_batches=t.micro_batches
        )
    if sharding.is_single_device(config.mesh):
        return sharding.make_mesh(1, 1, -1, devices=devices)
    return sharding.mesh_from_config(config.mesh, devices)


def programs_for_config(config, mesh) -> list[aot.Program]:
    """The training step (`mode == "train"`) or the inference programs (any other mode)."""
    if config.mode == "train":
        from llava_cot_jax.train import aot as train_aot

        return train_aot.programs(config, mesh)
    from llava_cot_jax.generate import aot as generate_aot

    return generate_aot.programs(config, mesh)


def compile_for_topology(config, topology_name: str, only=()) -> list[aot.CompileResult]:
    """Compiles every program a config describes for a TPU slice (those whose names contain a word of `only`, if
    given), one after another, printing a row for each."""
    t = aot.topology(topology_name)
    mesh = mesh_for(config, aot.topology_devices(topology_name))
    print(
        f"{t.name} ({t.topology_name}, {t.chips} chips, {t.devices} devices, {t.hbm_gib_per_device:g} GiB HBM per "
        f"device), mesh {dict(mesh.shape)}"
    )
    print(f"{'program':<28} {'wall, CPU s':>15} {aot.MemoryReport.HEADER}   (GiB per device)")
    results = []
    for program in programs_for_config(config, mesh):
        if only and not any(word in program.name for word in only):
            continue
        results.append(aot.compile_program(program, t.hbm_gib_per_device))
        print(results[-1].row(), flush=True)
    return results
