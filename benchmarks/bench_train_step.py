"""Train-step benchmark: our jitted step vs a transformers + torch AdamW step on the same weights and batch.

    /work/venv/bin/python benchmarks/bench_train_step.py [--steps 5] [--remat none]

Model: the shared ~163M-parameter "bench" config of DESIGN.md (random weights, gates and norms perturbed), saved
once as an HF checkpoint and loaded by both sides. Batch: 4 samples, one 448x448 image each (4 tiles of 224),
512 tokens, the second half of each sample supervised. Both sides in float32 on CPU (torch with as many threads
as cores), AdamW lr 1e-5, betas (0.9, 0.999), eps 1e-8, no weight decay; no activation checkpointing on either.
Reported: median seconds per step after warm-up, and their ratio; the loss of the first step on both sides (the
same weights and batch give the same loss); then the input pipeline: Grain batches per second of the same
shape from synthetic 448x448 JPEG scenes, and our step fed by the pipeline against our step on a fixed batch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from hf_mllama import build_hf_model, random_inputs, save_hf_checkpoint

BATCH, SEQ, LR = 4, 512, 1e-5


def make_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    inputs = random_inputs(config, rng, BATCH, SEQ, [1] * BATCH, [[4]] * BATCH)
    labels = inputs["input_ids"].copy()
    labels[:, : SEQ // 2] = -100
    labels[labels == config.image_token_id] = -100
    return {**inputs, "labels": labels}


def time_steps(run_step, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run_step()
        times.append(time.perf_counter() - start)
    return times


def bench_transformers(hf_model, batch, steps: int):
    import torch

    torch.set_num_threads(os.cpu_count())
    model = hf_model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    inputs = {k: torch.as_tensor(v) for k, v in batch.items()}
    losses = []

    def step():
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))

    step()  # warm-up (allocations)
    return time_steps(step, steps), losses[0]


def our_spec(config, remat: str):
    import jax

    from llava_cot_jax import sharding
    from llava_cot_jax.train import config as train_config
    from llava_cot_jax.train import step as step_lib

    optim_cfg = train_config.default_config().optimizer
    optim_cfg.learning_rate = LR
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    return step_lib.build_step_spec(config.replace(remat=remat), optim_cfg, (), mesh, 100, 100)


def bench_ours(spec, params, batch, steps: int):
    import jax

    from llava_cot_jax.train import step as step_lib

    state = step_lib.init_state(spec, params, seed=0)
    train_step = step_lib.jit_train_step(spec)
    device_batch = jax.device_put({k: v[None] for k, v in batch.items()}, step_lib.batch_sharding(spec.mesh))
    start = time.perf_counter()
    state, metrics = train_step(state, device_batch)
    first_loss = float(metrics["loss"])
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def step():
        holder["state"], m = train_step(holder["state"], device_batch)
        jax.block_until_ready(m["loss"])

    return time_steps(step, steps), first_loss, compile_s, holder["state"], train_step


def bench_pipeline_fed(spec, state, train_step, workdir: str, steps: int):
    """Batches per second of the Grain pipeline alone, and seconds per step when it feeds the step."""
    import jax

    from llava_cot_jax.data import pipeline, synthetic
    from llava_cot_jax.data.image import MllamaImageProcessor
    from llava_cot_jax.data.tokenizer import build_tiny_tokenizer
    from llava_cot_jax.train import step as step_lib

    data = synthetic.write_synthetic_dataset(os.path.join(workdir, "scenes"), 64, image_size=448)
    source = pipeline.open_source(data.jsonl_path, data.image_root)
    processor = MllamaImageProcessor(size=224, max_image_tiles=4)
    config = pipeline.PipelineConfig(batch_size=BATCH, seq_buckets=(SEQ,), pixel_dtype="uint8", read_threads=2)
    tokenizer = build_tiny_tokenizer()  # ids stay below the bench vocabulary

    iterator = iter(pipeline.build_dataset(source, tokenizer, processor, config, process_index=0, process_count=1))
    next(iterator)
    start = time.perf_counter()
    for _ in range(steps * 2):
        next(iterator)
    pipeline_batches_per_s = steps * 2 / (time.perf_counter() - start)

    sharding = step_lib.batch_sharding(spec.mesh)

    def fed_step():
        local = next(iterator)
        batch = pipeline.make_global_batch(local, sharding, micro_batches=1)
        nonlocal state
        state, metrics = train_step(state, batch)
        jax.block_until_ready(metrics["loss"])

    fed_step()  # the uint8 pixel path compiles once
    return pipeline_batches_per_s, time_steps(fed_step, steps)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--remat", default="none")
    args = parser.parse_args()

    import jax
    from flax import nnx

    from llava_cot_jax.models.mllama.config import MllamaConfig
    from llava_cot_jax.models.mllama.params import from_hf
    from llava_cot_jax.train import flops

    config = MllamaConfig.bench()
    batch = make_batch(config)
    with tempfile.TemporaryDirectory() as workdir:
        hf_model = build_hf_model(config, seed=0)
        path = save_hf_checkpoint(hf_model, config, os.path.join(workdir, "hf"))
        params = jax.device_get(nnx.to_pure_dict(nnx.state(from_hf(path), nnx.Param)))
        n_params = sum(x.size for x in jax.tree.leaves(params))
        print(
            f"bench config: {n_params / 1e6:.1f}M parameters; batch {BATCH} x {SEQ} tokens, one 4-tile image each; "
            f"{os.cpu_count()} cores; jax {jax.__version__}",
            flush=True,
        )

        spec = our_spec(config, args.remat)
        ours, our_loss, compile_s, state, train_step = bench_ours(spec, params, batch, args.steps)
        print(
            f"ours: compile + first step {compile_s:.1f} s; median step {statistics.median(ours):.2f} s "
            f"(steps {', '.join(f'{t:.2f}' for t in ours)})",
            flush=True,
        )
        theirs, their_loss = bench_transformers(hf_model, batch, args.steps)
        import transformers

        print(
            f"transformers {transformers.__version__} + torch AdamW: median step {statistics.median(theirs):.2f} s "
            f"(steps {', '.join(f'{t:.2f}' for t in theirs)})"
        )
        print(f"first-step loss: ours {our_loss:.6f}, transformers {their_loss:.6f}")
        ratio = statistics.median(theirs) / statistics.median(ours)
        step_flops = flops.train_step_flops(config, BATCH, SEQ, 1)
        print(
            f"speed-up (transformers step time / ours): {ratio:.2f}x; analytic {step_flops / 1e12:.2f} TFLOPs per "
            f"step -> ours {step_flops / statistics.median(ours) / 1e9:.1f} GFLOP/s"
        )

        pipeline_rate, fed = bench_pipeline_fed(spec, state, train_step, workdir, args.steps)
        print(
            f"input pipeline alone: {pipeline_rate:.2f} batches/s ({1 / pipeline_rate:.2f} s per batch); our step "
            f"fed by the pipeline: median {statistics.median(fed):.2f} s vs {statistics.median(ours):.2f} s on a "
            "fixed batch"
        )


if __name__ == "__main__":
    main()
