"""Every setting of a training run, with its default: configs/sft_*.py start from `default_config()` and change
what differs. The `model` and `mesh` groups and the top-level keys are config_schema's (the same in every mode);
an unknown key is an error on the command line.

The defaults are LLaVA-CoT's published recipe (PKU-YuanGroup/LLaVA-CoT `train/` on llama-recipes v0.0.4.post1):
all parameters trained, AdamW lr 1e-5, betas (0.9, 0.999), eps 1e-8, weight decay 0, no warmup, no clipping, lr x 0.85
after each epoch (StepLR), 3 epochs, global batch 32, bf16 compute, activation checkpointing — except that the
parameters and AdamW moments are float32 (master weights) where their run kept both in bf16; see docs/training.md.
"""

from __future__ import annotations

import ml_collections

from llava_cot_jax import config_schema, families


def default_config() -> ml_collections.ConfigDict:
    c = config_schema.base("train")
    c.model.preset = "11b"  # the architecture of a random init (and of an AOT compile) when model.weights is empty
    c.model.param_dtype = "float32"  # master weights (theirs: bf16)
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.mesh.fsdp = -1  # -1: every device not used by the other axes

    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # tools/prepare_data.py output dir, a JSONL file (+ image_root), or a dir with train.jsonl
    c.data.image_root = ""
    # Which records of a JSONL file train: "llava_cot" (every record with an image, as LLaVA-CoT's loader),
    # "strict" (one question, one answer with four well-formed stages) or "llava" (LLaVA-1.5's data: text-only
    # and multi-turn conversations too, turns strictly alternating). A prepared TFDS set was filtered by
    # tools/prepare_data.py --record_filter.
    c.data.record_filter = "llava_cot"
    c.data.eval = ""  # optional held-out set, same forms
    c.data.eval_image_root = ""
    c.data.synthetic_samples = 0  # > 0: write a synthetic set into data.train (default DIR/data/synthetic) if empty
    c.data.synthetic_seed = 0
    c.data.synthetic_image_size = 224
    c.data.seq_buckets = (512, 1024, 2048)  # batches pad to the smallest bucket that fits (one compile per bucket)
    c.data.max_images = 1
    # The llava family's conversation format: vicuna_v1 (instruction tuning) | plain (LLaVA-1.5's stage 1,
    # image then caption), and the system sentence in front of a Vicuna conversation (data/vicuna.py).
    c.data.template = "vicuna_v1"
    c.data.system = ""
    c.data.shuffle_seed = 0
    # Every global batch from one modality: records with an image, or text-only ones (LLaVA-1.5's
    # group_by_modality_length; a text-only llava batch then skips the vision tower). data/pipeline.py.
    c.data.group_by_modality = False
    c.data.pixel_dtype = "uint8"  # uint8 tiles to the device, normalised there (4x fewer bytes than float32)
    c.data.read_threads = 4
    c.data.worker_count = 0  # grain worker processes decoding images (0: threads of this process)

    c.train = ml_collections.ConfigDict()
    c.train.global_batch = 32
    c.train.micro_batches = 1  # gradient accumulation: the global batch is split into this many sequential parts
    c.train.epochs = 3
    c.train.num_steps = 0  # > 0 overrides epochs
    c.train.freeze = ""  # comma-separated groups kept fixed: vision, projector, language, reward_head
    # LoRA (rank > 0): the whole model frozen, low-rank adapters on the text decoder's projections train (see
    # docs/lora.md). targets: comma-separated dotted suffixes of parameter paths ("q_proj": every text layer's,
    # "cross_layers.q_proj": the cross-attention layers' only). With model.quantize=int8 the frozen text decoder is
    # int8 (QLoRA); the adapters and their AdamW moments stay float32.
    c.train.lora = ml_collections.ConfigDict()
    c.train.lora.rank = 0
    c.train.lora.alpha = 16.0
    c.train.lora.dropout = 0.0
    c.train.lora.targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    # "sft": next-token loss on the answers | "pairwise": a reward model (the model + a scalar head on the last
    # token, models/reward.py) trained with the Bradley-Terry loss on data.train pairs (data/pairs.write_pairs)
    c.train.objective = "sft"
    # Divergence check, before a step is committed or checkpointed (see trainer.DivergenceCheck): a step stops the
    # run if its loss or gradient norm is not finite, if its loss exceeds divergence_factor x its median over the
    # last divergence_window steps, or if its update is larger than max_update_ratio x the weights' norm. 0 disables.
    c.train.divergence_factor = 10.0
    c.train.divergence_window = 20
    c.train.max_update_ratio = 1.0

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-5
    c.optimizer.schedule = "step"  # step (x epoch_decay per epoch) | cosine | constant
    c.optimizer.epoch_decay = 0.85
    c.optimizer.warmup_steps = 0
    c.optimizer.warmup_fraction = 0.0  # > 0: the warmup is this fraction of the run's steps instead
    c.optimizer.final_lr_fraction = 0.0  # cosine: the last step's lr as a fraction of learning_rate
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip_norm = 0.0  # > 0: clip the global gradient norm
    c.optimizer.moment_dtype = "float32"  # float32 | bfloat16 | param (each parameter's own dtype)

    c.checkpointing = ml_collections.ConfigDict()  # train-state checkpoints in DIR/checkpoints
    c.checkpointing.every_steps = 500
    c.checkpointing.keep = 3
    c.checkpointing.async_save = True
    # -1: resume from the latest checkpoint; N: from step N (later ones are set aside in DIR/checkpoints_set_aside);
    # 0: start again from the initial weights (every checkpoint set aside). How to leave a diverged run.
    c.checkpointing.restore_step = -1

    c.log_every = 10
    c.eval_every = 0  # > 0 (with data.eval): held-out loss every this many steps
    c.eval_batches = 8
    c.peak_tflops_per_device = 0.0  # for MFU; 0: looked up from the device kind (none on CPU)

    c.distributed = ml_collections.ConfigDict()
    c.distributed.initialize = "auto"  # auto (TPU pods, or a coordinator address set) | on | off
    c.distributed.coordinator_address = ""  # host:port of process 0 (multi-node GPU); empty on TPU pods
    c.distributed.num_processes = 1
    c.distributed.process_id = 0
    c.distributed.cpu_collectives = ""  # "gloo" for multi-process CPU runs (tests)
    return c


