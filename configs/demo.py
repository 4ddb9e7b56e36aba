"""The offline CPU demo: a small Mllama (or, with --config.model.family=llava, a small LLaVA-1.5-style model) learns
to answer multiple-choice questions about synthetic scenes.

    python -m llava_cot_jax.main --config configs/demo.py --workdir DIR [--config.search.method=best_of_n]

Writes the data, trains with the real trainer, evaluates held-out questions with the evaluation harness (greedy,
image-blind, and the search method) and prints the table; see llava_cot_jax/demo.py. Without --workdir it works
in the system's temporary directory. A second run in the same DIR reuses the data, the trained checkpoint and the
answers. Arg `runlocal`: every phase on a few samples and steps (tests; its accuracy means nothing).
"""

import ml_collections

from llava_cot_jax import config_schema
from llava_cot_jax.eval.config import default_config as eval_config
from llava_cot_jax.generate.config import search_group
from llava_cot_jax.train.config import default_config as train_config


def get_config(arg: str | None = None):
    c = config_schema.base("demo")
    # The family's demo preset: MllamaConfig.demo (~1.4M parameters, 64-px one-tile images) or, with
    # model.family=llava, LlavaConfig.demo (~1.3M parameters, 64 image tokens of a 64-px image in the prompt).
    c.model.preset = "demo"
    c.model.dtype = "float32"  # XLA:CPU runs float32 well
    c.model.param_dtype = "float32"
    c.model.remat = "none"
    # The search compared with greedy, with the demo's budgets (every answer fits 128 tokens of the tiny tokenizer;
    # "Better response: N" is 13). stage | best_of_n | sentence | sample; N = 2 as in the paper's tables.
    c.search = search_group(
        method="stage", num_candidates=2, max_new_tokens=128, stage_max_new_tokens=40, judge_max_new_tokens=16
    )
    c.judge_questions = 96  # with judge examples: held-out pairs (the right stage against a corrupted one) to judge
    c.search_questions = 64  # the search runs on the first this many held-out questions (it costs ~10x greedy)
    # Mllama's cross-attention gates at init (a fresh Llama-3.2-Vision has 0: the image would not reach the text).
    c.init_gate = 0.5

    c.data = ml_collections.ConfigDict()
    c.data.image_size = 64  # the scenes and the model's tile size (MllamaConfig.demo)
    c.data.object_scale = 1.8  # objects drawn larger than the synthetic default: the image is small
    c.data.kinds = "color,count"  # question kinds (data/synthetic.py MCQ_KINDS), each with four options
    c.data.train_scenes = 3000
    c.data.train_seed = 0
    c.data.heldout_questions = 200
    c.data.heldout_seed = 1  # another seed than training: held-out scenes are new
    # Share of training scenes that also get a judge example. 0 by default: within this budget the model did not
    # learn to judge (44% on held-out pairs, chance 50%, after 600 steps with 0.3) and the examples cost a quarter
    # of the training samples; the search then settles its matches by the fallback rules (judge.fallback_winner).
    c.data.judge_fraction = 0.0

    t = train_config()  # the trainer's settings; data.train is filled in by the demo
    # Every question and answer fits 160 tokens with Mllama, 224 with llava's 64 image tokens in the prompt (one
    # compiled step each); judge examples 224 and 288.
    t.data.seq_buckets = (160, 224, 288)
    t.data.read_threads = 2
    t.train.global_batch = 16
    t.train.num_steps = 600
    t.optimizer.learning_rate = 5e-3
    t.optimizer.schedule = "cosine"
    t.optimizer.warmup_steps = 20
    t.optimizer.final_lr_fraction = 0.05
    t.optimizer.grad_clip_norm = 1.0
    t.checkpointing.every_steps = 100
    t.checkpointing.keep = 2
    t.log_every = 5
    c.trainer = config_schema.without_shared(t)

    e = eval_config()  # the evaluation harness
    e.batch_size = 16
    # The trainer strips questions as LLaVA-CoT's loader does; asked the unstripped VLMEvalKit prompt (a trailing
    # " \n" it never saw), the demo model answered 23/30 colour questions instead of 30/30 (first 64 held-out rows).
    e.strip_prompt = True
    c.eval = config_schema.without_shared(e)

    if arg == "runlocal":
        c.search_questions = 4
        c.judge_questions = 4
        c.data.train_scenes = 48
        c.data.heldout_questions = 8
        c.data.judge_fraction = 0.5
        t.train.global_batch = 8
        t.train.num_steps = 4
        t.optimizer.warmup_steps = 1
        t.checkpointing.every_steps = 2
        t.log_every = 1
        e.batch_size = 4
        c.trainer, c.eval = config_schema.without_shared(t), config_schema.without_shared(e)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}: runlocal or none")
    return c
