"""Serving benchmark: the server under 1, 4 and 16 concurrent clients against sequential `Searcher.ask` calls.

    python benchmarks/bench_serve.py [--weights DIR] [--arch tiny|bench] [--seconds 20] [--max_tokens 32] \
        [--batching continuous|batch]

Starts the server in this process (the engine of `serve/app.py` with uvicorn on a thread, on a free local port),
on `--weights` or on a random checkpoint of `--arch` built here (EOS is off, so with random weights every answer
runs its whole budget and requests cost the same). Tokens are the answers' generated tokens, read from the trace.
Each client sends one plain request after another (one image, or none with `--images 0`;
the same question, `max_tokens` tokens, temperature 0.6) for `--seconds`; the table gives completed requests per
second, generated tokens per second and the p50 / p99 latency. The baseline asks the same searcher one question
at a time, in a loop, for the same time. `--batching continuous` (the default) serves the plain requests in the
continuous batch of `--max_batch` slots, `batch` batch-at-a-time (`serve.continuous=false`). Everything is compiled
before the timing (the server's warmup, and the baseline's batch of one; batch-at-a-time: every padded batch size).
Bounded: at most `--seconds` per level, plus the model load and compiles.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import dataclasses
import io
import json
import os
import socket
import tempfile
import threading
import time

import numpy as np
import PIL.Image

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QUESTION = "How many red cubes are there, and where are they?"


def random_checkpoint(arch: str, directory: str) -> str:
    from llava_cot_jax.data.image import MllamaImageProcessor
    from llava_cot_jax.data.processor import MllamaProcessor
    from llava_cot_jax.data.tokenizer import build_tiny_tokenizer
    from llava_cot_jax.models.mllama.config import MllamaConfig
    from llava_cot_jax.models.mllama.hf_reference import build_hf_model, save_hf_checkpoint

    config = MllamaConfig.tiny() if arch == "tiny" else MllamaConfig.bench()
    path = save_hf_checkpoint(build_hf_model(config), config, os.path.join(directory, arch))
    size = config.vision.image_size
    MllamaProcessor(MllamaImageProcessor(size=size, max_image_tiles=4), build_tiny_tokenizer()).save_pretrained(path)
    return path


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="", help="a checkpoint directory; empty: a random one of --arch")
    parser.add_argument("--arch", default="tiny", choices=("tiny", "bench"))
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per level")
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--max_batch", type=int, default=16)
    parser.add_argument("--window_ms", type=float, default=None, help="serve.batch_window_ms; default: the config's")
    parser.add_argument("--batching", default="continuous", choices=("continuous", "batch"))
    parser.add_argument("--images", type=int, default=1, choices=(0, 1), help="images per request (0: text only)")
    parser.add_argument("--decode_steps", type=int, default=None, help="serve.decode_steps; default: the config's")
    parser.add_argument(
        "--slot_prompt_tokens", type=int, default=128, help="serve.slot_prompt_tokens (the question fits 128)"
    )
    parser.add_argument("--out", default="", help="also write the results here as JSON")
    args = parser.parse_args()

    import httpx
    import uvicorn

    from llava_cot_jax import config_file
    from llava_cot_jax.serve import app as app_lib

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tmp = tempfile.mkdtemp(prefix="bench_serve_")
    weights = args.weights or random_checkpoint(args.arch, tmp)
    config = config_file.load(os.path.join(repo, "configs", "serve.py"), "runlocal")
    config.model.weights = weights
    config.search.max_new_tokens = args.max_tokens
    config.search.stop_at_eos = False  # every answer runs its whole budget: equal work per request
    config.serve.max_batch = args.max_batch
    config.serve.max_queue = 1024
    if args.window_ms is not None:
        config.serve.batch_window_ms = args.window_ms
    config.serve.continuous = args.batching == "continuous"
    config.serve.slot_prompt_tokens = args.slot_prompt_tokens
    if args.decode_steps is not None:
        config.serve.decode_steps = args.decode_steps
    config.serve.warmup = True  # continuous: its programs; batch-at-a-time: every padded batch size
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        config.serve.port = s.getsockname()[1]

    engine, context = app_lib.build_engine(config)
    server = uvicorn.Server(
        uvicorn.Config(app_lib.create_app(engine, config, context), port=config.serve.port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{config.serve.port}/v1/chat/completions"
    while not server.started:
        time.sleep(0.1)

    vision = engine.searcher.model.config.vision
    pixels = (np.random.default_rng(0).random((vision.image_size, vision.image_size, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    image_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    body = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": image_url}}] * args.images
                + [{"type": "text", "text": QUESTION}],
            }
        ],
        "max_tokens": args.max_tokens,
        "temperature": 0.6,
    }

    searcher = engine.searcher
    plain = dataclasses.replace(searcher.config, method="sample", max_new_tokens=args.max_tokens)
    levels = [int(c) for c in args.clients.split(",")]
    results = {"weights": weights if args.weights else f"random {args.arch}", "max_tokens": args.max_tokens}
    results["batching"], results["images"] = args.batching, args.images
    results["window_ms"] = config.serve.batch_window_ms
    results["decode_steps"] = config.serve.decode_steps
    results["slot_prompt_tokens"] = config.serve.slot_prompt_tokens
    if engine.continuous:  # the baseline's batch of one (batch-at-a-time compiled it with every size)
        searcher.config = plain
        print(f"warmup batch 1: {searcher.warmup(batch_size=1, num_images=1):.1f} s", flush=True)

    image = PIL.Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    generated = lambda trace: trace[-1]["candidates"][trace[-1]["winner"]]["num_tokens"]
    # One untimed request each way: the warmups above compile for one image, a text-only request compiles its own.
    searcher.config = plain
    searcher.ask([QUESTION], [[image]] if args.images else None)
    httpx.post(url, json=body, timeout=600).raise_for_status()
    latencies, tokens, start = [], 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        searcher.config = dataclasses.replace(plain, seed=len(latencies))
        t0 = time.perf_counter()
        tokens += generated(searcher.ask([QUESTION], [[image]] if args.images else None)[0].trace)
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    results["sequential"] = {
        "requests": len(latencies),
        "requests_per_s": len(latencies) / elapsed,
        "tokens_per_s": tokens / elapsed,
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
    }
    print("sequential Searcher.ask:", json.dumps(results["sequential"]), flush=True)

    for clients in levels:
        stop_at = time.perf_counter() + args.seconds
        batches_before = engine.stats["batches"]
        joined_before = engine.continuous.stats["joined_mid_decode"] if engine.continuous else 0

        def client(_, stop_at=stop_at):
            out, tokens = [], 0
            with httpx.Client(timeout=600) as http:
                while time.perf_counter() < stop_at:
                    t0 = time.perf_counter()
                    response = http.post(url, json=body)
                    response.raise_for_status()
                    out.append(time.perf_counter() - t0)
                    tokens += sum(generated(c["trace"]) for c in response.json()["search"]["choices"])
            return out, tokens

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            done = list(pool.map(client, range(clients)))
        elapsed = time.perf_counter() - start  # includes the last requests, which may run past the stop time
        latencies = [t for d in done for t in d[0]]
        results[f"clients_{clients}"] = {
            "requests": len(latencies),
            "requests_per_s": len(latencies) / elapsed,
            "tokens_per_s": sum(d[1] for d in done) / elapsed,
            "p50_s": percentile(latencies, 50),
            "p99_s": percentile(latencies, 99),
            "batches": engine.stats["batches"] - batches_before,
        }
        if engine.continuous:
            results[f"clients_{clients}"]["joined_mid_decode"] = (
                engine.continuous.stats["joined_mid_decode"] - joined_before
            )
        print(f"{clients} clients:", json.dumps(results[f"clients_{clients}"]), flush=True)

    server.should_exit = True
    thread.join(60)
    engine.close()
    print()
    print("| clients | requests | requests/s | tokens/s | p50 s | p99 s |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        if isinstance(r, dict):
            label = "sequential `Searcher.ask`" if name == "sequential" else name.split("_")[1]
            print(
                f"| {label} | {r['requests']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
                f"{r['p50_s']:.3f} | {r['p99_s']:.3f} |"
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
