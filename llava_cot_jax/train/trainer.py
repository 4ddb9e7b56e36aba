"""`mode = "train"`: full-parameter SFT of Mllama on LLaVA-CoT data, sharded over a (data, fsdp, tensor) mesh.

    python -m llava_cot_jax.main --config configs/sft_llava_cot_11b.py --workdir DIR

Everything a run writes lives in DIR: `config.json` (the resolved config), `processor/` (tokenizer and image
processor files), `checkpoints/STEP/` (train-state checkpoints, see checkpointing.py), `metrics.jsonl` and `tb/`
(TensorBoard events). Running the same command again resumes from the last complete checkpoint with the same
data order, so a resumed run's losses equal an uninterrupted run's. SIGTERM (a preempted TPU VM or spot GPU)
saves a checkpoint, waits for it and exits cleanly.

Every setting is checked before any heavy work starts: the mesh against the devices, the global batch and the
heads; every parameter dimension against the mesh (named); the data and the checkpoint to start from.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
import zlib

import jax
import numpy as np

from llava_cot_jax import checkpoint as weights
from llava_cot_jax import files, loading, sharding
from llava_cot_jax.data import pipeline
from llava_cot_jax.models.mllama import lora as lora_lib
from llava_cot_jax.train import checkpointing, flops, optim
from llava_cot_jax.train import step as step_lib

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


DIVERGED_FILE = "diverged.json"  # written when a run stops on divergence; a plain rerun is refused while it exists
SET_ASIDE_DIR = "checkpoints_set_aside"  # checkpoints after checkpointing.restore_step are moved here, not deleted
# Settings a resumed run may not change: they decide which samples each step reads, or the train state's layout
# (the model's shape is compared on the checkpoint's own model config).
RESUME_FIXED_KEYS = (
    "data.train",
    "data.record_filter",
    "data.shuffle_seed",
    "data.group_by_modality",
    "data.synthetic_samples",
    "data.synthetic_seed",
    "train.global_batch",
    "train.freeze",
    "train.lora.rank",
    "train.lora.targets",
)
# Fixed keys newer than some run directories: the value a config saved before the key existed meant.
RESUME_FIXED_KEYS_ADDED = {"data.group_by_modality": False}


class TrainingDiverged(RuntimeError):
    """A step failed the divergence check; `bad_weights_step` is the first step whose weights are not trusted."""

    def __init__(self, message: str, bad_weights_step: int):
        super().__init__(message)
        self.bad_weights_step = bad_weights_step


class DivergenceCheck:
    """Decides whether a step may be committed, from its metrics, before anything of it is logged or saved.

    Step N's loss and gradient norm are computed on the weights of step N-1; its update_ratio (|update| / |weights|)
    is the only measure of the weights of step N. So:
      - a non-finite loss or gradient norm, or a loss above `factor` x its median over the last `window` accepted
        steps (once 3 are known): the weights of step N-1 are not trusted. A gradient norm's jump alone is not
        divergence: early steps of a healthy run raise it 10-20x (clipping bounds the update), and an update
        that does blow the weights up is caught by the update ratio;
      - a non-finite update_ratio or one above `max_update_ratio`: the weights of step N are not trusted.
    """

    MIN_HISTORY = 3

    def __init__(self, factor: float, window: int, max_update_ratio: float):
        self.factor, self.window, self.max_update_ratio = factor, max(window, 1), max_update_ratio
        self.losses: list[float] = []

    def seed(self, records) -> None:
        """Accepted values of an earlier part of the run (metrics.jsonl), so a resumed run keeps its baseline."""
        for record in records:
            if isinstance(record.get("loss"), (int, float)):
                self.accept(record)

    def check(self, step: int, values: dict) -> None:
        for key, what in (("loss", "loss"), ("grad_norm", "gradient norm")):
            if not math.isfinite(values[key]):
                raise TrainingDiverged(f"step {step}: {what} {values[key]} (not finite)", step - 1)
        recent = self.losses[-self.window :]
        if self.factor > 0 and len(recent) >= self.MIN_HISTORY:
            median = float(np.median(recent))
            if values["loss"] > self.factor * median:
                raise TrainingDiverged(
                    f"step {step}: loss {values['loss']:.4g} is over {self.factor:g} x its median "
                    f"{median:.4g} of the last {len(recent)} steps",
                    step - 1,
                )
        ratio = values.get("update_ratio")
        if ratio is not None and (
            not math.isfinite(ratio) or (self.max_update_ratio > 0 and ratio > self.max_update_ratio)
        ):
            raise TrainingDiverged(
                f"step {step}: its update is {ratio:.4g} x the weights' norm (limit train.max_update_ratio="
                f"{self.max_update_ratio:g})",
                step,
            )

    def accept(self, values: dict) -> None:
        self.losses.append(float(values["loss"]))
        del self.losses[: -self.window]


def resume_command(step: int, argv: list[str] | None = None) -> str:
    """The command that resumes this run from checkpoint `step`: this process's own command line when it was
    started as `python -m llava_cot_jax.main`, with checkpointing.restore_step set."""
    import shlex
    import sys

    argv = sys.argv if argv is None else argv
    flag = f"--config.checkpointing.restore_step={step}"
    if not argv or not argv[0].endswith(os.path.join("llava_cot_jax", "main.py")):
        return f"rerun with {flag}"
    kept = [a for a in argv[1:] if not a.startswith(("--config.checkpointing.restore_step", "--config.checkpoint."))]
    return shlex.join(["python", "-m", "llava_cot_jax.main", *kept]) + " " + flag


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(old: dict, new: dict) -> dict[str, tuple]:
    """{dotted key: (old value, new value)} for every key whose value differs (missing on one side: None)."""
    old, new = _flatten(old), _flatten(new)
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def _model_shape(config) -> dict:
    """The architecture's sizes (no dtypes or layout), as JSON would hold them."""
    return json.loads(
        json.dumps({"vision": dataclasses.asdict(config.vision), "text": dataclasses.asdict(config.text)})
    )


