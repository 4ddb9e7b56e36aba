"""The matmul floor of a decode step on CPU, JAX (XLA:CPU) vs PyTorch, side by side.

  python benchmarks/bench_matvec.py

1. Batch-1 matrix-vector products over 12 layers of 768x2048 fp32 weights (75 MB), with the weights stacked and
   scanned versus one array per layer (why decoding runs the text layers unscanned): GB/s of weights read.
   XLA:CPU copies a scanned layer's weight slice before the dot; separate arrays are read in place.
2. Only the matmuls of one decode step of the bench config's text decoder (10 self-attention layers, 2 cross-
   attention layers, the 768x32000 head; 397 MB of fp32 weights) at batch 1, 4 and 8, jitted JAX vs torch with
   2 threads, interleaved so that both see the same machine load. No attention, norms or sampling: whatever a
   decode step does on top, it cannot be faster than this.
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


def scanned_vs_separate():
    rng = np.random.default_rng(0)
    stacked = jnp.asarray(rng.standard_normal((L, K, N), dtype=np.float32))
    separate = [jnp.asarray(w) for w in np.asarray(stacked)]
    x = jnp.ones((1, K), jnp.float32)

    @jax.jit
    def scanned(x, w):
        return jax.lax.scan(lambda c, wl: (c + (c @ wl)[:, :K], None), x, w)[0]

    @jax.jit
    def looped(x, ws):
        for w in ws:
            x = x + (x @ w)[:, :K]
        return x

    nbytes = stacked.nbytes
    print(f"scanned over stacked weights: {gbps(scanned, x, stacked, nbytes=nbytes):5.1f} GB/s")
    print(f"one array per layer:          {gbps(looped, x, separate, nbytes=nbytes):5.1f} GB/s")


def decoder_weights(rng, d=768, f=2048, kv=256, vocab=32000, self_layers=10, cross_layers=2):
    w = lambda *shape: 0.02 * rng.standard_normal(shape, dtype=np.float32)
    layers = [[w(d, d), w(d, kv), w(d, kv), w(d, d), w(d, f), w(d, f), w(f, d)] for _ in range(self_layers)]
    layers += [[w(d, d), None, None, w(d, d), w(d, f), w(d, f), w(f, d)] for _ in range(cross_layers)]
    return layers, w(d, vocab)


def decoder_matmuls(x, layers, head, ops):
    """The dots of one decode step; `ops` supplies (matmul, silu, pad_to) for one framework."""
    matmul, silu, pad_to = ops
    for q, k, v, o, gate, up, down in layers:
        a = matmul(x, q)
        if k is not None:  # self-attention: k/v of the new token (cross layers read precomputed image k/v)
            a = a + pad_to(matmul(x, k), a.shape[1]) + pad_to(matmul(x, v), a.shape[1])
        x = x + matmul(a, o)
        x = x + matmul(silu(matmul(x, gate)) * matmul(x, up), down)
    return matmul(x, head)


def matmul_floor(batches=(1, 4, 8), repeats=15):
    import torch

    torch.set_num_threads(2)
    layers, head = decoder_weights(np.random.default_rng(0))
    nbytes = sum(w.nbytes for layer in layers for w in layer if w is not None) + head.nbytes
    jax_layers = [[None if w is None else jnp.asarray(w) for w in layer] for layer in layers]
    jax_head, torch_head = jnp.asarray(head), torch.from_numpy(head)
    torch_layers = [[None if w is None else torch.from_numpy(w) for w in layer] for layer in layers]
    jax_ops = (jnp.matmul, jax.nn.silu, lambda a, n: jnp.pad(a, ((0, 0), (0, n - a.shape[1]))))
    torch_ops = (torch.matmul, torch.nn.functional.silu, lambda a, n: torch.nn.functional.pad(a, (0, n - a.shape[1])))
    jax_step = jax.jit(lambda x, ls, h: decoder_matmuls(x, ls, h, jax_ops))
    print(f"decoder matmuls per step ({nbytes / 1e6:.0f} MB of fp32 weights), median of {repeats}, interleaved:")
    for batch in batches:
        xj = jnp.full((batch, 768), 0.1, jnp.float32)
        xt = torch.full((batch, 768), 0.1)
        run_jax = lambda xj=xj: jax_step(xj, jax_layers, jax_head).block_until_ready()
        run_torch = lambda xt=xt: decoder_matmuls(xt, torch_layers, torch_head, torch_ops)
        times = {"jax": [], "torch": []}
        with torch.no_grad():
            run_jax(), run_torch()
            for _ in range(repeats):
                for name, fn in (("jax", run_jax), ("torch", run_torch)):
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
        j, t = (float(np.median(times[k])) for k in ("jax", "torch"))
        print(
            f"  batch {batch}: jax {j * 1e3:5.1f} ms ({nbytes / j / 1e9:4.1f} GB/s, {batch / j:4.0f} tokens/s)   "
            f"torch {t * 1e3:5.1f} ms ({batch / t:4.0f} tokens/s)   jax/torch time {j / t:.2f}"
        )


if __name__ == "__main__":
    scanned_vs_separate()
    matmul_floor()
