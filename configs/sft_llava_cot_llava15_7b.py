"""LLaVA-CoT's four-stage answers (LLaVA-CoT-100k) taught to LLaVA-1.5-7B: the recipe LLaVA-CoT's authors
described for other base models, on the llava family. The data and its record filter are LLaVA-CoT's
(configs/sft_llava_cot_11b.py); the conversation format is the one LLaVA-1.5 was tuned with (Vicuna v1), and the
optimisation is LLaVA-1.5's stage 2 (projector and decoder train, tower frozen, lr 2e-5, cosine, 3% warmup) for
LLaVA-CoT's 3 epochs at its global batch of 32.

    python -m llava_cot_jax.main --config configs/sft_llava_cot_llava15_7b.py \
        --config.model.weights=ckpt/llava15_7b --config.data.train=DATA/tfds --workdir runs/llava_cot_llava15_7b

Args: tpu (default), gpu8, runlocal.
"""

from llava_cot_jax.train.config import llava15_recipe, with_arg


def get_config(arg: str | None = None):
    c = llava15_recipe("finetune", "llava15_7b")
    c.train.global_batch, c.train.epochs = 32, 3
    c.data.record_filter = "llava_cot"  # the records LLaVA-CoT's loader trains on
    return with_arg(c, arg, {"tpu": (1, -1, 0), "gpu8": (1, 8, 1)})
