"""LLaVA-1.5-7B stage 1 (feature alignment): only the projector trains, on image-caption pairs in the plain format
(LLaVA's blip_laion_cc_sbu_558k.json), from CLIP ViT-L/14-336 and Vicuna-7B v1.5; the recipe's numbers are in
`train.config.llava15_recipe`.

    python -m llava_cot_jax.main --config configs/llava15_pretrain_7b.py \
        --config.model.weights=ckpt/llava15_7b_init --config.data.train=DATA/pretrain_tfds --workdir runs/pretrain

`model.weights`: a llava checkpoint holding CLIP's tower and Vicuna's decoder with a fresh projector
(`tools/convert_llava_original.py --projector=random`, docs/llava.md).
Args: tpu (default: FSDP over the slice), gpu8 (one 8-GPU host), runlocal (a CPU smoke run of the tiny architecture).
On a v5p-8 (4 chips, the smallest slice that holds it) add `--config.train.micro_batches=2` (docs/llava.md).
"""

from llava_cot_jax.train.config import llava15_recipe, with_arg


def get_config(arg: str | None = None):
    return with_arg(llava15_recipe("pretrain", "llava15_7b"), arg, {"tpu": (1, -1, 0), "gpu8": (1, 8, 1)})
