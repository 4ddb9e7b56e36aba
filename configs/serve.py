"""An OpenAI-compatible server (`POST /v1/chat/completions`, `GET /v1/models`, `GET /health`, a page at `/`):

    python -m llava_cot_jax.main --config configs/serve.py --config.model.weights=DIR [--config.serve.port=8000]

Every key and its default: llava_cot_jax/serve/config.py (the `search` group is infer's: the defaults a request
starts from, and `search.max_new_tokens` is the largest `max_tokens` it may ask for). See docs/serving.md.
Arg `runlocal`: small budgets and batches for a quick CPU smoke run.
"""

from llava_cot_jax.serve.config import default_config, runlocal


def get_config(arg: str | None = None):
    c = default_config()
    if arg == "runlocal":
        runlocal(c)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}: runlocal or none")
    return c
