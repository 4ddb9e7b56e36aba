"""LoRA train-step benchmark: our LoRA and QLoRA steps against our full-parameter step, and transformers + peft's
LoRA step (with transformers' full step beside it), on the same weights and batch, side by side on CPU.

    nice /work/venv/bin/python benchmarks/bench_lora.py [--batch 2] [--seq 256] [--steps 4] [--rank 16]

Model: the bench config of docs/design.md (random weights, saved once as an HF checkpoint; ours loads it, the torch
sides rebuild the same model from its seed). Batch: `bench_train_step.make_batch` at the given size (one 4-tile
image per sample, the second half of each sample supervised). Adapters: rank 16, alpha 32, no dropout, on every text
layer's q/k/v/o and MLP projections (self- and cross-attention) on both sides; AdamW lr 1e-5 over what trains. All in
float32 except QLoRA's int8 text decoder; torch on every core.

Each side runs in its own process (so its memory is its own): it builds its step, takes one warm-up step, and then
takes one step whenever this script asks, round-robin over the sides, so all meet the same load on a shared machine.
Reported per side: median wall and CPU seconds per step, the first step's loss (zero-initialised B: every side
starts at the base model's loss), the trained parameter count, peak RSS of its process (ru_maxrss: loading, compile
and steps included) and RSS before the first step; for ours also the compiled step's `memory_analysis()`
(arguments + outputs + temporaries - donated buffers that outputs reuse).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile

from bench_train_step import make_batch, our_spec, our_step, timed, transformers_step

SIDES = ("ours_full", "ours_lora", "ours_qlora", "transformers_full", "peft_lora")
ALPHA_PER_RANK = 2.0  # alpha = 2 x rank, as configs/lora_llava_cot_11b.py


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 1024


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def build_ours(job: dict, config, batch):
    """(step, report) of our full, LoRA or QLoRA step from the saved checkpoint."""
    import jax
    from flax import nnx

    from llava_cot_jax.models.mllama import lora
    from llava_cot_jax.models.mllama.params import from_hf

    params = jax.device_get(nnx.to_pure_dict(nnx.state(from_hf(job["hf_path"]), nnx.Param)))
    adapters = None
    if job["side"] != "ours_full":
        adapters = lora.LoraConfig(job["rank"], ALPHA_PER_RANK * job["rank"], 0.0, lora.DEFAULT_TARGETS)
    spec = our_spec(config, "none", adapters, "int8" if job["side"] == "ours_qlora" else "")
    resting = rss_mib()
    step, loss, compile_s, holder = our_step(spec, params, batch)
    del params
    memory = holder["memory"]
    trained = sum(x.size for x in jax.tree.leaves(holder["state"]["params"]))
    compiled_bytes = {
        "arguments": memory.argument_size_in_bytes,
        "outputs": memory.output_size_in_bytes,
        "temporaries": memory.temp_size_in_bytes,
        "aliased": memory.alias_size_in_bytes,
    }
    compiled_bytes["total"] = sum(compiled_bytes[k] for k in ("arguments", "outputs", "temporaries"))
    compiled_bytes["total"] -= compiled_bytes["aliased"]
    return step, {
        "first_loss": loss,
        "setup_s": compile_s,
        "trained": trained,
        "rss_before_step_mib": resting,
        "compiled_mib": {k: v / 2**20 for k, v in compiled_bytes.items()},
    }


def build_torch(job: dict, config, batch):
    """(step, report) of transformers' full step, or peft's LoRA on it, with torch AdamW."""
    import time

    import peft

    from llava_cot_jax.models.mllama.hf_reference import build_hf_model

    model = build_hf_model(config, seed=0)
    if job["side"] == "peft_lora":
        settings = peft.LoraConfig(
            r=job["rank"], lora_alpha=ALPHA_PER_RANK * job["rank"], lora_dropout=0.0, target_modules=job["targets"]
        )
        model = peft.get_peft_model(model, settings)
    resting = rss_mib()
    start = time.perf_counter()
    step, loss = transformers_step(model, batch)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return step, {
        "first_loss": loss,
        "setup_s": time.perf_counter() - start,
        "trained": trained,
        "rss_before_step_mib": resting,
    }


def worker(job_path: str):
    """One side: build, warm up, report; then one timed step per "step" line on stdin; "quit" reports peak RSS."""
    from llava_cot_jax.models.mllama.config import MllamaConfig

    with open(job_path) as f:
        job = json.load(f)
    config = MllamaConfig.bench()
    batch = make_batch(config, batch=job["batch"], seq=job["seq"])
    build = build_ours if job["side"].startswith("ours") else build_torch
    step, report = build(job, config, batch)
    say({"ready": report})
    for line in sys.stdin:
        if line.strip() == "step":
            wall, cpu = timed(step)
            say({"wall": wall, "cpu": cpu})
        else:
            say({"peak_rss_mib": peak_rss_mib()})
            return


def say(message: dict):
    print("BENCH " + json.dumps(message), flush=True)


def listen(process) -> dict:
    for line in process.stdout:
        if line.startswith("BENCH "):
            return json.loads(line[len("BENCH ") :])
    raise RuntimeError(f"a benchmark worker exited (code {process.wait()}); its stderr is above")


def prepare(workdir: str, args) -> dict:
    """The saved checkpoint and peft's target regex (the modules our adapters adapt): what every side reads."""
    import jax

    from llava_cot_jax.models.mllama import lora, peft_format
    from llava_cot_jax.models.mllama.config import MllamaConfig
    from llava_cot_jax.models.mllama.hf_reference import build_hf_model, save_hf_checkpoint
    from llava_cot_jax.train import step as step_lib

    config = MllamaConfig.bench()
    path = save_hf_checkpoint(build_hf_model(config, seed=0), config, os.path.join(workdir, "hf"))
    _, abstract_state = step_lib.abstract_model(config)
    paths = lora.target_paths(abstract_state, lora.DEFAULT_TARGETS)
    return {
        "hf_path": path,
        "targets": peft_format.target_regex(config, paths),
        "batch": args.batch,
        "seq": args.seq,
        "rank": args.rank,
        "jax": jax.__version__,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: a job file
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)

    sides = args.sides.split(",")
    with tempfile.TemporaryDirectory() as workdir:
        job = prepare(workdir, args)
        print(
            f"bench config, batch {args.batch} x {args.seq} tokens (one 4-tile image each), rank {args.rank}; "
            f"{os.cpu_count()} cores; jax {job['jax']}",
            flush=True,
        )
        workers, reports = {}, {}
        for side in sides:  # one at a time, so that each compiles on its own
            job_path = os.path.join(workdir, f"{side}.json")
            with open(job_path, "w") as f:
                json.dump({**job, "side": side}, f)
            workers[side] = subprocess.Popen(
                [sys.executable, __file__, "--worker", job_path],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            reports[side] = listen(workers[side])["ready"]
            print(f"{side}: {json.dumps(reports[side])}", flush=True)
        times = {side: [] for side in sides}
        for i in range(args.steps):
            for side in sides:
                workers[side].stdin.write("step\n")
                workers[side].stdin.flush()
                times[side].append(listen(workers[side]))
            print(
                f"round {i + 1}: "
                + ", ".join(f"{s} {times[s][-1]['wall']:.2f} s ({times[s][-1]['cpu']:.1f} CPU s)" for s in sides)
                + f"; load {os.getloadavg()[0]:.2f}",
                flush=True,
            )
        for side in sides:
            workers[side].stdin.write("quit\n")
            workers[side].stdin.flush()
            reports[side]["peak_rss_mib"] = listen(workers[side])["peak_rss_mib"]
            workers[side].wait()
            reports[side]["wall_s"] = statistics.median(t["wall"] for t in times[side])
            reports[side]["cpu_s"] = statistics.median(t["cpu"] for t in times[side])

    print("\n| side | trained params | median step s (CPU s) | peak RSS MiB | RSS before step MiB | compiled MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for side in sides:
        r = reports[side]
        compiled = r.get("compiled_mib", {}).get("total")
        print(
            f"| {side} | {r['trained'] / 1e6:.2f}M | {r['wall_s']:.2f} ({r['cpu_s']:.1f}) | {r['peak_rss_mib']:.0f} | "
            f"{r['rss_before_step_mib']:.0f} | {'' if compiled is None else f'{compiled:.0f}'} |"
        )
    print("REPORT " + json.dumps(reports))


if __name__ == "__main__":
    main()
