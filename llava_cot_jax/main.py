"""The one entry point: `python -m llava_cot_jax.main --config configs/NAME.py[:arg] [--config.key=value ...]`.

Dispatches on `config.mode`. Each mode is a function `run(config) -> int` registered in `MODES` as a
"module:function" path, imported only when chosen, so inference never imports training code.
"""

from __future__ import annotations

import importlib
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

# mode → "module:function". Other modes (train, eval, convert, ...) register here.
MODES = {
    "infer": "llava_cot_jax.generate.cli:run",
    "demo": "llava_cot_jax.demo:run",
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (with :arg if it takes one).")


def enable_compilation_cache(path: str) -> None:
    """Keeps compiled XLA programs on disk under `path` (empty: off), so a second run of the same shapes skips
    compilation, which is most of a short session's time (a stage search compiles ~30 programs)."""
    if path:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def dispatch(config) -> int:
    mode = config.get("mode")
    if mode not in MODES:
        raise app.UsageError(f"config.mode={mode!r} is not one of {sorted(MODES)}")
    enable_compilation_cache(config.get("compilation_cache", ""))
    module, function = MODES[mode].split(":")
    return getattr(importlib.import_module(module), function)(config)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config=configs/NAME.py is required")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax and Grain log every step at INFO
    sys.exit(dispatch(_CONFIG.value))


if __name__ == "__main__":
    app.run(main)
