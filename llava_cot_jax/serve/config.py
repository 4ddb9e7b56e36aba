"""`mode = "serve"`: every setting of the server, with its default. configs/serve.py starts from `default_config()`.

The `model`, `mesh` and `search` groups mean what they mean in `infer` (generate/config.py): `search` holds the
defaults a request starts from and the limits it may not exceed (`search.max_new_tokens` is the largest
`max_tokens` a request may ask for). The `serve` group is the server's own:

    serve.host, serve.port   where to listen (127.0.0.1: this machine only)
    serve.model_name         the model id `GET /v1/models` lists and requests must name (or omit)
    serve.plain_method       what a request without the `search` extension runs: sample (greedy at temperature 0)
    serve.max_batch          rows (requests x n) decoded together at most: the continuous batch's slots, and the
                             largest batch-at-a-time batch (padded to a power of two)
    serve.continuous         run plain requests (greedy / sample, at most one image) in the continuous batch (on
                             one device; on a mesh they run batch-at-a-time)
    serve.decode_steps       tokens the continuous batch decodes between two scheduling points (joins, leaves,
                             streamed text)
    serve.slot_prompt_tokens the longest prompt a slot holds (rounded up to a power of two, at least 128); a longer
                             plain request runs batch-at-a-time. A slot's cache is this plus search.max_new_tokens
    serve.batch_window_ms    how long the worker waits for more requests of the same settings before it runs
    serve.max_queue          requests admitted at once (waiting or running); one more gets 429
    serve.stream_interval_ms  batch-at-a-time: a streamed answer's text is sent at most this often (it is decoded
                             inside the loop); the continuous batch sends it after every serve.decode_steps tokens
    serve.image_dir          local image paths in requests are allowed only under this directory ("" : none)
    serve.max_image_bytes    the largest image a request may send (decoded bytes of its data: URL or file)
    serve.warmup             compile the continuous batch's programs (one image, a prompt of the first bucket)
    serve.warmup_search      also those of `search.method` at its settings (a first search then compiles nothing)
"""

from __future__ import annotations

import ml_collections

from llava_cot_jax import config_schema
from llava_cot_jax.generate import config as generate_config


def serve_group() -> ml_collections.ConfigDict:
    g = ml_collections.ConfigDict()
    g.host = "127.0.0.1"
    g.port = 8000
    g.model_name = "llava-cot"
    g.plain_method = "sample"
    g.max_batch = 8
    g.continuous = True
    g.decode_steps = 8
    g.slot_prompt_tokens = 512
    g.batch_window_ms = 10.0
    g.max_queue = 64
    g.stream_interval_ms = 20.0
    g.image_dir = ""
    g.max_image_bytes = 20 * 1024 * 1024
    g.warmup = True
    g.warmup_search = False
    return g


def default_config() -> ml_collections.ConfigDict:
    c = config_schema.base("serve")
    c.search = generate_config.search_group()
    c.serve = serve_group()
    generate_config.limits_group(c)
    return c


def runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Small budgets for a CPU smoke run or a test: infer's runlocal, a small batch."""
    generate_config.runlocal(c)
    c.serve.max_batch = 4
    return c
