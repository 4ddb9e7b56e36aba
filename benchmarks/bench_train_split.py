"""Where our train step's CPU time goes: forward against forward + backward, for the whole loss and for the vision
tower + projector alone, on bench_train_step.py's model and batch.

    python benchmarks/bench_train_split.py

Median of 3 calls after a warm-up, each a separate jitted program (no optimizer update, no remat).
"""

import os
import statistics
import sys
import time

import jax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train_step import make_batch

from llava_cot_jax.models.mllama.config import MllamaConfig
from llava_cot_jax.models.mllama.model import MllamaForConditionalGeneration
from llava_cot_jax.train import loss as loss_lib


def median_seconds(fn, *args, repeats: int = 3) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    config = MllamaConfig.bench()
    batch = jax.device_put(make_batch(config))
    graphdef, params = nnx.split(MllamaForConditionalGeneration(config, rngs=nnx.Rngs(0)), nnx.Param)

    def loss(p, b):
        return loss_lib.loss_fn(nnx.merge(graphdef, p), b)[0]

    def vision(p, b):
        return (
            nnx.merge(graphdef, p).encode_images(b["pixel_values"], b["aspect_ratio_ids"], b["aspect_ratio_mask"]).sum()
        )

    for name, fn in (("whole loss", loss), ("vision tower + projector", vision)):
        forward = median_seconds(jax.jit(fn), params, batch)
        both = median_seconds(jax.jit(jax.grad(fn)), params, batch)
        print(f"{name}: forward {forward:.2f} s, forward + backward {both:.2f} s ({both / forward:.1f}x the forward)")


if __name__ == "__main__":
    main()
