"""The offline CPU demo: `python -m llava_cot_jax.main --config configs/demo.py [--workdir DIR] [--config.search=best_of_n]`.

A tiny random model, the tiny tokenizer and a synthetic scene, through the same search code as infer.py.
"""

import importlib.util
import os

import ml_collections


def _infer_config(arg):
    """configs/infer.py's config, loaded by path like config_flags does (configs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("infer_config", os.path.join(os.path.dirname(__file__), "infer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.mode = "demo"
    c.seed = 0
    c.search = "stage"
    c.compilation_cache = "~/.cache/llava_cot_jax/xla"  # compiled programs kept across runs; "" = off
    c.num_candidates = 2
    c.infer = _infer_config("runlocal")
    c.infer.show_stages = True
    c.infer.stop_at_eos = False
    return c
