"""Input-pipeline throughput on LLaVA-CoT-like samples, and where the time goes.

    python benchmarks/bench_pipeline.py [--num_samples 64] [--workers 0,1,2] [--pixel_dtype float32,uint8]

Samples: one photo-like 1000x750 JPEG each (smooth colour fields + sensor-like noise, quality 90, ~150 KB, so
decode costs what a photo costs), cut into 4 tiles of 560 px, and ~700 tokens of four-stage text under the real
Llama-3 tokenizer (rebuilt from `quicktok-v1`; the tiny test tokenizer is used if that is not installed).

Prints (1) a per-stage profile of one sample on one thread — decode, draft decode, resize/pad/tile, normalise,
tokenise, batch collation — and (2) end-to-end samples/s of `pipeline.build_dataset` per worker count and pixel
dtype, after a warm-up batch (worker start-up excluded).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from llava_cot_jax.data import chat, pipeline, sources
from llava_cot_jax.data.image import MllamaImageProcessor
from llava_cot_jax.data.pipeline import ExampleEncoder, PadBatch, PipelineConfig, decode_image

WORDS = (
    "the image shows a red cube next to small blue sphere which is behind large green cylinder so we count "
    "objects left after removing all metal things question asks how many remain answer therefore is three "
    "chart bar value year increase percent total compare first second third highest lowest difference"
).split()


def photo_like_jpeg(rng: np.random.Generator, width: int = 1000, height: int = 750) -> bytes:
    """A JPEG whose size and decode cost resemble a photo's (smooth regions plus fine noise)."""
    coarse = rng.uniform(0, 255, size=(height // 50 + 1, width // 50 + 1, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float32)
    pixels = np.clip(base + rng.normal(0, 12, size=base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def llava_cot_text(rng: np.random.Generator, words_per_stage=(55, 170, 340, 25)) -> tuple[str, str]:
    def sentence(n):
        return " ".join(rng.choice(WORDS, size=n)) + "."

    question = "<image>\n" + sentence(30) + " Answer with a single word."
    stages = [f"<{stage}> {sentence(n)} </{stage}>" for stage, n in zip(chat.STAGES, words_per_stage)]
    return question, "\n\n".join(stages)


def write_samples(root: Path, num_samples: int, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    jsonl = root / "train.jsonl"
    with open(jsonl, "w") as f:
        for i in range(num_samples):
            (root / "images" / f"{i}.jpg").write_bytes(photo_like_jpeg(rng))
            question, answer = llava_cot_text(rng)
            turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
            f.write(json.dumps({"id": str(i), "image": f"{i}.jpg", "conversations": turns}) + "\n")
    return jsonl, root / "images"


def load_tokenizer():
    from llava_cot_jax.data import tokenizer

    try:
        return tokenizer.build_llama3_tokenizer(), "Llama-3 (quicktok-v1)"
    except ImportError:
        return tokenizer.build_tiny_tokenizer(), "tiny test tokenizer"


def time_per_call(fn, repeats: int) -> float:
    fn()  # warm caches
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def profile_stages(source, tokenizer, processor, config, repeats: int) -> dict[str, float]:
    """Milliseconds per sample for each step of ExampleEncoder, run one after another on one thread."""
    record = source[0]
    image_bytes = record["image"]
    conversations = json.loads(record["conversations"])
    image = decode_image(image_bytes, processor)
    tiles, _ = processor.tile_image(image)
    encoder = ExampleEncoder(tokenizer, processor, config)
    encoded = [encoder(source[i]) for i in range(config.batch_size)]
    collate = PadBatch(config.seq_buckets, tokenizer.pad_token_id)
    stages = {
        "read record (JSONL source, image bytes from disk)": lambda: source[0],
        "decode JPEG (full size)": lambda: decode_image(image_bytes, processor),
        "decode JPEG (draft mode)": lambda: decode_image(image_bytes, processor, draft=True),
        "resize + pad + tile (uint8)": lambda: processor.tile_image(image),
        "normalise to float32": lambda: processor.normalize(tiles),
        "tokenise (chat template + labels + cross mask)": lambda: chat.encode_training_example(
            tokenizer, conversations, True, num_tiles=[len(tiles)]
        ),
        "whole encode step, float32 pixels": lambda: encoder(record),
        f"collate a batch of {config.batch_size}, per sample": lambda: collate(encoded),
    }
    per_sample = {name: time_per_call(fn, repeats) * 1e3 for name, fn in stages.items()}
    per_sample[f"collate a batch of {config.batch_size}, per sample"] /= config.batch_size
    uint8_encoder = ExampleEncoder(tokenizer, processor, PipelineConfig(**{**vars(config), "pixel_dtype": "uint8"}))
    per_sample["whole encode step, uint8 pixels"] = time_per_call(lambda: uint8_encoder(record), repeats) * 1e3
    return per_sample


def throughput(source, tokenizer, processor, config, num_batches: int) -> tuple[float, float | None]:
    """(samples/s by wall clock, CPU ms per sample of this process's threads; None with worker processes, whose
    CPU time this process cannot see). CPU time is the figure that survives other load on a shared machine."""
    iterator = iter(pipeline.build_dataset(source, tokenizer, processor, config, process_index=0, process_count=1))
    next(iterator)  # start-up: worker processes, first decode
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
        next(iterator)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if hasattr(iterator, "close"):
        iterator.close()
    samples = num_batches * config.batch_size
    return samples / elapsed, (cpu / samples * 1e3 if config.worker_count == 0 else None)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_samples", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_batches", type=int, default=12, help="timed batches per configuration")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--read_threads", default="1,2")
    parser.add_argument("--pixel_dtype", default="float32,uint8")
    parser.add_argument("--repeats", type=int, default=10, help="repetitions per stage in the profile")
    args = parser.parse_args()

    tokenizer, tokenizer_name = load_tokenizer()
    processor = MllamaImageProcessor()  # Llama-3.2-Vision defaults: 560-px tiles, at most 4
    with tempfile.TemporaryDirectory() as tmp:
        jsonl, image_root = write_samples(Path(tmp), args.num_samples)
        source = sources.JsonlSource(jsonl, image_root)
        config = PipelineConfig(batch_size=args.batch_size, seq_buckets=(512, 1024, 2048), seed=0)
        lengths = [len(ExampleEncoder(tokenizer, processor, config)(source[i])["input_ids"]) for i in range(8)]
        sizes = [len(source[i]["image"]) for i in range(8)]
        print(
            f"# machine: {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} "
            f"(other processes share the cores); tokenizer: {tokenizer_name}"
        )
        print(
            f"# samples: 1000x750 JPEG ~{np.mean(sizes) / 1e3:.0f} KB, 4 tiles of 560 px, "
            f"{np.mean(lengths):.0f} tokens on average"
        )

        print("\n## per-stage cost, one thread (ms per sample)")
        for name, ms in profile_stages(source, tokenizer, processor, config, args.repeats).items():
            print(f"{name:52s} {ms:8.1f}")

        print(f"\n## end-to-end samples/s (batch {args.batch_size}, after a warm-up batch)")
        print(f"{'pixel dtype':12s} {'workers':>8s} {'threads':>8s} {'samples/s':>10s} {'CPU ms/sample':>14s}")
        for pixel_dtype in args.pixel_dtype.split(","):
            for workers in (int(w) for w in args.workers.split(",")):
                for threads in (int(t) for t in args.read_threads.split(",")):
                    run_config = PipelineConfig(
                        **{**vars(config), "pixel_dtype": pixel_dtype, "worker_count": workers, "read_threads": threads}
                    )
                    rate, cpu_ms = throughput(source, tokenizer, processor, run_config, args.num_batches)
                    cpu = f"{cpu_ms:14.1f}" if cpu_ms is not None else f"{'-':>14s}"
                    print(f"{pixel_dtype:12s} {workers:8d} {threads:8d} {rate:10.1f} {cpu}", flush=True)


if __name__ == "__main__":
    main()
