"""Every setting of an inference run, with its default: configs/infer.py starts from `default_config()`, and eval
and the demo take the same `search` group, so a search setting means the same thing in every mode.

The `search` group is `stage_search.SearchConfig`'s fields (their defaults and sources are there, defined once;
`None` fields resolve from the method and procedure) less `seed` (the config's top-level seed), plus
`stop_at_eos`. The `model` and `mesh` groups are config_schema's.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from llava_cot_jax import config_schema
from llava_cot_jax.generate import stage_search

# SearchConfig fields that are not search-group keys: the seed is the config's own.
_NOT_IN_GROUP = ("seed",)
_PLACEHOLDER_TYPES = {"int | None": int, "str | None": str}


def search_group(**overrides) -> ml_collections.ConfigDict:
    """SearchConfig's fields at their defaults (unset ones as typed placeholders), with `overrides` applied."""
    g = ml_collections.ConfigDict()
    for field in dataclasses.fields(stage_search.SearchConfig):
        if field.name in _NOT_IN_GROUP:
            continue
        if field.default is None:
            g[field.name] = config_dict.placeholder(_PLACEHOLDER_TYPES[field.type])
        else:
            g[field.name] = field.default
    g.stop_at_eos = True  # False: only the stage tags end a stage (random-weight models emit EOS anywhere)
    for key, value in overrides.items():
        if key not in g:
            raise KeyError(f"search.{key} is not a search setting")
        g[key] = value
    return g


# Limits on a prompt, decided before it is tokenized (characters) and before anything is allocated for it (tokens):
# the question of `infer`, each row of `eval`. The token limit is also capped by the model's context less the
# longest answer the search may add.
MAX_PROMPT_CHARS = 65_536
MAX_PROMPT_TOKENS = 4_096


def limits_group(c: ml_collections.ConfigDict) -> None:
    c.max_prompt_chars = MAX_PROMPT_CHARS  # a longer question is refused (infer) or a bad row (eval); 0: no limit
    c.max_prompt_tokens = MAX_PROMPT_TOKENS  # likewise in tokens, also capped by the model's context


def prompt_limit_reason(text: str, config, tokenizer=None, context: int = 0) -> str | None:
    """Why `text` is refused as a prompt under the config's max_prompt_chars / max_prompt_tokens and the model's
    `context` (its max positions, less the search's longest answer); None when it fits. Characters are checked
    first, so an oversized text is never tokenized."""
    chars = config.get("max_prompt_chars", MAX_PROMPT_CHARS)
    if chars and len(text) > chars:
        return f"prompt is {len(text):,} characters, over max_prompt_chars={chars:,}"
    if tokenizer is None:
        return None
    limit = config.get("max_prompt_tokens", MAX_PROMPT_TOKENS) or 0
    room = context - max(config.search.max_new_tokens, config.search.judge_max_new_tokens) if context else 0
    if room and (not limit or room < limit):
        limit, what = room, f"the model's context of {context:,} less the longest answer"
    else:
        what = f"max_prompt_tokens={limit:,}"
    if limit:
        tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokens > limit:
            return f"prompt is {tokens:,} tokens, over {what}"
    return None


def search_config(search, seed: int = 0) -> stage_search.SearchConfig:
    """The `SearchConfig` of a config's `search` group (empty strings count as unset)."""
    names = {f.name for f in dataclasses.fields(stage_search.SearchConfig)}
    kwargs = {k: v for k, v in search.items() if k in names and v is not None and v != ""}
    return stage_search.SearchConfig(**kwargs, seed=seed)


def default_config() -> ml_collections.ConfigDict:
    """`mode = "infer"`: one question about an image (or none)."""
    c = config_schema.base("infer")
    c.search = search_group()
    c.image = ""  # image path; several as "a.png,b.png"; empty for a text-only question
    c.question = ""
    c.show_stages = False  # print every stage, not only the conclusion
    c.stream = True  # print text as it is produced when stdout is a terminal
    c.trace = ""  # write a JSON trace of every candidate and judge verdict here
    c.batch_size = 1  # tools/aot_compile.py: questions searched together (the CLI answers one)
    limits_group(c)
    return c


def runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Small budgets for a quick CPU run (tests, smoke runs)."""
    c.model.dtype = "float32"  # XLA:CPU runs float32 well; bfloat16 programs ask for fp32 copies of the weights
    c.search.stage_max_new_tokens = 32
    c.search.max_new_tokens = 128
    c.search.sentence_max_new_tokens = 16
    c.search.judge_max_new_tokens = 16
    c.search.num_candidates = 2
    return c