def llava15_recipe(stage: str, preset: str) -> ml_collections.ConfigDict:
    """LLaVA-1.5's two-stage recipe (Liu et al. 2023, arXiv 2310.03744; haotian-liu/LLaVA scripts/v1_5/):
    "pretrain" trains the projector alone on captions in the plain format (lr 1e-3, global batch 256); "finetune"
    trains the projector and the decoder with the CLIP tower frozen, on Vicuna v1 conversations (lr 2e-5, global
    batch 128, each batch of one modality). Both: 1 epoch, 3% warmup then cosine decay to 0, no weight decay, bf16,
    sequences up to 2048."""
    c = default_config()
    c.model.family, c.model.preset = "llava", preset
    c.data.record_filter = "llava"  # text-only and multi-turn conversations train too
    c.data.seq_buckets = (1024, 2048)
    c.train.epochs = 1
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_fraction = 0.03
    if stage == "pretrain":
        c.data.template = "plain"
        c.train.global_batch, c.train.freeze, c.optimizer.learning_rate = 256, "vision,language", 1e-3
    elif stage == "finetune":
        c.train.global_batch, c.train.freeze, c.optimizer.learning_rate = 128, "vision", 2e-5
        c.data.group_by_modality = True  # their finetune.sh; stage 1's captions all have an image
    else:
        raise ValueError(f"stage must be 'pretrain' or 'finetune', not {stage!r}")
    return c


def runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks a config to a few CPU steps on synthetic data with the tiny architecture (smoke runs)."""
    c.model.weights = ""
    c.model.preset = families.get(c.model.family).tiny_preset
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.data.train = ""
    c.data.synthetic_samples = 64
    c.data.synthetic_image_size = 56
    c.data.seq_buckets = (256, 512)
    c.data.read_threads = 2
    c.train.global_batch = 8
    c.train.num_steps = 6
    c.train.micro_batches = 1
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.checkpointing.every_steps = 3
    c.log_every = 1
    return c


def with_arg(c: ml_collections.ConfigDict, arg: str | None, meshes: dict[str, tuple[int, int, int]]):
    """Applies a config file's argument: a named (data, fsdp, tensor) mesh preset, or "runlocal"."""
    arg = arg or next(iter(meshes))
    if arg == "runlocal":
        return runlocal(c)
    if arg not in meshes:
        raise ValueError(f"unknown config argument {arg!r}: {' | '.join([*meshes, 'runlocal'])}")
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = meshes[arg]
    return c
