"""Prints the parity table of docs/results/parity.md: max |Δlogits| against transformers on tiny random models.

  python benchmarks/parity_table.py

Uses the model builders and input cases of llava_cot_jax.models.mllama.hf_reference, as tests/test_model_parity.py
(which asserts the bounds) does.
"""

import tempfile

import numpy as np
from flax import nnx

from llava_cot_jax.models.mllama.hf_reference import (
    PARITY_CASES,
    build_hf_model,
    hf_logits,
    parity_config,
    random_inputs,
    save_hf_checkpoint,
)
from llava_cot_jax.models.mllama.params import from_hf


@nnx.jit
def _logits(model, inputs):
    return model(**inputs).logits


def main():
    rows = []
    setups = [
        ("GQA 2 (4 heads, 2 kv)", parity_config(), list(PARITY_CASES)),
        ("GQA 1", parity_config(kv_heads=4), ["multi_tile_aspect_ratios"]),
        ("GQA 4", parity_config(kv_heads=1), ["multi_tile_aspect_ratios"]),
        (
            "irregular cross layers (0, 2, 3) of 6",
            parity_config(cross_layers=(0, 2, 3), layers=6),
            ["two_images_in_one_sample"],
        ),
    ]
    for label, cfg, cases in setups:
        hf = build_hf_model(cfg, seed=1)
        with tempfile.TemporaryDirectory() as d:
            path = save_hf_checkpoint(hf, cfg, d)
            models = {"float32": from_hf(path), "bfloat16": from_hf(path, dtype="bfloat16")}
            for case in cases + ["text_only"]:
                if case == "text_only":
                    inputs = random_inputs(cfg, np.random.default_rng(3), 2, 9, [0, 0], [[], []])
                    inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
                else:
                    batch, seq, images, tiles, pad = PARITY_CASES[case]
                    inputs = random_inputs(cfg, np.random.default_rng(7), batch, seq, images, tiles, pad_right=pad)
                valid = inputs["attention_mask"].astype(bool)
                ref = hf_logits(hf, inputs)
                diffs = {
                    k: float(np.abs(np.asarray(_logits(m, inputs), np.float32) - ref)[valid].max())
                    for k, m in models.items()
                }
                rows.append((label, case, diffs["float32"], diffs["bfloat16"] / float(np.abs(ref).max())))
    print("| model | input | max abs dlogits fp32 | bf16 max abs dlogits / max abs logit |")
    print("|---|---|---|---|")
    for label, case, fp32, bf16 in rows:
        print(f"| {label} | {case.replace('_', ' ')} | {fp32:.1e} | {bf16:.1e} |")


if __name__ == "__main__":
    main()
