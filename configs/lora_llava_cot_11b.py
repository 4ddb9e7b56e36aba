"""LoRA / QLoRA of Llama-3.2-11B-Vision-Instruct on LLaVA-CoT-100k on one chip (see docs/lora.md; every key and
its default in llava_cot_jax/train/config.py).

    python -m llava_cot_jax.main --config configs/lora_llava_cot_11b.py \
        --config.model.weights=ckpt/llama32v_11b --config.data.train=DATA/tfds --workdir runs/lora_11b

The frozen model is bfloat16 with its text decoder in int8 (QLoRA; `--config.model.quantize=` for a bf16 base);
rank-16 adapters (alpha 32, dropout 0.05) on every text layer's q/k/v/o and MLP projections train in float32 with
their AdamW moments. LLaVA-CoT's global batch of 32 is 32 micro-batches of one sample (gradient accumulation), at up
to 2048 tokens with one 4-tile image per sample; the learning rate is llama-recipes' LoRA default (1e-4).

Args (`--config configs/lora_llava_cot_11b.py:ARG`):
  chip (default)  one accelerator (aimed at a 16 GB Colab v5e-1 or a 24 GB GPU; at 2048 tokens the step needs
                  about 16 GiB, 140 MiB more than a v5e-1 holds; at 1024 tokens, --config.data.seq_buckets="(1024,)",
                  it fits: 15.47 GiB; see docs/lora.md, "Memory")
  runlocal        a few CPU steps of the tiny architecture on synthetic data (a smoke test of this file)
"""

from llava_cot_jax.train.config import default_config, with_arg


def get_config(arg: str | None = None):
    c = default_config()
    c.model.preset = "11b"
    c.model.param_dtype = "bfloat16"  # the frozen base needs no float32 master copy
    c.model.quantize = "int8"
    c.model.attention_chunk = 256  # attention scores 256 queries at a time (docs/lora.md, "Memory")
    c.train.lora.rank = 16
    c.train.lora.alpha = 32.0
    c.train.lora.dropout = 0.05
    c.train.global_batch = 32
    c.train.micro_batches = 32
    c.optimizer.learning_rate = 1e-4
    c = with_arg(c, arg, {"chip": (1, 1, 1)})
    if arg == "runlocal":
        c.model.param_dtype = "float32"
    return c
