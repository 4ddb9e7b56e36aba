"""Ahead-of-time compilation for a TPU slice from any host: will a program fit, and how long does it compile?

`topology_devices("v5e-8")` describes the slice's devices through libtpu (`pip install -e ".[tpu]"`; no TPU needed),
a mesh over them lowers and compiles jitted programs exactly as on the slice, and `memory_report(compiled, ...)`
reads XLA's per-device buffer assignment: arguments (weights, caches), outputs, temporaries, and whether the sum
fits the device's HBM. Training (`train/aot.py`) and inference (`generate/aot.py`) describe their programs with
`Program`; `tools/aot_compile.py` picks which for a config and compiles them here.

Slice names follow Cloud TPU's accelerator types. For v2, v3, v4 and v5p the number counts TensorCores (2 per
chip), so v5p-64 is 32 chips; for v5e and v6e it counts chips. v4 and v5p chips run as one "megacore" device;
v2 and v3 expose each TensorCore as a device with half the chip's HBM.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Topology:
    """A Cloud TPU slice: what libtpu needs to describe it, and its size."""

    name: str  # Cloud TPU accelerator type, e.g. "v5e-8"
    topology_name: str  # libtpu's "<version>:<chip grid>"
    chips: int
    devices: int  # JAX devices (= chips, or 2 per chip on v2/v3)
    hbm_gib_per_device: float  # HBM per JAX device, as Cloud TPU's docs list it per chip (halved on v2/v3)
    chip_config_name: str | None = None  # "megacore" for v4/v5p
    chips_per_host_bounds: tuple[int, int, int] | None = None  # libtpu's default is 2x2x1 (1-chip slices need 1x1x1)
    note: str = ""

    def get_topology_desc_kwargs(self) -> dict:
        kwargs = {"platform": "tpu", "topology_name": self.topology_name, "num_slices": 1}
        if self.chip_config_name:
            kwargs["chip_config_name"] = self.chip_config_name
        if self.chips_per_host_bounds:
            kwargs["chips_per_host_bounds"] = self.chips_per_host_bounds
        return kwargs


def _slices() -> dict[str, Topology]:
    # HBM per chip from the Cloud TPU system-architecture pages: v2 16 GiB, v3 32 GiB, v4 32 GiB, v5e 16 GB,
    # v5p 95 GB, v6e 32 GB.
    table = [
        Topology(
            "v5e-1",
            "v5e:1x1",
            1,
            1,
            16,
            chips_per_host_bounds=(1, 1, 1),
            note="Colab's TPU runtime since late 2025 (it replaced the v2-8)",
        ),
        Topology("v5e-4", "v5e:2x2", 4, 4, 16),
        Topology("v5e-8", "v5e:2x4", 8, 8, 16),
        Topology("v5e-256", "v5e:16x16", 256, 256, 16),
        Topology("v6e-1", "v6e:1x1", 1, 1, 32, chips_per_host_bounds=(1, 1, 1)),
        Topology("v6e-8", "v6e:2x4", 8, 8, 32),
        Topology("v6e-64", "v6e:8x8", 64, 64, 32),
        Topology("v5p-8", "v5p:2x2x1", 4, 4, 95, "megacore", (2, 2, 1)),
        Topology("v5p-32", "v5p:2x2x4", 16, 16, 95, "megacore", (2, 2, 1)),
        Topology("v5p-64", "v5p:2x4x4", 32, 32, 95, "megacore", (2, 2, 1)),
        Topology("v5p-128", "v5p:4x4x4", 64, 64, 95, "megacore", (2, 2, 1)),
        Topology("v4-8", "v4:2x2x1", 4, 4, 32, "megacore", (2, 2, 1)),
        Topology("v3-8", "v3:2x2", 4, 8, 16),
        Topology("v2-8", "v2:2x2", 4, 8, 8, note="Colab's former TPU runtime"),
    ]
    return {t.name: t for t in table}


TOPOLOGIES = _slices()


def topology(name: str) -> Topology:
    if name not in TOPOLOGIES:
        raise ValueError(f"unknown TPU slice {name!r}; known: {', '.join(TOPOLOGIES)}")
    return TOPOLOGIES[name]


def topology_devices(name: str) -> list:
    """The abstract devices of a TPU slice (compile for them, run nothing). Needs libtpu: `pip install -e ".[tpu]"`."""
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

    t = topology(name)
    try:
        devices = topologies.get_topology_desc(**t.get_topology_desc_kwargs()).devices
    except Exception as err:  # libtpu missing or too old to know the chip
        raise RuntimeError(
            f"cannot describe TPU slice {name} ({t.topology_name}): {err}. AOT compilation for TPU needs libtpu: "
            'pip install -e ".[tpu]" (in a separate environment: libtpu is not part of the default install)'
        ) from err
    if len(devices) != t.devices:
        raise RuntimeError(f"libtpu describes {name} with {len(devices)} devices, the table says {t.devices}")
    return list(devices)


def gib_per_device(tree) -> float:
    """GiB one device holds of a tree of abstract arrays with shardings (each leaf's shard size)."""
    import math

    import jax

    leaves = jax.tree.leaves(tree)
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves) / GIB


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Per-device memory of one compiled program, in GiB (XLA's buffer assignment, the same on every device)."""

    arguments: float
    outputs: float
    temporaries: float
    aliased: float  # outputs that reuse donated argument buffers (counted once)
    generated_code: float
    total: float
    hbm: float

    @property
    def fits(self) -> bool:
        return self.total <= self.hbm

    @property
    def headroom(self) -> float:
        return self.hbm - self.total

    def row(self) -> str:
        verdict = "fits" if self.fits else "does not fit"
        return (
            f"{self.arguments:7.2f} {self.outputs:7.2f} {self.temporaries:7.2f} {self.aliased:7.2f} "
            f"{self.total:7.2f} / {self.hbm:g} GiB  {verdict} ({self.headroom:+.2f} GiB)"
        )

    HEADER = "   args outputs   temps aliased   total"


def memory_report(compiled, hbm_gib: float) -> MemoryReport:
    """Per-device GiB of a compiled program: arguments + outputs - aliased + temporaries + code, against `hbm_gib`."""
    m = compiled.memory_analysis()
    arguments, outputs = m.argument_size_in_bytes, m.output_size_in_bytes
    aliased, temps, code = m.alias_size_in_bytes, m.temp_size_in_bytes, m.generated_code_size_in_bytes
    total = arguments + outputs - aliased + temps + code
    return MemoryReport(arguments / GIB, outputs / GIB, temps / GIB, aliased / GIB, code / GIB, total / GIB, hbm_gib)


@dataclasses.dataclass
class Program:
    """One program to compile: a `jax.jit`-wrapped function and abstract arguments (jax.ShapeDtypeStruct with
    shardings), plus what its caller knows analytically (e.g. GiB of weights and KV cache per device)."""

    name: str
    jitted: Callable
    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)
    notes: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class CompileResult:
    program: Program
    seconds: float  # lowering + compilation, wall clock
    cpu_seconds: float  # the same in CPU time of this process (steadier than wall clock on a shared host)
    memory: MemoryReport | None  # None when XLA refused to compile for lack of memory (see `error`)
    compiled: object = dataclasses.field(repr=False, default=None)
    error: str = ""

    @property
    def fits(self) -> bool:
        return self.memory is not None and self.memory.fits

    def row(self) -> str:
        notes = "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in self.program.notes.items())
        memory = self.memory.row() if self.memory is not None else f"does not fit: {self.error}"
        seconds = f"{self.seconds:6.1f}s {self.cpu_seconds:6.1f}s"
        return f"{self.program.name:<28} {seconds} {memory}  {notes}".rstrip()


def compile_program(program: Program, hbm_gib: float) -> CompileResult:
    """Lowers and compiles one program for the devices its arguments' shardings name."""
    import jax  # pylint: disable=g-import-not-at-top

    start, cpu = time.perf_counter(), time.process_time()
    try:
        compiled = program.jitted.lower(*program.args, **program.kwargs).compile()
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        # XLA's TPU compiler stops when even its best buffer assignment exceeds the HBM: that is the answer.
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        return CompileResult(program, seconds, cpu_seconds, None, error=str(err).split("\n")[0])
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    return CompileResult(program, seconds, cpu_seconds, memory_report(compiled, hbm_gib), compiled)
