"""LLaVA-1.5-13B stage 2: the 7B recipe (configs/llava15_finetune_7b.py) on Vicuna-13B v1.5.

    python -m llava_cot_jax.main --config configs/llava15_finetune_13b.py \
        --config.model.weights=runs/pretrain_13b/checkpoints/STEP --config.data.train=DATA/mix665k_tfds \
        --workdir runs/finetune_13b

Args: tpu (default), gpu8, runlocal. On a v5p-8 (4 chips, the smallest slice that holds it) add
`--config.train.micro_batches=16` (docs/llava.md).
"""

from llava_cot_jax.train.config import llava15_recipe, with_arg


def get_config(arg: str | None = None):
    return with_arg(llava15_recipe("finetune", "llava15_13b"), arg, {"tpu": (1, -1, 0), "gpu8": (1, 8, 1)})
