"""Train-step benchmark: our jitted step vs a transformers + torch AdamW step on the same weights and batch.

    /work/venv/bin/python benchmarks/bench_train_step.py [--steps 5] [--remat none]

Model: the shared ~163M-parameter "bench" config of docs/design.md (random weights, gates and norms perturbed), saved
once as an HF checkpoint and loaded by both sides. Batch: 4 samples, one 448x448 image each (4 tiles of 224),
512 tokens, the second half of each sample supervised. Both sides in float32 on CPU (torch with as many threads
as cores), AdamW lr 1e-5, betas (0.9, 0.999), eps 1e-8, no weight decay; no activation checkpointing on either.
The two steps alternate after warm-up, so both meet the same load on a shared machine. Reported: median wall
and CPU seconds (the process's, every thread) per step and their ratios; the first step's loss on both sides (the
same weights and batch give the same loss); then the input pipeline: Grain batches per second of the same shape
from synthetic 448x448 JPEG scenes, and our step fed by the pipeline alternated with our step on the fixed batch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

from llava_cot_jax.models.mllama.hf_reference import build_hf_model, random_inputs, save_hf_checkpoint

BATCH, SEQ, LR = 4, 512, 1e-5


def make_batch(config, seed=0, batch=BATCH, seq=SEQ):
    rng = np.random.default_rng(seed)
    inputs = random_inputs(config, rng, batch, seq, [1] * batch, [[4]] * batch)
    labels = inputs["input_ids"].copy()
    labels[:, : seq // 2] = -100
    labels[labels == config.image_token_id] = -100
    return {**inputs, "labels": labels}


def timed(run_step) -> tuple[float, float]:
    """Wall and CPU seconds (this process, every thread) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    run_step()
    return time.perf_counter() - wall, time.process_time() - cpu


def transformers_step(hf_model, batch):
    """A warmed-up transformers + torch AdamW step on `batch`, and its first loss. AdamW holds the parameters that
    require gradients: all of them, or a peft model's adapters."""
    import torch

    torch.set_num_threads(os.cpu_count())
    model = hf_model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    inputs = {k: torch.as_tensor(v) for k, v in batch.items()}
    losses = []

    def step():
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    step()  # warm-up (allocations)
    return step, losses[0]


def our_spec(config, remat: str, lora=None, quantize: str = ""):
    """The trainer's step spec on a one-device mesh; `lora` (a LoraConfig) and `quantize` as `train.lora` and
    `model.quantize` set them."""
    import jax

    from llava_cot_jax import sharding
    from llava_cot_jax.train import config as train_config
    from llava_cot_jax.train import step as step_lib

    optim_cfg = train_config.default_config().optimizer
    optim_cfg.learning_rate = LR
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    return step_lib.build_step_spec(
        config.replace(remat=remat), optim_cfg, (), mesh, 100, 100, lora=lora, quantize=quantize
    )


def our_step(spec, params, batch):
    """Our jitted step on `batch` after compilation: (step, first loss, compile seconds, holder of the state and
    of the compiled step's `memory_analysis()`)."""
    import jax

    from llava_cot_jax.train import step as step_lib

    state = step_lib.init_state(spec, params, seed=0)
    train_step = step_lib.jit_train_step(spec)
    device_batch = jax.device_put({k: v[None] for k, v in batch.items()}, step_lib.batch_sharding(spec.mesh))
    start = time.perf_counter()
    compiled = train_step.lower(state, device_batch).compile()
    state, metrics = compiled(state, device_batch)
    first_loss = float(metrics["loss"])
    compile_s = time.perf_counter() - start
    holder = {"state": state, "train_step": train_step, "memory": compiled.memory_analysis()}

    def step():
        holder["state"], m = compiled(holder["state"], device_batch)
        jax.block_until_ready(m["loss"])

    return step, first_loss, compile_s, holder


def alternate(ours, theirs, steps: int) -> tuple[list, list]:
    """(wall, CPU) seconds of each of `steps` calls of our step and theirs, alternated, so that both meet the same
    load on a shared machine."""
    our_times, their_times = [], []
    for i in range(steps):
        our_times.append(timed(ours))
        their_times.append(timed(theirs))
        print(
            f"step {i + 1}: ours {our_times[-1][0]:.2f} s ({our_times[-1][1]:.1f} CPU s), transformers "
            f"{their_times[-1][0]:.2f} s ({their_times[-1][1]:.1f} CPU s); load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
    return our_times, their_times


def bench_pipeline_fed(spec, holder, fixed_step, workdir: str, steps: int):
    """Batches per second of the Grain pipeline alone; then our step fed by the pipeline, alternated with our step
    on the fixed batch (same load for both): their wall seconds."""
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
        batch = pipeline.make_global_batch(next(iterator), sharding, micro_batches=1)
        holder["state"], metrics = holder["train_step"](holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    fed_step()  # the uint8 pixel path compiles once
    fed, fixed = [], []
    for _ in range(steps):
        fed.append(timed(fed_step)[0])
        fixed.append(timed(fixed_step)[0])
    return pipeline_batches_per_s, fed, fixed


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
        ours, our_loss, compile_s, holder = our_step(spec, params, batch)
        print(f"ours: compile + first step {compile_s:.1f} s", flush=True)
        theirs, their_loss = transformers_step(hf_model, batch)
        our_times, their_times = alternate(ours, theirs, args.steps)
        import transformers

        our_wall = statistics.median(t for t, _ in our_times)
        their_wall = statistics.median(t for t, _ in their_times)
        our_cpu = statistics.median(c for _, c in our_times)
        their_cpu = statistics.median(c for _, c in their_times)
        print(f"first-step loss: ours {our_loss:.6f}, transformers {transformers.__version__} {their_loss:.6f}")
        step_flops = flops.train_step_flops(config, BATCH, SEQ, 1)
        print(
            f"median step: ours {our_wall:.2f} s ({our_cpu:.1f} CPU s), transformers + torch AdamW {their_wall:.2f} s "
            f"({their_cpu:.1f} CPU s); speed-up {their_wall / our_wall:.2f}x wall, {their_cpu / our_cpu:.2f}x CPU "
            f"time; analytic {step_flops / 1e12:.2f} TFLOPs per step -> ours {step_flops / our_wall / 1e9:.1f} GFLOP/s"
        )

        del theirs, hf_model  # the torch side's memory
        pipeline_rate, fed, fixed = bench_pipeline_fed(spec, holder, ours, workdir, args.steps)
        print(
            f"input pipeline alone: {pipeline_rate:.2f} batches/s ({1 / pipeline_rate:.2f} s per batch); our step "
            f"fed by the pipeline: median {statistics.median(fed):.2f} s vs {statistics.median(fixed):.2f} s on the "
            f"fixed batch, alternated (fed {', '.join(f'{t:.2f}' for t in fed)}; fixed "
            f"{', '.join(f'{t:.2f}' for t in fixed)})"
        )


if __name__ == "__main__":
    main()
