"""The LLaVA-CoT recipe on Llama-3.2-90B-Vision-Instruct (see configs/sft_llava_cot_11b.py for the recipe and
llava_cot_jax/train/config.py for every key).

    python -m llava_cot_jax.main --config configs/sft_llava_cot_90b.py \
        --config.model.weights=ckpt/llama32v_90b --config.data.train=DATA/tfds --workdir runs/llava_cot_90b

Args: tpu (default; FSDP x tensor parallelism chosen from the chip count), gpu8x4 (four 8-GPU hosts: FSDP over 32
GPUs), runlocal (a CPU smoke run of the tiny architecture).
"""

from llava_cot_jax.train.config import default_config, with_arg


def get_config(arg: str | None = None):
    c = default_config()
    c.model.preset = "90b"
    return with_arg(c, arg, {"tpu": (1, -1, 0), "gpu8x4": (1, 32, 1)})