# ------------------------------------------------------------------------------------------------ set-up


def maybe_initialize_distributed(cfg) -> None:
    """jax.distributed.initialize() for multi-host runs. "auto": when a coordinator address is configured, on TPU
    VMs (JAX reads the slice's layout itself) and under multi-task SLURM or Open MPI launches (JAX reads their
    environment); "on": always; "off": never. Must run before anything touches a JAX device."""
    mode = cfg.initialize
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed.initialize={mode!r}; choose auto, on or off")
    if mode == "off" or (mode == "auto" and not cfg.coordinator_address and not _cluster_launch()):
        return
    if cfg.get("cpu_collectives"):
        jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    kwargs = {}
    if cfg.coordinator_address:
        kwargs = {
            "coordinator_address": cfg.coordinator_address,
            "num_processes": cfg.num_processes,
            "process_id": cfg.process_id,
        }
    jax.distributed.initialize(**kwargs)


def _cluster_launch() -> bool:
    """A TPU VM (its accelerator device files) or a launcher that started several tasks of this program."""
    import glob

    on_tpu_vm = bool(glob.glob("/dev/accel*")) or os.path.isdir("/dev/vfio")
    tasks = max(int(os.environ.get(name, "1")) for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))
    return on_tpu_vm or tasks > 1


