"""Compiled programs of a search per question, by method and procedure (tiny random model, this CPU).

    python benchmarks/count_programs.py

For each setting: `Searcher.warmup()` in a cleared compilation cache, then two questions of different lengths;
prints the sampler's compiled programs after the warm-up and after the questions (equal: nothing recompiled).
"""

from __future__ import annotations

import tempfile

import jax
import numpy as np
import PIL.Image

from llava_cot_jax.data.image import MllamaImageProcessor
from llava_cot_jax.data.processor import MllamaProcessor
from llava_cot_jax.data.tokenizer import build_tiny_tokenizer
from llava_cot_jax.generate import sampler as S
from llava_cot_jax.generate import stage_search as SS
from llava_cot_jax.models.mllama.config import MllamaConfig
from llava_cot_jax.models.mllama.hf_reference import build_hf_model, save_hf_checkpoint
from llava_cot_jax.models.mllama.params import from_hf

SETTINGS = (("stage", "ours"), ("stage", "llava_cot"), ("sentence", "llava_cot"), ("best_of_n", "ours"))


def main():
    config = MllamaConfig.tiny()
    with tempfile.TemporaryDirectory() as tmp:
        model = from_hf(save_hf_checkpoint(build_hf_model(config), config, tmp))
    image_processor = MllamaImageProcessor(size=config.vision.image_size, max_image_tiles=4)
    processor = MllamaProcessor(image_processor, build_tiny_tokenizer())
    image = PIL.Image.fromarray((np.random.default_rng(0).random((30, 56, 3)) * 255).astype(np.uint8))
    for method, procedure in SETTINGS:
        cfg = SS.SearchConfig(
            method=method,
            num_candidates=4,
            stage_max_new_tokens=8,
            max_new_tokens=16,
            sentence_max_new_tokens=4,
            judge_max_new_tokens=8,
            procedure=procedure,
            seed=0,
        )
        searcher = SS.Searcher(model, processor, cfg)
        searcher.sampler.eos_token_ids = ()  # random weights: every budget runs in full
        jax.clear_caches()
        searcher.warmup()
        warm = S.compile_count()
        for question in ("How many cubes?", "What color is the big sphere left of the small red cube?"):
            searcher.ask([question], [[image]])
        print(f"{method:<10} {procedure:<10} programs after warmup {warm}, after two questions {S.compile_count()}")


if __name__ == "__main__":
    main()
