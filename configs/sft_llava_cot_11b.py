"""LLaVA-CoT's SFT of Llama-3.2-11B-Vision-Instruct on LLaVA-CoT-100k (the published recipe; see
llava_cot_jax/train/config.py for every key and its default).

    python -m llava_cot_jax.main --config configs/sft_llava_cot_11b.py \
        --config.model.weights=ckpt/llama32v_11b --config.data.train=DATA/tfds --workdir runs/llava_cot_11b

Args (`--config configs/sft_llava_cot_11b.py:ARG`):
  tpu (default)  a TPU slice: FSDP over as many chips as the batch allows, tensor parallelism over the rest
                 (v5p-64 = 32 chips: fsdp 32; v6e-64: fsdp 32 x tensor 2; v5e-256: fsdp 32 x tensor 8)
  gpu8           one 8-GPU host: FSDP over the 8 GPUs
  runlocal       a few CPU steps of the tiny architecture on synthetic data (a smoke test of this file)
"""

from llava_cot_jax.train.config import default_config, with_arg


def get_config(arg: str | None = None):
    c = default_config()
    c.model.preset = "11b"
    return with_arg(c, arg, {"tpu": (1, -1, 0), "gpu8": (1, 8, 1)})
