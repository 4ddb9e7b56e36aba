"""The LLaVA-CoT study on the synthetic reasoning task: the answer-format ablation and inference scaling.

    python -m llava_cot_jax.main --config configs/study.py --workdir DIR [--config.scaling.num_candidates=2,4]

Trains one demo-size model per answer format (direct / untagged / tagged stages) on the same scenes, evaluates each
greedily on held-out questions, runs the search methods on the tagged model at several N, and writes DIR/study.json,
DIR/study.md and the figures; see llava_cot_jax/study.py. A second run in the same DIR reuses every phase.
Arg `runlocal`: every phase on a few samples and steps (tests; its numbers mean nothing).
"""

import ml_collections

from llava_cot_jax import config_schema
from llava_cot_jax.eval.config import default_config as eval_config
from llava_cot_jax.generate.config import search_group
from llava_cot_jax.train.config import default_config as train_config


def get_config(arg: str | None = None):
    c = config_schema.base("study")
    c.model.preset = "demo"  # MllamaConfig.demo: ~1.4M parameters, 64-px one-tile images (every format the same)
    c.model.dtype = "float32"  # XLA:CPU runs float32 well
    c.model.param_dtype = "float32"
    c.model.remat = "none"
    # Budgets of the tiny tokenizer: a tagged answer is at most ~200 tokens, one stage ~90, a judge verdict 13.
    c.search = search_group(
        method="greedy",
        num_candidates=2,
        max_new_tokens=256,
        stage_max_new_tokens=112,
        sentence_max_new_tokens=64,
        judge_max_new_tokens=16,
    )
    c.init_gate = 0.5  # cross-attention gates at init (demo.build_demo_checkpoint)

    c.data = ml_collections.ConfigDict()
    c.data.image_size = 64
    c.data.object_scale = 1.8
    c.data.kinds = "remove,compare,conjunction"  # synthetic.REASONING_KINDS
    c.data.formats = "direct,untagged,tagged"  # synthetic.ANSWER_FORMATS: one model each, same scenes
    c.data.train_scenes = 4000
    c.data.train_seed = 0
    c.data.heldout_questions = 500
    c.data.heldout_seed = 1  # another seed than training: held-out scenes are new
    # Share of training scenes that also carry a judge example (a right stage against a corrupted one, in the
    # search's judge prompt, answered "Better response: N"); the same examples in every format's data.
    c.data.judge_fraction = 0.25

    # The self-judge measured on held-out pairs: this many held-out scenes, three pairs each (0: skip).
    c.judge = ml_collections.ConfigDict()
    c.judge.scenes = 64

    # The reward model (reward-scored searches): the tagged model plus a scalar head, trained by the trainer with
    # the pairwise loss on three stage pairs of each of the first train_scenes training scenes.
    c.reward = ml_collections.ConfigDict()
    c.reward.train_scenes = 1600
    c.reward.steps = 300
    c.reward.learning_rate = 1e-3
    c.reward.heldout_scenes = 100  # held-out pair accuracy
    c.reward.calibration_scenes = 32  # training scenes whose pair rewards set SWIRES's threshold

    # Inference scaling on the tagged model. Methods: greedy, sample, self_consistency (majority vote over N
    # sample runs with seeds seed..seed+N-1), best_of_n, sentence, stage (self-judged), best_of_n_reward and
    # stage_reward (kept by the reward model), swires. greedy and sample have no N.
    c.scaling = ml_collections.ConfigDict()
    c.scaling.methods = "greedy,sample,self_consistency,best_of_n,sentence,stage,best_of_n_reward,stage_reward,swires"
    c.scaling.num_candidates = (2, 4, 8)
    c.scaling.swires_num_candidates = (4,)  # SWIRES answers one question per call: only their N (4 captions)
    # The first this many held-out questions (0: all). The searches cost ~100x greedy per question, and sentence
    # the most; 60 keeps the whole study near an hour on 2 CPU cores (training ~26 min of it, scaling ~30).
    c.scaling.questions = 60
    c.scaling.batch_size = 8  # questions per Searcher.ask call

    c.stats = ml_collections.ConfigDict()
    c.stats.resamples = 2000  # bootstrap resamples (95% percentile intervals)
    c.stats.seed = 0

    t = train_config()  # the trainer's settings; data.train is filled in per format
    t.data.seq_buckets = (128, 320)  # direct answers fit 128 tokens, tagged ones 320 (prompt ~75 + answer <= 200)
    t.data.read_threads = 2
    t.train.global_batch = 16
    t.train.num_steps = 500
    t.optimizer.learning_rate = 5e-3
    t.optimizer.schedule = "cosine"
    t.optimizer.warmup_steps = 20
    t.optimizer.final_lr_fraction = 0.05
    t.optimizer.grad_clip_norm = 1.0
    t.checkpointing.every_steps = 100
    t.checkpointing.keep = 1
    t.log_every = 10
    c.trainer = config_schema.without_shared(t)

    e = eval_config()  # the evaluation harness (greedy on every model)
    e.batch_size = 16
    e.strip_prompt = True  # questions as the trainer saw them (see configs/demo.py)
    c.eval = config_schema.without_shared(e)

    if arg == "runlocal":
        c.data.train_scenes = 24
        c.data.heldout_questions = 6
        c.judge.scenes = 2
        c.reward.train_scenes, c.reward.steps, c.reward.heldout_scenes, c.reward.calibration_scenes = 8, 2, 2, 2
        c.scaling.swires_num_candidates = (2,)
        c.scaling.num_candidates = (2,)
        c.scaling.questions = 0
        c.scaling.batch_size = 3
        c.stats.resamples = 200
        c.search.max_new_tokens = 24
        c.search.stage_max_new_tokens = 8
        c.search.sentence_max_new_tokens = 8
        c.search.judge_max_new_tokens = 4
        t.data.seq_buckets = (320,)  # one compiled train step for the three models
        t.train.global_batch = 4
        t.train.num_steps = 2
        t.optimizer.warmup_steps = 1
        t.checkpointing.every_steps = 2
        t.log_every = 1
        e.batch_size = 3
        c.trainer, c.eval = config_schema.without_shared(t), config_schema.without_shared(e)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}: runlocal or none")
    return c
