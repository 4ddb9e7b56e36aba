"""Inference / search on one question:

    python -m llava_cot_jax.main --config configs/infer.py --config.model.weights=DIR \
        --config.image=PATH --config.question="..." [--config.search.method=stage --config.search.num_candidates=4]

Every key and its default: llava_cot_jax/generate/config.py (the `search` group is SearchConfig's, with the sources
of its defaults in llava_cot_jax/generate/stage_search.py). `--config.search.procedure=llava_cot` switches the
tournament to LLaVA-CoT's. Arg `runlocal`: small budgets for a quick CPU smoke run.
"""

from llava_cot_jax.generate.config import default_config, runlocal


def get_config(arg: str | None = None):
    c = default_config()
    if arg == "runlocal":
        runlocal(c)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}: runlocal or none")
    return c
