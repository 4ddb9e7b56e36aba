"""Decode speed with int8 text-decoder weights against bf16 and fp32, side by side, on this machine.

    python benchmarks/bench_int8.py [--repeats 5] [--new 64]

The bench model of docs/design.md (random weights; bench_generate.py's setup), one 448x448 image, a 64-token prompt,
greedy, batch 1 and 4, EOS off. Each weight format gets its own Sampler over the same weights; decode tokens/s is
(new - 1) tokens over the time of a (new)-token call minus a 1-token call (the prefill), best of --repeats, the
formats interleaved within each repeat so that load on a shared machine hits them alike. Also reports the bytes
of the text decoder's weights in each format and the share of the new greedy tokens equal to fp32's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_generate as B


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new", type=int, default=64)
    args = parser.parse_args()

    import jax
    from flax import nnx

    from llava_cot_jax.generate import sampler as S
    from llava_cot_jax.models.mllama import quant
    from llava_cot_jax.models.mllama.params import from_hf

    report = {"jax": jax.__version__, "device": str(jax.devices()[0])}
    with tempfile.TemporaryDirectory() as workdir:
        _, hf, _, processor = B.setup(workdir)
        del hf
        path = os.path.join(workdir, "bench_ckpt")
        models = {
            "fp32": from_hf(path, dtype="float32", scan_layers=False),
            "bf16": from_hf(path, dtype="bfloat16", scan_layers=False),
            "int8": from_hf(path, dtype="bfloat16", quantize="int8", scan_layers=False),
        }
        samplers = {name: S.Sampler(model) for name, model in models.items()}
        for name, sampler in samplers.items():
            text = {p: v for p, v in nnx.to_flat_state(sampler.params) if str(p[0]) == "language_model"}
            report[f"text_weights_GB_{name}"] = (
                sum(x.nbytes for var in text.values() for x in jax.tree.leaves(var.get_value())) / 1e9
            )
        for batch in (1, 4):
            inputs = B.prompt_inputs(processor, batch)
            run = lambda name, n, inputs=inputs: S.generate(
                models[name], **inputs, max_new_tokens=n, eos_token_id=None, sampler=samplers[name]
            )
            outputs = {name: run(name, args.new) for name in samplers}  # compiles, and the tokens to compare
            for name in samplers:
                run(name, 1)
            best = {name: {"one": np.inf, "full": np.inf} for name in samplers}
            for _ in range(args.repeats):
                for name in samplers:
                    for key, n in (("one", 1), ("full", args.new)):
                        start = time.perf_counter()
                        run(name, n)
                        best[name][key] = min(best[name][key], time.perf_counter() - start)
            report[f"batch{batch}"] = {
                name: {
                    "decode_tokens_per_s": batch * (args.new - 1) / (b["full"] - b["one"]),
                    "new_tokens_equal_to_fp32": float((outputs[name] == outputs["fp32"])[:, -args.new :].mean()),
                }
                for name, b in best.items()
            }
            print(json.dumps({f"batch{batch}": report[f"batch{batch}"]}), flush=True)
        with open("/proc/loadavg") as f:
            report["loadavg_after"] = f.read().split()[:3]
    report["int8_in_state"] = quant.is_quantized(samplers["int8"].params)
    print("RESULT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
