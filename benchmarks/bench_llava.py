"""LLaVA-1.5 family: greedy decode against transformers' LlavaForConditionalGeneration, side by side, on CPU.

    /work/venv/bin/python benchmarks/bench_llava.py [--quick]

Model: `LlavaConfig.bench()` (~161M parameters: a 512-wide, 8-layer CLIP tower at 224 px = 256 image tokens,
a 768-wide, 12-layer Llama-2 decoder with 32,064 tokens) with random weights, saved once as an HF checkpoint and
loaded by both sides. Prompt: one image (256 image tokens) and 64 text tokens per row, batch 1 and 8; greedy,
EOS disabled on both sides; tokens/s = batch x 64 / (time of 65 new tokens - time of 1), after warm-up. torch on
2 threads.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np
from bench_generate import _timed, bench_decode_hf, bench_decode_ours

TEXT_TOKENS, NEW_TOKENS = 64, 64


def prompt(config, batch: int, rng) -> tuple[dict, dict]:
    """(transformers' inputs, ours): the same ids; pixel values flat [N, 3, H, W] there, [B, 1, 3, H, W] here."""
    n = config.image_tokens
    ids = rng.integers(3, config.image_token_id - 1, size=(batch, TEXT_TOKENS + n))
    ids[:, 0] = config.text.bos_token_id
    ids[:, 5 : 5 + n] = config.image_token_id
    size = config.vision.image_size
    pixels = rng.standard_normal((batch, 1, 3, size, size)).astype(np.float32)
    mask = np.ones_like(ids)
    return (
        {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels[:, 0]},
        {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels},
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repeat (smoke run)")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3

    import jax
    import torch

    from llava_cot_jax.models.llava import hf_reference, params
    from llava_cot_jax.models.llava.config import LlavaConfig

    torch.set_num_threads(2)
    config = LlavaConfig.bench()
    report = {"jax": jax.__version__, "torch": torch.__version__, "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as workdir:
        hf = hf_reference.build_hf_model(config)
        hf.save_pretrained(workdir)
        ours = params.from_hf(workdir, scan_layers=False)
        report["params_total"] = sum(p.numel() for p in hf.parameters())
        report["load_ours_s"] = _timed(lambda: params.from_hf(workdir, scan_layers=False))
        print(json.dumps(report), flush=True)
        rng = np.random.default_rng(0)
        for batch in (1, 8):
            theirs, mine = prompt(config, batch, rng)
            h = bench_decode_hf(hf, theirs, batch, NEW_TOKENS, repeats)
            o = bench_decode_ours(ours, mine, batch, NEW_TOKENS, repeats)
            report[f"decode_b{batch}"] = {
                "transformers": h,
                "ours": o,
                "speedup": o["decode_tokens_per_s"] / h["decode_tokens_per_s"],
                "prefill_speedup": h["prefill_s"] / o["prefill_s"],
            }
            print(json.dumps({f"decode_b{batch}": report[f"decode_b{batch}"]}), flush=True)
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    main()
