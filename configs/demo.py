"""The offline CPU demo: a small Mllama learns to answer multiple-choice questions about synthetic scenes.

    python -m llava_cot_jax.main --config configs/demo.py --workdir DIR [--config.search=best_of_n]

Writes the data, trains with the real trainer, evaluates held-out questions with the evaluation harness (greedy,
image-blind, and the search method) and prints the table; see llava_cot_jax/demo.py. Without --workdir it works
in the system's temporary directory. A second run in the same DIR reuses the data, the trained checkpoint and the
answers. Arg `runlocal`: every phase on a few samples and steps (tests; its accuracy means nothing).
"""

import os

import ml_collections

from llava_cot_jax import config_file
from llava_cot_jax.train.config import default_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "demo"
    c.seed = 0
    c.compilation_cache = "~/.cache/llava_cot_jax/xla"  # compiled programs kept across runs; "" = off
    c.search = "stage"  # the search compared with greedy: stage | best_of_n | sentence | sample
    c.num_candidates = 2  # N candidates per stage (the paper's tables use 2)
    c.judge_questions = 96  # with judge examples: held-out pairs (the right stage against a corrupted one) to judge
    c.search_questions = 64  # the search runs on the first this many held-out questions (it costs ~10x greedy)
    # Cross-attention gates at init (a fresh Llama-3.2-Vision has 0: the image would not reach the text).
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

    t = default_config()  # the trainer's settings; model.init_from and data.train are filled in by the demo
    t.model.compute_dtype = "float32"
    t.model.remat = "none"
    t.data.seq_buckets = (160, 208)  # every question and answer fits 160 (one compiled step); judge examples 208
    t.data.read_threads = 2
    t.train.global_batch = 16
    t.train.num_steps = 600
    t.optimizer.learning_rate = 5e-3
    t.optimizer.schedule = "cosine"
    t.optimizer.warmup_steps = 20
    t.optimizer.final_lr_fraction = 0.05
    t.optimizer.grad_clip_norm = 1.0
    t.checkpoint.every_steps = 100
    t.checkpoint.keep = 2
    t.log_every = 5
    c.trainer = t

    e = config_file.load(os.path.join(os.path.dirname(__file__), "eval_mcq.py"))  # the evaluation harness
    e.batch_size = 16
    # The trainer strips questions as LLaVA-CoT's loader does; asked the unstripped VLMEvalKit prompt (a trailing
    # " \n" it never saw), the demo model answered 23/30 colour questions instead of 30/30 (first 64 held-out rows).
    e.strip_prompt = True
    e.infer.dtype = "float32"  # XLA:CPU runs float32 well (the harness's default is bfloat16, as LLaVA-CoT's)
    e.infer.max_new_tokens = 128  # a whole answer (greedy)
    e.infer.stage_max_new_tokens = 40  # one stage candidate
    e.infer.judge_max_new_tokens = 16  # "Better response: N" is 13 tokens of the tiny tokenizer
    c.eval = e

    if arg == "runlocal":
        c.search_questions = 4
        c.judge_questions = 4
        c.data.train_scenes = 48
        c.data.heldout_questions = 8
        c.data.judge_fraction = 0.5
        t.train.global_batch = 8
        t.train.num_steps = 4
        t.optimizer.warmup_steps = 1
        t.checkpoint.every_steps = 2
        t.log_every = 1
        e.batch_size = 4
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}: runlocal or none")
    return c
