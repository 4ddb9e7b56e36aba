"""The offline CPU demo: `python -m llava_cot_jax.main --config configs/demo.py [--workdir DIR] [--config.search=best_of_n]`.

A tiny random model, the tiny tokenizer and a synthetic scene, through the same search code as infer.py.
"""

import os

import ml_collections

from llava_cot_jax import config_file


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.mode = "demo"
    c.seed = 0
    c.search = "stage"
    c.compilation_cache = "~/.cache/llava_cot_jax/xla"  # compiled programs kept across runs; "" = off
    c.num_candidates = 2
    c.infer = config_file.load(os.path.join(os.path.dirname(__file__), "infer.py"), "runlocal")
    c.infer.dtype = "float32"  # a tiny random model on a CPU
    c.infer.show_stages = True
    c.infer.stop_at_eos = False
    return c
