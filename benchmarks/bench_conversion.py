"""Peak memory of HF -> Orbax -> HF conversion on a synthetic ~1 GB, multi-shard checkpoint.

  python benchmarks/bench_conversion.py [--workdir /tmp/bench_conversion] [--target_gb 1.0]

Writes a random HF-layout checkpoint (fp32, several shards) for a Mllama config scaled to the target size,
then runs each conversion tool in a fresh subprocess and reads its peak RSS (VmHWM of /proc/self/status,
which, unlike ru_maxrss, does not inherit the parent's peak across fork + exec). A third
subprocess that only imports what the tools import gives the baseline the interpreter and libraries cost.
"""

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from llava_cot_jax.models.mllama.config import MllamaConfig  # noqa: E402
from llava_cot_jax.models.mllama.params import abstract_params, hf_table  # noqa: E402


def scaled_config(target_bytes: float) -> MllamaConfig:
    """The bench config with the text stack deepened until fp32 weights reach the target size."""
    base = MllamaConfig.bench()
    for layers in range(10, 200, 5):
        cfg = base.replace(
            text=dataclasses.replace(
                base.text, num_hidden_layers=layers, cross_attention_layers=tuple(range(3, layers, 5))
            )
        )
        size = sum(int(np.prod(s)) * 4 for s, _ in abstract_params(cfg).values())
        if size >= target_bytes:
            return cfg
    raise ValueError("target too large")


def write_synthetic_hf(cfg: MllamaConfig, path: str, shard_bytes: int) -> int:
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    shapes = abstract_params(cfg)
    rng = np.random.default_rng(0)
    shards, shard, used, total, weight_map = [], {}, 0, 0, {}
    for name, entry in hf_table(cfg).items():
        full = shapes[entry.path][0]
        shape = entry.layout.hf_shape(full[1:] if entry.index is not None else full)
        value = rng.standard_normal(shape, dtype=np.float32)
        if shard and used + value.nbytes > shard_bytes:
            shards.append(shard)
            shard, used = {}, 0
        shard[name] = value
        used += value.nbytes
        total += value.nbytes
    shards.append(shard)
    for k, tensors in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in tensors})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_hf_dict(), f)
    return total


def peak_rss_of(argv) -> tuple[float, float]:
    """(peak RSS in bytes, seconds) of a child process."""
    code = (
        f"import runpy, sys; sys.argv = {argv!r}; "
        "exec(\"try:\\n  runpy.run_path(sys.argv[0], run_name='__main__')\\n"
        'except SystemExit as e:\\n  assert not e.code, e.code") '
        "if sys.argv[0].endswith('.py') else exec(sys.argv[0]); "
        "print('MAXRSS', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    )
    start = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    line = [row for row in out.stdout.splitlines() if row.startswith("MAXRSS")][0]
    return int(line.split()[1]) * 1024, time.time() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/bench_conversion")
    parser.add_argument("--target_gb", type=float, default=1.0)
    parser.add_argument("--shards", type=int, default=4)
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    cfg = scaled_config(args.target_gb * 1e9)
    hf_dir, ckpt, out = (os.path.join(args.workdir, n) for n in ("hf", "ckpt", "hf_out"))
    size = write_synthetic_hf(cfg, hf_dir, shard_bytes=int(args.target_gb * 1e9 / args.shards) + 1)
    n_shards = len([f for f in os.listdir(hf_dir) if f.endswith(".safetensors")])
    print(f"checkpoint: {size / 1e9:.3f} GB in {n_shards} shards, text layers {cfg.text.num_hidden_layers}")

    baseline, _ = peak_rss_of(
        ["import llava_cot_jax.checkpoint, orbax.checkpoint, safetensors.numpy, tqdm, jax; from flax import nnx"]
    )
    convert, t_convert = peak_rss_of(
        [os.path.join(REPO, "tools", "convert_hf_to_orbax.py"), "--hf_dir", hf_dir, "--out", ckpt]
    )
    export, t_export = peak_rss_of(
        [
            os.path.join(REPO, "tools", "export_to_hf.py"),
            "--ckpt",
            ckpt,
            "--out",
            out,
            "--max_shard_gb",
            str(args.target_gb / args.shards),
        ]
    )
    print(f"baseline (imports only): peak RSS {baseline / 1e9:.3f} GB")
    for name, peak, secs in (("HF -> Orbax", convert, t_convert), ("Orbax -> HF", export, t_export)):
        print(
            f"{name}: peak RSS {peak / 1e9:.3f} GB = {peak / size:.2f}x checkpoint; above baseline "
            f"{(peak - baseline) / 1e9:.3f} GB = {(peak - baseline) / size:.2f}x; {secs:.1f} s"
        )


if __name__ == "__main__":
    main()
