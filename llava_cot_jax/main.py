"""The one entry point:

    python -m llava_cot_jax.main --config configs/NAME.py[:arg] --workdir DIR [--config.key=value]

Dispatches on `config.mode`. Each mode is a function `run(config, workdir) -> int` registered in `MODES` as a
"module:function" path, imported only when chosen, so inference never imports training code.

Mistakes a user makes (an unknown config key, a missing checkpoint or data directory, a mesh that does not fit)
end the program with one line on stderr, `error: ...`. Third-party libraries (absl, Orbax, Grain, JAX) log only
their errors. `--verbose` (or absl's `--verbosity=N`) shows their warnings and logs, and a mistake's traceback.
"""

from __future__ import annotations

import importlib
import logging as python_logging
import os
import sys
import warnings

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from llava_cot_jax import cli_errors, config_file, config_schema

# mode → "module:function".
MODES = {
    "demo": "llava_cot_jax.demo:run",
    "infer": "llava_cot_jax.generate.cli:run",
    "train": "llava_cot_jax.train.trainer:run",
    "eval": "llava_cot_jax.eval.run:run",
    "study": "llava_cot_jax.study:run",
    "serve": "llava_cot_jax.serve.app:run",
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (with :arg if it takes one).")
_WORKDIR = flags.DEFINE_string(
    "workdir", "", "Directory for this run's outputs (checkpoints, metrics, results); a rerun resumes from it."
)
cli_errors.define_verbose()

# Libraries whose warnings and logs (e.g. Orbax's "Skipping merge of OCDBT checkpoints" on every save) are noise
# to a user unless --verbose; their errors always print. Orbax logs through absl, so "absl" covers it too.
THIRD_PARTY_LOGGERS = ("absl", "orbax", "grain", "jax")

# Exceptions that report a user's mistake: printed as one line, not a traceback (cli_errors.py).
USER_ERRORS = cli_errors.USER_ERRORS


class UsageError(app.UsageError):
    """A bad command line; absl prints it as one line."""


def enable_compilation_cache(path: str) -> None:
    """Keeps compiled XLA programs on disk under `path` (empty: off), so a second run of the same shapes skips
    compilation, which is most of a short session's time (a stage search compiles ~30 programs)."""
    if path:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def quiet_third_party_logs() -> None:
    """Raises the third-party loggers to ERROR and ignores Python warnings issued from those packages; the package's
    own warnings still print."""
    logging.set_verbosity(logging.WARNING)  # under absl.app this sets the root logger, which ours inherit
    for name in THIRD_PARTY_LOGGERS:
        python_logging.getLogger(name).setLevel(python_logging.ERROR)
    warnings.filterwarnings("ignore", module=r"({})(\.|$)".format("|".join(THIRD_PARTY_LOGGERS)))


def dispatch(config, workdir: str = "") -> int:
    mode = config.get("mode")
    if mode not in MODES:
        raise app.UsageError(f"config.mode={mode!r} is not one of {sorted(MODES)}")
    enable_compilation_cache(config.get("compilation_cache", ""))
    module, function = MODES[mode].split(":")
    return getattr(importlib.import_module(module), function)(config, workdir)


def _override_keys(argv) -> tuple[str | None, list[str]]:
    """The config file argument and the keys of every `--config.KEY[=value]` flag in `argv`."""
    config_arg, keys = None, []
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith("--config="):
            config_arg = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            config_arg = argv[i + 1]
        elif arg.startswith("--config."):
            keys.append(arg[len("--config.") :].split("=", 1)[0])
    return config_arg, keys


_MISSING = object()


def _lookup(config, key: str):
    """The value at a dotted key of a config, or _MISSING."""
    node = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return _MISSING
        node = node[part]
    return node


def load_config_arg(config_arg: str):
    """The config a `--config=PATH[:ARG]` names; a missing file or a bad ARG is a one-line error here, before absl's
    loader would report it as two chained tracebacks."""
    path, _, arg = config_arg.partition(":")
    if not os.path.isfile(path):
        folder = os.path.dirname(path) or "."
        known = sorted(f for f in os.listdir(folder) if f.endswith(".py")) if os.path.isdir(folder) else []
        hint = f"; {folder} has: {', '.join(known)}" if known else "; pass the path of a configs/*.py file"
        raise FileNotFoundError(f"--config: no such config file: {path}{hint}")
    try:
        return config_file.load(path, arg or None)
    except (ValueError, KeyError) as err:
        raise ValueError(f"--config={config_arg}: {cli_errors.message(err)}") from err


def check_override_keys(argv) -> None:
    """Names the first `--config.KEY` the config does not have (with the key that replaced it, for a moved one),
    before absl's parser would report every override at once."""
    config_arg, keys = _override_keys(argv)
    if not config_arg or not keys:
        return
    path = config_arg.partition(":")[0]
    if not os.path.isfile(path):
        return  # parse_flags reports the missing file
    config = load_config_arg(config_arg)
    for key in keys:
        value = _lookup(config, key)
        if value is _MISSING:
            new = config_schema.moved_key(key)
            if new and _lookup(config, new) is not _MISSING:
                raise SystemExit(f"error: config key {key} is now {new}: use --config.{new}")
            raise SystemExit(f"error: unknown config key {key} in {path}")
        if hasattr(value, "keys"):  # e.g. --config.search=stage, from when the method was a flat key
            raise SystemExit(f"error: --config.{key} is a group: set one of its keys ({', '.join(value.keys())})")


def parse_flags(argv):
    """absl's flag parsing, with a missing config file, a bad config argument and a config override of an unknown
    key each reported as one line naming it."""
    with cli_errors.one_line_errors(cli_errors.verbose_requested(argv)):
        config_arg = _override_keys(argv)[0]
        if config_arg:
            load_config_arg(config_arg)
        check_override_keys(argv)
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        cli_errors.exit_with(str(err))
    except (AttributeError, KeyError) as err:  # ml_collections: a key check_override_keys could not see
        cli_errors.exit_with(f"config override failed: {cli_errors.message(err)}")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config=configs/NAME.py is required")
    verbose = flags.FLAGS.verbose or flags.FLAGS["verbosity"].present
    if not verbose:
        quiet_third_party_logs()
    with cli_errors.one_line_errors(verbose):
        code = dispatch(_CONFIG.value, _WORKDIR.value)
    sys.exit(code)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
