"""Every setting of an evaluation (`mode = "eval"`), with its default; configs/eval_mcq.py starts from it. The
`model`, `mesh` and `search` groups mean what they mean in every mode (config_schema, generate/config.py)."""

from __future__ import annotations

import ml_collections

from llava_cot_jax import config_schema
from llava_cot_jax.generate import config as generate_config


def default_config() -> ml_collections.ConfigDict:
    c = config_schema.base("eval")
    # Greedy by default: deterministic, one answer per row, the cheapest.
    c.search = generate_config.search_group(method="greedy")
    c.tsv = ""  # a VLMEvalKit TSV: index, question, [hint], A, B, [C...], answer, image (base64), [category]
    c.prompt = "auto"  # auto | mcq | ai2d | yorn (auto: yorn without option columns, ai2d for an AI2D file name)
    c.batch_size = 8  # rows per Searcher.ask call
    # True: the user text stripped of surrounding whitespace, as LLaVA-CoT's training strips its questions (VLMEvalKit
    # sends it as built, ending in " \n"; a small model trained on stripped text can be thrown by the difference).
    c.strip_prompt = False
    c.limit = 0  # evaluate only the first N rows of the TSV (0: all); raise it later and the run resumes
    generate_config.limits_group(c)  # a row whose prompt is over max_prompt_chars / max_prompt_tokens is a bad row
    return c
