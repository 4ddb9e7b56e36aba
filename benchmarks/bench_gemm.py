"""fp32 GEMM throughput on this CPU, XLA:CPU (a jitted jnp.dot) against torch.matmul, at the bench config's
training shapes (batch 4 x 512 tokens; vision: 4 images x 1056 tokens).

    python benchmarks/bench_gemm.py

Best of 5 calls each after a warm-up, both on every core. Tells whether a gap between our train step and
transformers' (bench_train_step.py) comes from the matrix multiplications themselves.
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

SHAPES = {  # (m, k, n)
    "text MLP up": (2048, 768, 3072),
    "text MLP down": (2048, 3072, 768),
    "vision MLP up": (4224, 512, 2048),
    "LM head": (2048, 768, 32000),
}


def best_seconds(run, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    torch.set_num_threads(os.cpu_count())
    dot = jax.jit(jnp.dot)
    for name, (m, k, n) in SHAPES.items():
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        dot(ja, jb).block_until_ready(), torch.matmul(ta, tb)  # warm-up
        xla = 2 * m * k * n / best_seconds(lambda ja=ja, jb=jb: dot(ja, jb).block_until_ready()) / 1e9
        ref = 2 * m * k * n / best_seconds(lambda ta=ta, tb=tb: torch.matmul(ta, tb)) / 1e9
        print(f"{name:14} {m}x{k} @ {k}x{n}: XLA:CPU {xla:.0f} GFLOP/s, torch {ref:.0f} GFLOP/s, ratio {xla / ref:.2f}")


if __name__ == "__main__":
    main()
