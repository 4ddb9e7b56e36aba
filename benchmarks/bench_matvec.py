"""Why decoding runs the text layers unscanned on CPU: batch-1 matrix-vector products over 12 layers of
768x2048 fp32 weights (75 MB), with the weights stacked and scanned versus one array per layer.

  python benchmarks/bench_matvec.py

Prints GB/s of weights read. XLA:CPU copies a scanned layer's weight slice before the dot; separate arrays
are read in place, and independent dots (two halves of a layer) run on both cores.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

K, N, L = 768, 2048, 12


def gbps(fn, *args, nbytes, repeats=20):
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return nbytes / ((time.perf_counter() - start) / repeats) / 1e9


def main():
    rng = np.random.default_rng(0)
    stacked = jnp.asarray(rng.standard_normal((L, K, N), dtype=np.float32))
    separate = [jnp.asarray(w) for w in np.asarray(stacked)]
    halves = [(jnp.asarray(np.asarray(w)[:, : N // 2]), jnp.asarray(np.asarray(w)[:, N // 2 :])) for w in separate]
    x = jnp.ones((1, K), jnp.float32)

    @jax.jit
    def scanned(x, w):
        return jax.lax.scan(lambda c, wl: (c + (c @ wl)[:, :K], None), x, w)[0]

    @jax.jit
    def looped(x, ws):
        for w in ws:
            x = x + (x @ w)[:, :K]
        return x

    @jax.jit
    def looped_halves(x, hs):
        for a, b in hs:
            x = x + jnp.concatenate([x @ a, x @ b], axis=1)[:, :K]
        return x

    nbytes = stacked.nbytes
    print(f"scanned over stacked weights: {gbps(scanned, x, stacked, nbytes=nbytes):5.1f} GB/s")
    print(f"one array per layer:          {gbps(looped, x, separate, nbytes=nbytes):5.1f} GB/s")
    print(f"two independent halves:       {gbps(looped_halves, x, halves, nbytes=nbytes):5.1f} GB/s")


if __name__ == "__main__":
    main()
