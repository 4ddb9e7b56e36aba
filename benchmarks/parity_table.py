"""Prints the parity table of docs/results/parity.md: max |Δlogits| against transformers on tiny random models.

  python benchmarks/parity_table.py

Uses the same model builders and input cases as tests/test_model_parity.py (which asserts the bounds).
"""

import dataclasses
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from hf_mllama import build_hf_model, hf_logits, random_inputs, save_hf_checkpoint  # noqa: E402
from llava_cot_jax.models.mllama.config import MllamaConfig  # noqa: E402
from llava_cot_jax.models.mllama.params import from_hf  # noqa: E402
from test_model_parity import CASES, _logits  # noqa: E402


def config(kv_heads=2, cross_layers=(3,), layers=5):
    cfg = MllamaConfig.tiny()
    return cfg.replace(
        text=dataclasses.replace(
            cfg.text, num_key_value_heads=kv_heads, cross_attention_layers=cross_layers, num_hidden_layers=layers
        )
    )


def main():
    rows = []
    setups = [
        ("GQA 2 (4 heads, 2 kv)", config(), list(CASES)),
        ("GQA 1", config(kv_heads=4), ["multi_tile_aspect_ratios"]),
        ("GQA 4", config(kv_heads=1), ["multi_tile_aspect_ratios"]),
        (
            "irregular cross layers (0, 2, 3) of 6",
            config(cross_layers=(0, 2, 3), layers=6),
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
                    batch, seq, images, tiles, pad = CASES[case]
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
