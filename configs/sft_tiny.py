"""A tiny Mllama trained on synthetic CLEVR-like scenes on a laptop CPU, through the real trainer (mesh, Orbax
train-state checkpoints, Grain): the loss falls well below its start within a few minutes.

    python -m llava_cot_jax.main --config configs/sft_tiny.py --workdir /tmp/sft_tiny

The synthetic set (LLaVA-CoT-100k layout) is written to DIR/data/synthetic on the first run.
Arg `runlocal`: a few steps only (tests).
"""

from llava_cot_jax.train.config import default_config, runlocal


def get_config(arg: str | None = None):
    c = runlocal(default_config())
    c.data.synthetic_samples = 512
    c.train.global_batch = 16
    c.train.num_steps = 0
    c.train.epochs = 4
    c.optimizer.learning_rate = 3e-3
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 10
    c.optimizer.final_lr_fraction = 0.1
    c.optimizer.grad_clip_norm = 1.0
    c.checkpointing.every_steps = 50
    c.log_every = 5
    if arg == "runlocal":
        runlocal(c)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}: runlocal or none")
    return c