def open_data(path: str, image_root: str, what: str, record_filter: str = "llava_cot"):
    """A prepared TFDS dataset (tools/prepare_data.py's --out_dir or its .../llava_cot/1.0.0), a JSONL file with
    its image root, or a directory holding train.jsonl and images/ (the synthetic set's layout)."""
    from llava_cot_jax.data import synthetic, tfds_builder

    if not path:
        raise ValueError(f"{what} is empty: set it to a prepared dataset directory or a JSONL file")
    if os.path.isdir(path):
        candidates = [path, os.path.join(path, tfds_builder.DATASET_NAME, str(tfds_builder.VERSION))]
        for candidate in candidates:
            if os.path.isfile(os.path.join(candidate, "dataset_info.json")):
                return pipeline.open_source(candidate)
        jsonl = os.path.join(path, synthetic.JSONL_NAME)
        if os.path.isfile(jsonl):
            image_root = image_root or os.path.join(path, synthetic.IMAGE_ROOT_NAME)
            return pipeline.open_source(jsonl, image_root, record_filter=record_filter)
        raise FileNotFoundError(
            f"{what}={path} holds no dataset: expected tools/prepare_data.py output (…/{tfds_builder.DATASET_NAME}/"
            f"{tfds_builder.VERSION}/dataset_info.json) or {synthetic.JSONL_NAME}"
        )
    if os.path.isfile(path):
        if not image_root:
            raise ValueError(f"{what}={path} is a JSONL file: set the matching image root too")
        return pipeline.open_source(path, image_root, record_filter=record_filter)
    raise FileNotFoundError(f"{what}: no such file or directory: {path}")


def open_pairs(path: str, image_root: str, what: str, record_filter: str = ""):
    """Preference pairs (`data/pairs.write_pairs`): a pairs JSONL, or a directory holding pairs.jsonl; images
    are relative to the file (image_root and record_filter do not apply)."""
    from llava_cot_jax.data import pairs

    if not path:
        raise ValueError(f"{what} is empty: set it to a pairs JSONL file (data/pairs.py) for train.objective=pairwise")
    return pairs.PairSource(os.path.join(path, pairs.PAIRS_JSONL) if os.path.isdir(path) else path)


def ensure_synthetic_data(data_cfg, workdir: str) -> None:
    """sft_tiny: writes a synthetic LLaVA-CoT-layout set into data.train when that directory is empty."""
    from llava_cot_jax.data import synthetic

    if not data_cfg.synthetic_samples:
        return
    if not data_cfg.train:
        data_cfg.train = os.path.join(workdir, "data", "synthetic")
    path = data_cfg.train
    if os.path.isdir(path) and os.listdir(path):
        return
    if jax.process_index() == 0:
        synthetic.write_synthetic_dataset(
            path,
            data_cfg.synthetic_samples,
            seed=data_cfg.synthetic_seed,
            image_size=data_cfg.synthetic_image_size,
            overwrite=True,
        )
    _sync("synthetic data written")


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------------------------------ metrics


class MetricsWriter:
    """One JSON object per logged step in DIR/metrics.jsonl and TensorBoard events in DIR/tb (tensorboardX, no
    TensorFlow). A resumed run first drops what a killed run logged past the checkpoint it resumes from."""

    def __init__(self, workdir: str, resume_step: int, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self.tb = None
        if not enabled:
            return
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
            with files.atomic_write(self.path) as f:
                f.writelines(kept)
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=resume_step + 1)

    def records(self) -> list[dict]:
        """What this run logged so far (up to the step it resumes from)."""
        if not self.enabled or not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: v for k, v in values.items() if v is not None}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, step)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ------------------------------------------------------------------------------------------------ the run


@dataclasses.dataclass
class PendingStep:
    """A dispatched step whose metrics are read one step later, so the host never waits on the device."""

    step: int  # the step count after this update
    metrics: dict  # device scalars
    samples: int
    real_tokens: int
    padded_tokens: int
    seq_len: int
    with_images: bool  # False: an all-text llava batch, for which CLIP did not run
    data_crc32: int  # checksum of this process's token ids: a resumed run can be checked to see the same data


