"""LLaVA-1.5 family: greedy decode, and the train step, against transformers' LlavaForConditionalGeneration, side by
side, on CPU.

    /work/venv/bin/python benchmarks/bench_llava.py [--quick]
    /work/venv/bin/python benchmarks/bench_llava.py --train [--batch 2] [--text_tokens 256] [--steps 3]

Model: `LlavaConfig.bench()` (~161M parameters: a 512-wide, 8-layer CLIP tower at 224 px = 256 image tokens,
a 768-wide, 12-layer Llama-2 decoder with 32,064 tokens) with random weights, saved once as an HF checkpoint and
loaded by both sides. Prompt: one image (256 image tokens) and 64 text tokens per row, batch 1 and 8; greedy,
EOS disabled on both sides; tokens/s = batch x 64 / (time of 65 new tokens - time of 1), after warm-up. torch on
2 threads.

--train: one full-parameter AdamW step (forward, backward, update; float32, lr 1e-5, no weight decay, no
activation checkpointing) on `batch` rows of one image and `text_tokens` text tokens, the second half of each row
supervised: ours is the trainer's jitted step, theirs transformers' loss, backward and torch AdamW; after one
warm-up step each, the two alternate (bench_train_step.py's helpers, as the Mllama train-step benchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

import numpy as np
from bench_generate import _timed, bench_decode_hf, bench_decode_ours
from bench_train_step import alternate, our_spec, our_step, transformers_step

TEXT_TOKENS, NEW_TOKENS = 64, 64


def prompt(config, batch: int, rng, text_tokens: int = TEXT_TOKENS) -> tuple[dict, dict]:
    """(transformers' inputs, ours): the same ids; pixel values flat [N, 3, H, W] there, [B, 1, 3, H, W] here."""
    n = config.image_tokens
    ids = rng.integers(3, config.image_token_id - 1, size=(batch, text_tokens + n))
    ids[:, 0] = config.text.bos_token_id
    ids[:, 5 : 5 + n] = config.image_token_id
    size = config.vision.image_size
    pixels = rng.standard_normal((batch, 1, 3, size, size)).astype(np.float32)
    mask = np.ones_like(ids)
    return (
        {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels[:, 0]},
        {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels},
    )


def bench_train(config, hf, workdir: str, batch: int, text_tokens: int, steps: int) -> dict:
    """Our train step against transformers + torch AdamW on the same weights (`workdir`, saved from `hf`) and batch."""
    import jax
    from flax import nnx

    from llava_cot_jax.models.llava import params

    theirs_inputs, our_inputs = prompt(config, batch, np.random.default_rng(1), text_tokens)
    labels = our_inputs["input_ids"].copy()
    labels[:, : labels.shape[1] // 2] = -100
    labels[labels == config.image_token_id] = -100
    our_params = jax.device_get(nnx.to_pure_dict(nnx.state(params.from_hf(workdir), nnx.Param)))
    ours, our_loss, compile_s, _ = our_step(our_spec(config, "none"), our_params, {**our_inputs, "labels": labels})
    del our_params
    theirs, their_loss = transformers_step(hf, {**theirs_inputs, "labels": labels})
    our_times, their_times = alternate(ours, theirs, steps)
    our_wall, their_wall = (statistics.median(t for t, _ in times) for times in (our_times, their_times))
    our_cpu, their_cpu = (statistics.median(c for _, c in times) for times in (our_times, their_times))
    return {
        "batch": batch,
        "seq": labels.shape[1],
        "compile_and_first_step_s": compile_s,
        "first_loss": {"ours": our_loss, "transformers": their_loss},
        "ours": {"wall_s": our_wall, "cpu_s": our_cpu, "steps": our_times},
        "transformers": {"wall_s": their_wall, "cpu_s": their_cpu, "steps": their_times},
        "speedup_wall": their_wall / our_wall,
        "speedup_cpu": their_cpu / our_cpu,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repeat (smoke run)")
    parser.add_argument("--train", action="store_true", help="the train step instead of decoding")
    parser.add_argument("--batch", type=int, default=2, help="--train: rows")
    parser.add_argument("--text_tokens", type=int, default=256, help="--train: text tokens per row (+ the image's)")
    parser.add_argument("--steps", type=int, default=3, help="--train: timed steps per side")
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
        if args.train:
            del ours
            report["train_step"] = bench_train(config, hf, workdir, args.batch, args.text_tokens, args.steps)
            print("REPORT " + json.dumps(report))
            return
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
