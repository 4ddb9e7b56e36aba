"""The one entry point: `python -m llava_cot_jax.main --config configs/NAME.py[:arg] [--config.key=value ...]`.

Dispatches on `config.mode`. Each mode is a function `run(config) -> int` registered in `MODES` as a
"module:function" path, imported only when chosen, so inference never imports training code.
"""

from __future__ import annotations

import importlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

# mode → "module:function". Other modes (train, eval, convert, ...) register here.
MODES = {
    "infer": "llava_cot_jax.generate.cli:run",
    "demo": "llava_cot_jax.demo:run",
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (with :arg if it takes one).")


def dispatch(config) -> int:
    mode = config.get("mode")
    if mode not in MODES:
        raise app.UsageError(f"config.mode={mode!r} is not one of {sorted(MODES)}")
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
