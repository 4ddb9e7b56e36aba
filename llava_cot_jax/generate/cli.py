"""`mode = "infer"`: answer one question about an image (or none) with a search method; see configs/infer.py and
generate/config.py."""

from __future__ import annotations

import codecs
import os
import sys

import numpy as np

from llava_cot_jax import files
from llava_cot_jax.data import chat
from llava_cot_jax.generate import config as generate_config
from llava_cot_jax.generate import stage_search
from llava_cot_jax.generate import stop as stop_lib


class TokenPrinter:
    """Writes row 0's tokens to a stream as they arrive, decoding bytes incrementally (UTF-8 safe)."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.vocab_bytes = stop_lib.token_bytes(tokenizer)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.out = out

    def __call__(self, tokens: np.ndarray, active: np.ndarray) -> None:
        token = int(tokens[0])
        if active[0] and 0 <= token < len(self.vocab_bytes):
            self.out.write(self.decoder.decode(self.vocab_bytes[token]))
            self.out.flush()


def build_searcher(config, on_stage=None, streaming: bool = False) -> stage_search.Searcher:
    """The model, processor and search settings a config's `model`, `mesh` and `search` groups name, as a
    `Searcher` on that mesh. Every mode that generates (infer, demo, eval) builds its searcher here, so a setting
    added to those groups reaches all of them. `streaming` prints row 0's tokens as they come (greedy/sample)."""
    from llava_cot_jax import loading, sharding

    mesh = None if sharding.is_single_device(config.mesh) else sharding.mesh_from_config(config.mesh)
    model = loading.load_model(config.model, mesh)
    processor = loading.load_processor(config.model, model.config)  # the family the weights tell
    on_token = TokenPrinter(processor.tokenizer) if streaming else None
    searcher = stage_search.Searcher(
        model,
        processor,
        generate_config.search_config(config.search, config.seed),
        on_stage=on_stage,
        on_token=on_token,
        mesh=mesh,
        scan_layers=config.model.scan_layers,
    )
    if not config.search.stop_at_eos:
        searcher.sampler.eos_token_ids = ()  # random-weight demos: an early EOS would end the answer after any stage
    return searcher


def model_context(config) -> int:
    """The model's longest sequence (its max positions), from the weights' stored config."""
    from llava_cot_jax import loading

    return loading.stored_config(config.model).text.max_position_embeddings


def check_question(config, tokenizer=None, context: int = 0) -> None:
    """A question over the prompt limits (generate/config.py) is refused before anything is allocated for it."""
    reason = generate_config.prompt_limit_reason(config.question, config, tokenizer, context)
    if reason:
        raise ValueError(f"--config.question: {reason}: shorten it (or raise the limit)")


def run(config, workdir: str = "") -> int:
    """Answers config.question; with a workdir and no config.trace, the trace goes to DIR/trace.json."""
    from llava_cot_jax.data import image as image_lib

    if workdir and not config.trace:
        os.makedirs(workdir, exist_ok=True)
        config.trace = os.path.join(workdir, "trace.json")

    if not config.question:
        raise ValueError('--config.question is required: --config.question="What is in the image?"')
    check_question(config)
    # Every image is checked (exists, decodes, within the pixel budget) before the model is loaded.
    images = [image_lib.to_rgb(image_lib.load_image(path)) for path in config.image.split(",") if path]
    interactive = config.stream and sys.stdout.isatty()

    def on_stage(_, stage, text):
        if interactive and searcher.config.method not in ("greedy", "sample"):
            print(text, end="", flush=True)  # stage search: each accepted stage as it is decided

    searcher = build_searcher(config, on_stage=on_stage, streaming=interactive)
    check_question(config, searcher.processor.tokenizer, model_context(config))
    result = searcher.ask([config.question], [images] if images else None)[0]
    if interactive:
        print()
    if config.show_stages:
        for stage in chat.STAGES:
            if stage in result.stages:
                print(f"{stage}: {result.stages[stage]}")
        if not result.stages:
            print(result.text)
    else:
        print(result.conclusion)
    if config.trace:
        trace = {"config": searcher.config.__dict__, "result": result.as_dict(), "timings_s": searcher.timings}
        files.write_json_atomic(config.trace, trace, indent=1, default=str)
    return 0
