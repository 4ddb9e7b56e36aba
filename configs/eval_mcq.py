"""Evaluation on a VLMEvalKit multiple-choice or yes/no TSV (MMStar, MMBench, AI2D, HallusionBench, ...):

    python -m llava_cot_jax.main --config configs/eval_mcq.py --workdir runs/mmstar \
        --config.model.weights=DIR --config.tsv=MMStar.tsv \
        [--config.search.method=stage --config.search.num_candidates=2]

Writes DIR/predictions.tsv (VLMEvalKit's evaluators read it) and DIR/accuracy.json; rerun the same command to
resume. Every key and its default: llava_cot_jax/eval/config.py. Arg `runlocal`: small budgets (CPU smoke runs).
"""

from llava_cot_jax.eval.config import default_config
from llava_cot_jax.generate.config import runlocal


def get_config(arg: str | None = None):
    c = default_config()
    if arg == "runlocal":
        runlocal(c)
        c.search.method = "greedy"
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}: runlocal or none")
    return c
