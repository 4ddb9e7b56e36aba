"""Compiles a config's programs for a TPU slice on this host (no TPU needed) and prints per-device memory.

  python tools/aot_compile.py --config configs/infer.py --topology v5e-8 [--config.model.preset=11b] \
      [--config.key=value]
  python tools/aot_compile.py --config configs/sft_llava_cot_11b.py --topology v5p-64
  python tools/aot_compile.py --list_topologies

Needs libtpu (`pip install -e ".[tpu]"`, best in its own virtual environment). An inference config compiles the
vision encoder, the prefill and the decode loop at the shapes a stage search uses (generate/aot.py); a
`mode = "train"` config compiles the training step (train/aot.py). Each row: compile seconds, then GiB per device
for arguments (weights, caches), outputs, temporaries, donated (aliased) buffers and the total against the device's
HBM: "fits" / "does not fit". The mesh is the config's `mesh` group; an inference config left at one device is
compiled tensor-parallel over the whole slice.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for the described slice; never look for a local TPU
# Compilation only touches no chip, so several AOT runs may share this host's libtpu (it takes a lock by default).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from llava_cot_jax import aot, aot_compile, cli_errors  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (with :arg if it takes one).")
_TOPOLOGY = flags.DEFINE_string("topology", None, "Cloud TPU slice, e.g. v5e-8, v5p-64, v6e-8 (--list_topologies).")
_LIST = flags.DEFINE_bool("list_topologies", False, "Print the known TPU slices and exit.")
_ONLY = flags.DEFINE_list("programs", [], "Compile only the programs whose names contain one of these words.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _LIST.value:
        for t in aot.TOPOLOGIES.values():
            print(
                f"{t.name:<8} {t.topology_name:<10} {t.chips:>4} chips {t.devices:>4} devices "
                f"{t.hbm_gib_per_device:>4g} GiB/device  {t.note}"
            )
        return
    if _CONFIG.value is None or not _TOPOLOGY.value:
        raise app.UsageError("--config=configs/NAME.py and --topology=SLICE are required")
    results = aot_compile.compile_for_topology(_CONFIG.value, _TOPOLOGY.value, only=_ONLY.value)
    if not all(r.fits for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    cli_errors.run_absl(main)
