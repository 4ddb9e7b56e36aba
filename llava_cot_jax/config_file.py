"""Loading a config file from another one: configs/ is a folder of files run by path, not a package."""

from __future__ import annotations

import importlib.util
import os


def load(path: str, arg: str | None = None):
    """`get_config(arg)` of the config file at `path`, loaded by path as `--config=path[:arg]` loads it."""
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"config_file_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
