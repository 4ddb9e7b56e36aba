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
from llava_cot_jax.train import checkpointing, flops, optim
from llava_cot_jax.train import step as step_lib

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm."""


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
        self.is_primary = jax.process_index() == 0
        os.makedirs(self.workdir, exist_ok=True)

        ensure_synthetic_data(c.data, self.workdir)
        self.source = open_data(c.data.train, c.data.image_root, "data.train", c.data.record_filter)
        self.eval_source = None
        if c.data.eval:
            self.eval_source = open_data(c.data.eval, c.data.eval_image_root, "data.eval", c.data.record_filter)
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
        )
        self.spec = step_lib.build_step_spec(
            self.model_config,
            c.optimizer,
            self.frozen_groups,
            self.mesh,
            self.steps_per_epoch,
            self.total_steps,
            loss_chunk=c.model.loss_chunk,
        )
        step_lib.param_shardings(self.spec)  # a parameter dimension the mesh does not divide fails here, by name
        if c.checkpointing.every_steps < 1:
            raise ValueError("checkpointing.every_steps must be >= 1")
        self.manager = checkpointing.make_manager(
            self.workdir, c.checkpointing.every_steps, c.checkpointing.keep, c.checkpointing.async_save
        )
        device_kind = jax.devices()[0].device_kind
        self.peak_flops = c.peak_tflops_per_device * 1e12 if c.peak_tflops_per_device else flops.peak_flops(device_kind)

    # -------------------------------------------------------------------------------------------- helpers

    def _write_run_files(self) -> None:
        if not self.is_primary:
            return
        files.write_json_atomic(os.path.join(self.workdir, "config.json"), self.config.to_dict(), default=str)
        processor_dir = os.path.join(self.workdir, weights.TRAIN_PROCESSOR_DIR)
        if not os.path.isdir(processor_dir):
            with files.atomic_directory(processor_dir) as tmp:
                self.processor.save_pretrained(tmp)

    def _dataset(self, source, train: bool):
        config = self.pipeline_config
        if not train:
            config = dataclasses.replace(config, shuffle=False, num_epochs=1)
        return pipeline.build_dataset(source, self.processor.tokenizer, self.processor.image_processor, config)

    def _device_batch(self, local: dict) -> dict:
        return pipeline.make_global_batch(
            local,
            step_lib.batch_sharding(self.mesh),
            pad_id=self.processor.tokenizer.pad_token_id,
            micro_batches=self.config.train.micro_batches,
        )

    def step_flops(self, seq_len: int) -> float:
        return flops.train_step_flops(
            self.model_config, self.config.train.global_batch, seq_len, self.config.data.max_images, self.frozen_groups
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
        resume_step = self.manager.latest_step()
        if resume_step is not None:
            state = checkpointing.restore(self.manager, resume_step, abstract, iterator)
            print(f"resumed from {self.manager.directory}/{resume_step}")
        else:
            params = loading.initial_params(c.model, self.model_config, c.seed, self.spec.mesh)
            state = step_lib.init_state(self.spec, params, c.seed)
            del params
        start = int(jax.device_get(state["step"]))
        metrics_writer = MetricsWriter(self.workdir, start, self.is_primary)
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
                state, metrics = train_step(state, self._device_batch(local))
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
                    checkpointing.save(self.manager, state, iterator, self.model_config, force=True)
                if preempted:
                    self.manager.wait_until_finished()
                    print(f"\npreempted: saved step {done} in {self.manager.directory}")
                    return 0
            if pending is not None:
                self._finish(pending, metrics_writer, bar, last_time)
        except TrainingDiverged as err:
            print(f"\nerror: {err}; the last good checkpoint is step {self.manager.latest_step()}")
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

    def _finish(self, pending: PendingStep, writer: MetricsWriter, bar, last_time: float) -> float:
        """Reads a step's metrics (waiting for it), stops on divergence, logs every `log_every` steps."""
        values = {k: v.item() for k, v in jax.device_get(pending.metrics).items()}
        now = time.perf_counter()
        if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
            raise TrainingDiverged(
                f"step {pending.step}: loss {values['loss']}, gradient norm {values['grad_norm']} (not finite)"
            )
        bar.update(1)
        bar.set_postfix(loss=f"{values['loss']:.4f}")
        if pending.step % self.config.log_every == 0 or pending.step == self.total_steps:
            seconds = now - last_time
            step_flops = self.step_flops(pending.seq_len)
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