class Trainer:
    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, os.path.abspath(workdir)
        c = config
        self.mesh = sharding.mesh_from_config(
            c.mesh, global_batch=c.train.global_batch, micro_batches=c.train.micro_batches
        )
        if c.model.weights and not os.path.isdir(c.model.weights):
            raise FileNotFoundError(f"model.weights: checkpoint directory not found: {c.model.weights}")
        self.model_config = loading.arch_config(c.model, training=True)
        step_lib.check_heads(self.model_config, self.mesh)
        step_lib.check_batch(c.train.global_batch, c.train.micro_batches, self.mesh)
        if c.train.global_batch % jax.process_count():
            raise ValueError(f"global batch {c.train.global_batch} is not divisible by {jax.process_count()} processes")
        self.frozen_groups = optim.parse_groups(c.train.freeze)
        self.lora = lora_lib.LoraConfig.from_config(c.train.lora)
        self.is_primary = jax.process_index() == 0
        os.makedirs(self.workdir, exist_ok=True)

        ensure_synthetic_data(c.data, self.workdir)
        self.pairwise = c.train.objective == "pairwise"  # data.train/eval are then pairs (data/pairs.py)
        opened = open_pairs if self.pairwise else open_data
        self.source = opened(c.data.train, c.data.image_root, "data.train", c.data.record_filter)
        self.eval_source = None
        if c.data.eval:
            self.eval_source = opened(c.data.eval, c.data.eval_image_root, "data.eval", c.data.record_filter)
        self.processor = loading.load_processor(c.model, self.model_config)
        loading.check_processor(self.processor, self.model_config)

        per_process = c.train.global_batch // jax.process_count()
        self.steps_per_epoch = len(self.source) // c.train.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"data.train has {len(self.source)} samples, fewer than one global batch ({c.train.global_batch})"
            )
        self.total_steps = c.train.num_steps or c.train.epochs * self.steps_per_epoch
        self.pipeline_config = pipeline.PipelineConfig(
            batch_size=per_process,
            seq_buckets=tuple(c.data.seq_buckets),
            max_images=c.data.max_images,
            seed=c.data.shuffle_seed,
            pixel_dtype=c.data.pixel_dtype,
            read_threads=c.data.read_threads,
            worker_count=c.data.worker_count,
            template=c.data.template,
            system=c.data.system,
            group_by_modality=c.data.group_by_modality,
        )
        self.spec = step_lib.build_step_spec(
            self.model_config,
            c.optimizer,
            self.frozen_groups,
            self.mesh,
            self.steps_per_epoch,
            self.total_steps,
            loss_chunk=c.model.loss_chunk,
            objective=c.train.objective,
            lora=self.lora,
            quantize=c.model.quantize,
        )
        step_lib.param_shardings(self.spec)  # a parameter dimension the mesh does not divide fails here, by name
        if c.checkpointing.every_steps < 1:
            raise ValueError("checkpointing.every_steps must be >= 1")
        self.manager = checkpointing.make_manager(
            self.workdir, c.checkpointing.every_steps, c.checkpointing.keep, c.checkpointing.async_save
        )
        try:
            self.resume_step = self._choose_resume_step()
        except BaseException:
            self.manager.close()  # its background threads would otherwise outlive the error message
            raise
        self.divergence = DivergenceCheck(
            c.train.divergence_factor, c.train.divergence_window, c.train.max_update_ratio
        )
        device_kind = jax.devices()[0].device_kind
        self.peak_flops = c.peak_tflops_per_device * 1e12 if c.peak_tflops_per_device else flops.peak_flops(device_kind)

    # -------------------------------------------------------------------------------------------- resuming

    def _choose_resume_step(self) -> int | None:
        """The checkpoint this run resumes from (None: from the initial weights), after checking that the config
        may resume it. With checkpointing.restore_step, later checkpoints are set aside (moved, not deleted)."""
        wanted = self.config.checkpointing.restore_step
        steps = self.manager.all_steps()
        diverged_file = os.path.join(self.workdir, DIVERGED_FILE)
        if wanted < 0 and os.path.exists(diverged_file):
            with open(diverged_file) as f:
                diverged = json.load(f)
            raise ValueError(
                f"this run diverged at step {diverged['step']} ({diverged['reason']}); resume from a sane "
                f"checkpoint with other settings: {diverged['resume']} (see docs/troubleshooting.md)"
            )
        if wanted < 0:
            step = max(steps) if steps else None
        elif wanted == 0:
            step = None
        elif wanted in steps:
            step = wanted
        else:
            raise ValueError(
                f"checkpointing.restore_step={wanted}: no such checkpoint in {self.manager.directory} "
                f"(have: {', '.join(map(str, sorted(steps))) or 'none'})"
            )
        if step is not None:
            self._check_resumable(step)
        later = sorted(s for s in steps if step is None or s > step)
        if wanted >= 0 and later and self.is_primary:
            aside = os.path.join(self.workdir, SET_ASIDE_DIR)
            os.makedirs(aside, exist_ok=True)
            for s in later:
                target = os.path.join(aside, str(s))
                if os.path.exists(target):
                    target = f"{target}.{int(time.time())}"
                os.replace(os.path.join(str(self.manager.directory), str(s)), target)
            print(f"set aside checkpoints {', '.join(map(str, later))} in {aside}")
        if wanted >= 0:
            _sync("checkpoints set aside")
            self.manager.reload()
            if self.is_primary and os.path.exists(diverged_file):
                os.remove(diverged_file)
        return step

    def _check_resumable(self, step: int) -> None:
        """Refuses (one line) a resume that changes the data order or the model's shape; prints any other
        change of the config against the saved DIR/config.json and keeps the old one as DIR/config.STEP.json."""
        saved_shape = _model_shape(weights.load_config(os.path.join(str(self.manager.directory), str(step))))
        if saved_shape != _model_shape(self.model_config):
            raise ValueError(
                f"the model's shape differs from checkpoint {step}'s in {self.workdir}: resume with the same "
                "model.preset / model.weights, or start a new --workdir"
            )
        path = os.path.join(self.workdir, "config.json")
        if not os.path.exists(path):
            return
        with open(path) as f:
            old = json.load(f)
        changes = config_changes(old, self._config_json())
        changes.pop("checkpointing.restore_step", None)
        for key, meant in RESUME_FIXED_KEYS_ADDED.items():
            if changes.get(key) == (None, meant):
                del changes[key]
        fixed = [key for key in RESUME_FIXED_KEYS if key in changes]
        if fixed:
            key = fixed[0]
            raise ValueError(
                f"resuming {self.workdir} with {key} changed ({changes[key][0]!r} → {changes[key][1]!r}) would "
                f"change the data order: set it back, or start a new --workdir"
            )
        if changes and self.is_primary:
            kept = os.path.join(self.workdir, f"config.{step}.json")
            files.write_json_atomic(kept, old)
            print(f"resuming from step {step} with a changed config (the previous one kept as {kept}):")
            for key, (before, after) in changes.items():
                print(f"  {key}: {before!r} → {after!r}")

    def _lora_record(self) -> dict | None:
        """What a LoRA checkpoint records of its adapters (tools/export_lora.py reads it)."""
        if self.lora is None:
            return None
        return {**dataclasses.asdict(self.lora), "paths": [list(p) for p in self.spec.lora_paths]}

    def _config_json(self) -> dict:
        return json.loads(json.dumps(self.config.to_dict(), default=str))

    # -------------------------------------------------------------------------------------------- helpers

    def _write_run_files(self) -> None:
        if not self.is_primary:
            return
        files.write_json_atomic(os.path.join(self.workdir, "config.json"), self._config_json())
        processor_dir = os.path.join(self.workdir, weights.TRAIN_PROCESSOR_DIR)
        if not os.path.isdir(processor_dir):
            with files.atomic_directory(processor_dir) as tmp:
                self.processor.save_pretrained(tmp)

    def _dataset(self, source, train: bool):
        config = self.pipeline_config
        if not train:
            config = dataclasses.replace(config, shuffle=False, num_epochs=1, group_by_modality=False)
        return pipeline.build_dataset(
            source, self.processor.tokenizer, self.processor.image_processor, config, pairs=self.pairwise
        )

    def _device_batch(self, local: dict) -> dict:
        return pipeline.make_global_batch(
            local,
            step_lib.batch_sharding(self.mesh),
            pad_id=self.processor.tokenizer.pad_token_id,
            micro_batches=self.config.train.micro_batches,
        )

    def step_flops(self, seq_len: int, with_images: bool = True) -> float:
        images = self.config.data.max_images if with_images else 0  # a llava batch of text-only rows has none
        return flops.train_step_flops(
            self.model_config, self.config.train.global_batch, seq_len, images, self.frozen_groups
        )

    def _evaluate(self, eval_step, state) -> float:
        total, count = 0.0, 0
        iterator = iter(self._dataset(self.eval_source, train=False))
        for _, local in zip(range(self.config.eval_batches), iterator):
            nll, tokens = eval_step(state, self._device_batch(local))
            total, count = total + float(nll), count + int(tokens)
        if count == 0:
            raise ValueError("data.eval gave no supervised tokens (fewer samples than one global batch?)")
        return total / count

    # ----------------------------------------------------------------------------------------------- loop

    def train(self) -> int:
        """Runs to the last step, to a SIGTERM (after saving) or to an error; returns the exit code. The checkpoint
        manager is closed however the run ends, so every save it started is complete on disk."""
        try:
            return self._train()
        finally:
            self.manager.close()

    def _train(self) -> int:
        c = self.config
        self._write_run_files()
        iterator = iter(self._dataset(self.source, train=True))
        abstract = step_lib.abstract_state(self.spec)
        resume_step = self.resume_step
        if resume_step is not None:
            frozen = None
            if self.lora is not None:  # the frozen model is not in a LoRA checkpoint: read it again
                params = loading.initial_params(c.model, self.model_config, c.seed, self.spec.mesh)
                frozen = step_lib.place_frozen(self.spec, params)
                del params
            state = checkpointing.restore(self.manager, resume_step, abstract, iterator, frozen)
            print(f"resumed from {self.manager.directory}/{resume_step}")
        else:
            params = loading.initial_params(c.model, self.model_config, c.seed, self.spec.mesh)
            params = step_lib.with_reward_head(self.spec, params, c.seed)
            state = step_lib.init_state(self.spec, params, c.seed)
            del params
        start = int(jax.device_get(state["step"]))
        metrics_writer = MetricsWriter(self.workdir, start, self.is_primary)
        self.divergence.seed(metrics_writer.records())
        train_step = step_lib.jit_train_step(self.spec)
        eval_step = step_lib.jit_eval_step(self.spec) if self.eval_source is not None else None
        if self.is_primary:
            seq = c.data.seq_buckets[-1]
            print(
                f"{self.total_steps} steps ({self.steps_per_epoch} per epoch, global batch {c.train.global_batch}, "
                f"{c.train.micro_batches} micro-batches) on mesh {dict(self.mesh.shape)}; analytic "
                f"{self.step_flops(seq):.3e} FLOPs per step at {seq} tokens (frozen: "
                f"{', '.join(self.frozen_groups) or 'nothing'})"
            )

        # SIGTERM: one process watches for it itself. Several processes must agree on the step at which they all
        # save; JAX's preemption service (started by jax.distributed) catches the signal and
        # manager.reached_preemption names that step, so no Python handler may replace its own there.
        stop = {"signal": None}
        previous_handler = None
        if jax.process_count() == 1:
            previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
        from tqdm import tqdm

        bar = tqdm(total=self.total_steps, initial=start, desc="train", unit="step", disable=not self.is_primary)
        pending: PendingStep | None = None
        last_time = time.perf_counter()
        exit_code = 0
        try:
            for step in range(start, self.total_steps):
                local = next(iterator)
                batch = self._device_batch(local)
                state, metrics = train_step(state, batch)
                if pending is not None:
                    last_time = self._finish(pending, metrics_writer, bar, last_time)
                mask = local["attention_mask"]
                pending = PendingStep(
                    step + 1,
                    metrics,
                    mask.shape[0] * jax.process_count(),
                    int(mask.sum()) * jax.process_count(),
                    mask.size * jax.process_count(),
                    mask.shape[1],
                    batch["pixel_values"].size > 0,
                    zlib.crc32(np.ascontiguousarray(local["input_ids"]).tobytes()),
                )
                done = step + 1
                if eval_step is not None and c.eval_every and done % c.eval_every == 0:
                    last_time = self._finish(pending, metrics_writer, bar, last_time)
                    pending = None
                    metrics_writer.write(done, {"eval_loss": self._evaluate(eval_step, state)})
                    last_time = time.perf_counter()  # evaluation time is not step time
                preempted = stop["signal"] is not None or self.manager.reached_preemption(done)
                if self.manager.should_save(done) or preempted or done == self.total_steps:
                    if pending is not None:  # never save parameters a diverged step produced
                        last_time = self._finish(pending, metrics_writer, bar, last_time)
                        pending = None
                    checkpointing.save(
                        self.manager, state, iterator, self.model_config, force=True, lora=self._lora_record()
                    )
                if preempted:
                    self.manager.wait_until_finished()
                    print(f"\npreempted: saved step {done} in {self.manager.directory}")
                    return 0
            if pending is not None:
                self._finish(pending, metrics_writer, bar, last_time)
        except TrainingDiverged as err:
            self.manager.wait_until_finished()
            bar.close()
            self._report_divergence(err)
            exit_code = 2
        finally:
            self.manager.wait_until_finished()
            bar.close()
            metrics_writer.close()
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
        if exit_code == 0 and self.is_primary:
            print(f"trained to step {self.total_steps}; checkpoints in {self.manager.directory}")
        return exit_code

    def _report_divergence(self, err: TrainingDiverged) -> None:
        """One `error:` line naming the last checkpoint whose weights are trusted and the command that resumes
        from it; the same is kept in DIR/diverged.json so a plain rerun does not resume the untrusted one."""
        import sys

        sane = [s for s in self.manager.all_steps() if s < err.bad_weights_step]
        good = max(sane) if sane else 0
        command = resume_command(good)
        where = f"checkpoint {good}" if sane else "no checkpoint (start again from the initial weights)"
        if self.is_primary:
            files.write_json_atomic(
                os.path.join(self.workdir, DIVERGED_FILE),
                {"step": err.bad_weights_step, "reason": str(err), "last_good": good, "resume": command},
            )
        print(
            f"error: training diverged: {err}; the last sane weights are {where}; to resume from it with other "
            f"settings (e.g. a lower learning rate): {command}",
            file=sys.stderr,
        )

    def _finish(self, pending: PendingStep, writer: MetricsWriter, bar, last_time: float) -> float:
        """Reads a step's metrics (waiting for it), stops on divergence, logs every `log_every` steps."""
        values = {k: v.item() for k, v in jax.device_get(pending.metrics).items()}
        now = time.perf_counter()
        self.divergence.check(pending.step, values)
        self.divergence.accept(values)
        bar.update(1)
        bar.set_postfix(loss=f"{values['loss']:.4f}")
        if pending.step % self.config.log_every == 0 or pending.step == self.total_steps:
            seconds = now - last_time
            step_flops = self.step_flops(pending.seq_len, pending.with_images)
            mfu = None
            if self.peak_flops:
                mfu = step_flops / seconds / (self.peak_flops * jax.device_count())
            writer.write(
                pending.step,
                {
                    **values,
                    "step_time_s": seconds,
                    "samples_per_s": pending.samples / seconds,
                    "real_tokens_per_s": pending.real_tokens / seconds,
                    "padded_tokens_per_s": pending.padded_tokens / seconds,
                    "padding_fraction": 1 - pending.real_tokens / pending.padded_tokens,
                    "seq_len": pending.seq_len,
                    "data_crc32": pending.data_crc32,
                    "flops_per_step": step_flops,
                    "mfu": mfu,
                    "epoch": (pending.step - 1) / self.steps_per_epoch,
                },
            )
        return now


def run(config, workdir: str) -> int:
    if not workdir:
        raise ValueError("training needs --workdir DIR (checkpoints, metrics and the resolved config go there)")
    maybe_initialize_distributed(config.distributed)
    return Trainer(config, workdir).train()
