"""Evaluation on a VLMEvalKit multiple-choice or yes/no TSV (MMStar, MMBench, AI2D, HallusionBench, ...):

  python -m llava_cot_jax.main --config configs/eval_mcq.py --workdir runs/mmstar \
    --config.checkpoint=DIR --config.tsv=MMStar.tsv [--config.infer.search=stage --config.infer.num_candidates=2]

Writes DIR/predictions.tsv (VLMEvalKit's evaluators read it) and DIR/accuracy.json; rerun the same command to
resume. The search and model settings are configs/infer.py's, under `infer.` (`get_config("runlocal")` takes
its small budgets). Greedy decoding is the default here: deterministic, one answer per row, the cheapest.
"""

import os

import ml_collections

from llava_cot_jax import config_file


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "eval"
    c.checkpoint = ""  # a converted llava_cot_jax checkpoint or an HF directory
    c.tsv = ""  # a VLMEvalKit TSV: index, question, [hint], A, B, [C...], answer, image (base64), [category]
    c.prompt = "auto"  # auto | mcq | ai2d | yorn (auto: yorn without option columns, ai2d for an AI2D file name)
    c.batch_size = 8  # rows per Searcher.ask call
    # True: the user text stripped of surrounding whitespace, as LLaVA-CoT's training strips its questions (VLMEvalKit
    # sends it as built, ending in " \n"; a small model trained on stripped text can be thrown by the difference).
    c.strip_prompt = False
    c.limit = 0  # evaluate only the first N rows of the TSV (0: all); raise it later and the run resumes
    c.compilation_cache = "~/.cache/llava_cot_jax/xla"  # compiled programs kept across runs; "" = off
    # The model and search settings (dtype, search, num_candidates, budgets, ...), as configs/infer.py has them.
    c.infer = config_file.load(os.path.join(os.path.dirname(__file__), "infer.py"), arg)
    c.infer.search = "greedy"
    c.infer.stream = False
    return c
