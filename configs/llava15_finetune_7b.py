"""LLaVA-1.5-7B stage 2 (visual instruction tuning): the projector and the decoder train, the CLIP tower stays
frozen, on LLaVA's llava_v1_5_mix665k.json in the Vicuna v1 format; the recipe's numbers are in
`train.config.llava15_recipe`.

    python -m llava_cot_jax.main --config configs/llava15_finetune_7b.py \
        --config.model.weights=runs/pretrain/checkpoints/STEP --config.data.train=DATA/mix665k_tfds \
        --workdir runs/finetune

`model.weights`: stage 1's last training checkpoint (the unchanged tower and decoder with the trained projector).
LLaVA-1.5 trained with Vicuna's system sentence in front of every conversation: pass it as
`--config.data.system=...` to train exactly so (docs/llava.md). Args: tpu (default), gpu8, runlocal.
On a v5p-8 (4 chips, the smallest slice that holds it) add `--config.train.micro_batches=2` (docs/llava.md).
"""

from llava_cot_jax.train.config import llava15_recipe, with_arg


def get_config(arg: str | None = None):
    return with_arg(llava15_recipe("finetune", "llava15_7b"), arg, {"tpu": (1, -1, 0), "gpu8": (1, 8, 1)})
