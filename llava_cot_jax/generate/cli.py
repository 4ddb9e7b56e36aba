"""`mode = "infer"`: answer one question about an image (or none) with a search method; see configs/infer.py."""

from __future__ import annotations

import codecs
import json
import os
import sys

import numpy as np

from llava_cot_jax.data import chat
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


def checkpoint_format(checkpoint: str) -> str:
    """ "converted" (converted weights, or a training checkpoint DIR/checkpoints/STEP) or "hf" (an HF directory);
    FileNotFoundError for anything else."""
    from llava_cot_jax import checkpoint as ckpt_lib

    if not checkpoint or not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"--config.checkpoint must be a checkpoint directory, got {checkpoint!r}")
    if ckpt_lib.is_checkpoint(checkpoint):
        return "converted"
    if os.path.exists(os.path.join(checkpoint, "config.json")):
        return "hf"
    raise FileNotFoundError(
        f"{checkpoint} is not a checkpoint: it has neither {ckpt_lib.CONFIG_FILE} (converted) nor config.json (HF)"
    )


def load(checkpoint: str, dtype: str, mesh=None, quantize: str | None = None):
    """A converted llava_cot_jax checkpoint or an HF checkpoint directory -> (model, processor). On a `mesh` a
    converted checkpoint is read straight into each device's shards; an HF directory is read on the host first.
    `quantize="int8"`: the text decoder's matrices are stored as int8 as they are loaded."""
    from llava_cot_jax import checkpoint as ckpt_lib
    from llava_cot_jax import sharding
    from llava_cot_jax.data.processor import MllamaProcessor
    from llava_cot_jax.models.mllama.params import from_hf

    if checkpoint_format(checkpoint) == "converted":
        rules = None
        if mesh is not None:
            rules = sharding.inference_rules(ckpt_lib.load_config(checkpoint).text.num_key_value_heads, mesh)
        model = ckpt_lib.load_model(
            checkpoint, dtype=dtype, scan_layers=False, mesh=mesh, rules=rules, quantize=quantize
        )
    else:
        model = from_hf(checkpoint, dtype=dtype, quantize=quantize, scan_layers=False)
    return model, MllamaProcessor.from_pretrained(ckpt_lib.side_files_dir(checkpoint))


def search_config(config) -> stage_search.SearchConfig:
    """The search settings of an infer config (configs/infer.py); empty strings mean the default."""
    return stage_search.SearchConfig.from_config({k: (v if v != "" else None) for k, v in config.items()})


def build_searcher(config, on_stage=None, streaming: bool = False) -> stage_search.Searcher:
    """The model, processor and search settings an infer config (configs/infer.py) names, as a `Searcher`, on the
    device mesh its `mesh_*` keys ask for. Every mode that generates (infer, demo, eval) builds its searcher here,
    so a setting added to the infer config reaches all of them. `streaming` prints row 0's tokens as they come
    (greedy/sample)."""
    from llava_cot_jax import sharding

    mesh = sharding.config_mesh(config)
    model, processor = load(config.checkpoint, config.dtype, mesh, config.get("quantize") or None)
    on_token = TokenPrinter(processor.tokenizer) if streaming else None
    searcher = stage_search.Searcher(
        model,
        processor,
        search_config(config),
        on_stage=on_stage,
        on_token=on_token,
        mesh=mesh,
        scan_layers=config.get("scan_layers", False),
    )
    if not config.get("stop_at_eos", True):
        searcher.sampler.eos_token_ids = ()  # random-weight demos: an early EOS would end the answer after any stage
    return searcher


def run(config, workdir: str = "") -> int:
    """Answers config.question; with a workdir and no config.trace, the trace goes to DIR/trace.json."""
    import PIL.Image

    if workdir and not config.trace:
        os.makedirs(workdir, exist_ok=True)
        config.trace = os.path.join(workdir, "trace.json")

    if not config.question:
        raise SystemExit("--config.question is required")
    images = []
    for path in [p for p in config.image.split(",") if p]:
        if not os.path.isfile(path):
            raise SystemExit(f"image not found: {path}")
        images.append(PIL.Image.open(path).convert("RGB"))
    interactive = config.stream and sys.stdout.isatty()

    def on_stage(_, stage, text):
        if interactive and searcher.config.method not in ("greedy", "sample"):
            print(text, end="", flush=True)  # stage search: each accepted stage as it is decided

    searcher = build_searcher(config, on_stage=on_stage, streaming=interactive)
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
        with open(config.trace, "w") as f:
            json.dump(
                {"config": searcher.config.__dict__, "result": result.as_dict(), "timings_s": searcher.timings},
                f,
                indent=1,
                default=str,
            )
    return 0
