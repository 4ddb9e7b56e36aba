"""The trainer: loss and gradients against transformers and finite differences, sharded steps against one device,
gradient accumulation, frozen groups, Orbax train-state checkpoints with exact resume after SIGKILL and SIGTERM,
a two-process run, and the start-up errors."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx

from llava_cot_jax import checkpoint as weights
from llava_cot_jax import loading
from llava_cot_jax.data import synthetic
from llava_cot_jax.models.mllama import params as hf_params
from llava_cot_jax.models.mllama.config import MllamaConfig
from llava_cot_jax.models.mllama.hf_reference import build_hf_model, random_inputs, save_hf_checkpoint
from llava_cot_jax.models.mllama.params import from_hf
from llava_cot_jax.train import config as train_config
from llava_cot_jax.train import loss as loss_lib
from llava_cot_jax.train import step as step_lib
from llava_cot_jax.train import trainer as trainer_lib

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
SFT_TINY = os.path.join(REPO, "configs", "sft_tiny.py")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return synthetic.write_synthetic_dataset(tmp_path_factory.mktemp("data") / "synth", 48, image_size=56)


def labelled(inputs, config, supervised_from=4):
    labels = np.where(inputs["attention_mask"] == 1, inputs["input_ids"], -100)
    labels[:, :supervised_from] = -100
    labels[labels == config.image_token_id] = -100
    return {**inputs, "labels": labels}


# ------------------------------------------------------------------------------------------- against transformers


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    config = MllamaConfig.tiny()
    hf = build_hf_model(config, seed=2)
    path = save_hf_checkpoint(hf, config, str(tmp_path_factory.mktemp("hf") / "ckpt"))
    return config, hf, from_hf(path)


def test_loss_and_gradients_equal_transformers(hf_pair):
    """Two images per sample with multi-tile aspect ratios and padded tiles, right-padded text; no padded image
    slot (transformers' gradients are unsound there, see the finite-difference test)."""
    config, hf, ours = hf_pair
    rng = np.random.default_rng(5)
    inputs = random_inputs(config, rng, 2, 14, [2, 2], [[2, 4], [3, 1]], pad_right=[0, 4])
    batch = labelled(inputs, config)

    hf.zero_grad()
    torch_inputs = {k: torch.as_tensor(v) for k, v in batch.items()}
    ref = hf(**torch_inputs)
    ref.loss.backward()
    ref_grads = {hf_params.hub_name(n): p.grad.numpy() for n, p in hf.named_parameters() if p.grad is not None}

    graphdef, state = nnx.split(ours)
    (loss, aux), grads = jax.value_and_grad(
        lambda s: loss_lib.loss_fn(nnx.merge(graphdef, s), batch, chunk_size=5), has_aux=True
    )(state)
    assert abs(float(loss) - ref.loss.item()) < 1e-5
    assert int(aux["tokens"]) == int(np.sum(batch["labels"][:, 1:] != -100))

    flat = {tuple(str(k) for k in path): np.asarray(v) for path, v in nnx.to_flat_state(grads)}
    ours_hf = dict(hf_params.hf_tensors(flat, config))
    assert set(ref_grads) <= set(ours_hf)
    scale = max(float(np.abs(g).max()) for g in ref_grads.values())
    worst = max((float(np.abs(ours_hf[n] - g).max()), n) for n, g in ref_grads.items())
    assert worst[0] <= 1e-5 * max(scale, 1.0), worst
    # The vision tower, the projector and the gated cross-attention all receive gradient (nothing is cut off).
    for name in (
        "vision_model.class_embedding",
        "multi_modal_projector.weight",
        "language_model.model.layers.3.cross_attn_attn_gate",
    ):
        assert np.abs(ref_grads[name]).max() > 1e-6


def test_gradient_matches_finite_differences_with_a_padded_image_slot():
    """Row 1 has one image in a batch whose rows hold two image slots: its second slot is all padding. In float64
    the directional derivative of the loss along random directions, per parameter group, equals central
    differences of the loss itself."""
    with jax.enable_x64(True):
        config = MllamaConfig.tiny().replace(param_dtype="float64", dtype="float64")
        from llava_cot_jax.models.mllama.model import MllamaForConditionalGeneration

        model = MllamaForConditionalGeneration(config, rngs=nnx.Rngs(3))
        cross = model.language_model.cross_layers
        cross.cross_attn_attn_gate[...] = cross.cross_attn_attn_gate[...] + 0.8
        cross.cross_attn_mlp_gate[...] = cross.cross_attn_mlp_gate[...] - 0.5
        rng = np.random.default_rng(11)
        inputs = random_inputs(config, rng, 2, 12, [2, 1], [[2, 3], [4]], pad_right=[0, 2])
        batch = labelled(inputs, config)
        graphdef, state = nnx.split(model)
        params = nnx.to_pure_dict(state)

        def loss(p):
            merged = jax.tree.map(lambda x: x, state)
            nnx.replace_by_pure_dict(merged, p)
            return loss_lib.loss_fn(nnx.merge(graphdef, merged), batch, chunk_size=4)[0]

        loss = jax.jit(loss)
        grads = jax.jit(jax.grad(loss))(params)
        groups = {
            "vision embeddings": lambda path: path[0] == "vision_model" and "transformer" not in path[1],
            "vision local layers": lambda path: path[:2] == ("vision_model", "transformer"),
            "vision global layers": lambda path: path[:2] == ("vision_model", "global_transformer"),
            "projector": lambda path: path[0].startswith("multi_modal_projector"),
            "cross-attention layers": lambda path: path[:2] == ("language_model", "cross_layers"),
            "self-attention layers": lambda path: path[:2] == ("language_model", "self_layers"),
        }
        eps, results = 1e-6, {}

        def unit_direction(in_group):
            """A random direction over one group's parameters, of unit length (truncation error ~ eps^2)."""
            direction = jax.tree_util.tree_map_with_path(
                lambda path, x: np.asarray(rng.standard_normal(x.shape)) * in_group(tuple(k.key for k in path)),
                params,
            )
            norm = np.sqrt(sum(float(np.sum(d * d)) for d in jax.tree.leaves(direction)))
            return jax.tree.map(lambda d: d / norm, direction)

        def moved(direction, distance):
            return jax.tree.map(lambda p, d: p + distance * d, params, direction)

        for name, in_group in groups.items():
            direction = unit_direction(in_group)
            analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
            numeric = (float(loss(moved(direction, eps))) - float(loss(moved(direction, -eps)))) / (2 * eps)
            results[name] = (analytic, numeric)
        for name, (analytic, numeric) in results.items():
            assert abs(analytic - numeric) <= 1e-9 + 1e-6 * abs(numeric), (name, analytic, numeric)
            assert abs(numeric) > 1e-7, name  # the direction actually moves the loss


# ------------------------------------------------------------------------------------------------ sharded steps


def test_sharded_steps_equal_one_device_and_accumulation_equals_one_batch(xla_cache):
    """tests/train_worker.py on 8 simulated devices: fsdp=8, fsdp=4 x tensor=2, data=2 x fsdp=2 x tensor=2 against
    one device (two steps, fp32, activation checkpointing on), and 4 micro-batches against one batch of 4x."""
    out = subprocess.run(
        [sys.executable, os.path.join(TESTS, "train_worker.py"), xla_cache],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULTS "))[8:])
    assert results["param_change"] > 1e-2  # the steps move the parameters far more than the tolerance
    for mesh in ("fsdp8", "fsdp4_tensor2", "data2_fsdp2_tensor2", "accumulation"):
        assert results[mesh]["loss_diff"] <= 1e-5 and results[mesh]["param_diff"] <= 1e-5, (mesh, results[mesh])
    assert results["auto_mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    errors = results["errors"]
    assert "tensor=2 does not divide text num_attention_heads=3" in errors["heads"]
    assert "global batch 12" in errors["batch"] and "data x fsdp = 1 x 8 = 8" in errors["batch"]
    assert "language_model/cross_layers/k_proj" in errors["parameter"] and "size 8" in errors["parameter"]
    assert "data=3" in errors["devices"]


# ------------------------------------------------------------------------------------------------ frozen groups


def tiny_run_config(data_dir, **overrides):
    c = train_config.runlocal(train_config.default_config())
    c.data.train = str(data_dir)
    c.data.synthetic_samples = 0
    c.compilation_cache = ""
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return c


def test_frozen_groups_do_not_change_and_have_no_optimizer_state(scenes, tmp_path, xla_cache):
    config = tiny_run_config(
        scenes.jsonl_path.parent,
        **{"train.freeze": "vision,projector", "train.num_steps": 2, "optimizer.learning_rate": 1e-2},
    )
    trainer = trainer_lib.Trainer(config, str(tmp_path / "run"))
    params = loading.initial_params(config.model, trainer.model_config, seed=0)
    state = step_lib.init_state(trainer.spec, params, seed=0)
    assert set(state["params"]) == {"language_model"}
    assert set(state["frozen"]) == {"vision_model", "multi_modal_projector", "multi_modal_projector_bias"}
    moment_leaves = jax.tree.leaves(state["opt_state"])
    assert sum(x.size for x in moment_leaves) < 2.5 * sum(x.size for x in jax.tree.leaves(state["params"]))
    train_step = step_lib.jit_train_step(trainer.spec)
    iterator = iter(trainer._dataset(trainer.source, train=True))
    frozen_before = jax.device_get(state["frozen"])
    trained_before = jax.device_get(state["params"])
    for _ in range(2):
        state, _ = train_step(state, trainer._device_batch(next(iterator)))
    for before, after in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(jax.device_get(state["frozen"]))):
        np.testing.assert_array_equal(before, after)  # bit-identical
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(trained_before), jax.tree.leaves(jax.device_get(state["params"])))
    ]
    assert sum(changed) >= len(changed) - 1  # every trained tensor moves (the unused embedding rows may not)


# ------------------------------------------------------------------------------------------- the command line


def cli(workdir, *overrides, cache, data, env=None):
    return [
        sys.executable,
        "-m",
        "llava_cot_jax.main",
        f"--config={SFT_TINY}:runlocal",
        f"--workdir={workdir}",
        f"--config.data.train={data}",
        "--config.data.synthetic_samples=0",
        f"--config.compilation_cache={cache}",
        *overrides,
    ]


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


RUN = ("--config.train.num_steps=8", "--config.checkpointing.every_steps=2", "--config.log_every=1")


def test_resume_after_sigkill_and_sigterm_equals_an_uninterrupted_run(scenes, tmp_path, xla_cache):
    data = scenes.jsonl_path.parent
    reference_dir = tmp_path / "reference"
    out = subprocess.run(
        cli(reference_dir, *RUN, cache=xla_cache, data=data),
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    reference = read_metrics(reference_dir)
    assert [m["step"] for m in reference] == list(range(1, 9))
    assert sorted(os.listdir(reference_dir / "checkpoints")) == ["4", "6", "8"]  # keep=3
    assert (reference_dir / "config.json").exists() and os.listdir(reference_dir / "tb")

    workdir = tmp_path / "interrupted"
    command = cli(workdir, *RUN, cache=xla_cache, data=data)
    checkpoints = workdir / "checkpoints"

    def saving():
        return checkpoints.is_dir() and any("tmp" in name for name in os.listdir(checkpoints))

    def logged_steps():
        path = workdir / "metrics.jsonl"
        return len(path.read_text().splitlines()) if path.exists() else 0

    # 1. SIGKILL while Orbax is writing a checkpoint.
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    while proc.poll() is None and not saving():
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    killed_during_save = saving()
    # 2. SIGKILL at a random moment of the steps after the restart.
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    start = logged_steps()
    while proc.poll() is None and logged_steps() <= start:
        time.sleep(0.01)
    time.sleep(random.Random(0).uniform(0.0, 1.5))
    proc.kill()
    proc.wait()
    # 3. SIGTERM: saves, waits for the save, exits cleanly.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    start = logged_steps()
    while proc.poll() is None and logged_steps() <= start:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    terminated_at = logged_steps()
    if terminated_at < 8:  # it was still training when the signal came
        assert "preempted" in stdout and str(terminated_at) in os.listdir(checkpoints)
    # 4. The same command finishes the run.
    out = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO, check=False)
    assert out.returncode == 0, out.stderr[-3000:]

    assert killed_during_save, "the first kill was meant to land while a checkpoint was being written"
    resumed = read_metrics(workdir)
    assert [m["step"] for m in resumed] == list(range(1, 9))  # every step logged once (a killed run's extras dropped)
    for want, got in zip(reference, resumed):
        assert got["data_crc32"] == want["data_crc32"], got["step"]  # the same data, in the same order
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-6), got["step"]
    assert not any("tmp" in name for name in os.listdir(checkpoints))
    # training makes progress; compared over halves, since single steps are noisy (lr warms up to 3e-3 by step 8)
    assert np.mean([m["loss"] for m in reference[4:]]) < np.mean([m["loss"] for m in reference[:4]])


def test_sigterm_closes_the_checkpoint_manager_and_leaves_a_readable_checkpoint(
    scenes, tmp_path, xla_cache, monkeypatch
):
    """In-process SIGTERM after step 2 is logged: the run saves (asynchronously), closes its Orbax manager on the way
    out, and the checkpoint it leaves loads and resumes."""
    num_steps = 5
    config = tiny_run_config(
        scenes.jsonl_path.parent,
        **{
            "train.num_steps": num_steps,
            "checkpointing.every_steps": 100,
            "checkpointing.async_save": True,
            "log_every": 1,
        },
    )
    write = trainer_lib.MetricsWriter.write

    def write_then_terminate(self, step, values):
        write(self, step, values)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer_lib.MetricsWriter, "write", write_then_terminate)
    workdir = tmp_path / "run"
    trainer = trainer_lib.Trainer(config, str(workdir))
    closes = []
    close = trainer.manager.close
    monkeypatch.setattr(trainer.manager, "close", lambda: (closes.append(True), close()))
    assert trainer.train() == 0
    assert closes == [True]

    checkpoints = workdir / "checkpoints"
    [saved] = os.listdir(checkpoints)  # only the preemption save (every_steps is past the end), complete
    assert 2 <= int(saved) < num_steps
    _, params = weights.load_params(str(checkpoints / saved))
    assert params and all(np.isfinite(v).all() for v in params.values())

    monkeypatch.setattr(trainer_lib.MetricsWriter, "write", write)
    assert trainer_lib.run(config, str(workdir)) == 0  # the same run resumes from it and finishes
    assert [m["step"] for m in read_metrics(workdir)] == list(range(1, num_steps + 1))


def test_two_processes_equal_one(scenes, tmp_path, xla_cache):
    """Two processes of 4 CPU devices each (jax.distributed on localhost, gloo collectives) train exactly as one
    process of 8 devices: the global batches hold the same samples, so the losses agree."""
    data = scenes.jsonl_path.parent
    run = ("--config.train.num_steps=3", "--config.checkpointing.every_steps=3", "--config.log_every=1")
    env8 = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    single = subprocess.run(
        cli(tmp_path / "one", *run, cache=xla_cache, data=data),
        env=env8,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
        check=False,
    )
    assert single.returncode == 0, single.stderr[-3000:]

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env4 = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [
        subprocess.Popen(
            cli(
                tmp_path / "two",
                *run,
                f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={i}",
                "--config.distributed.cpu_collectives=gloo",
                cache=xla_cache,
                data=data,
            ),
            env=env4,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for i in (0, 1)
    ]
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [m["step"] for m in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["supervised_tokens"] == a["supervised_tokens"]
    assert weights.load_params(str(tmp_path / "two" / "checkpoints" / "3"))[1]  # both processes wrote one checkpoint


# ------------------------------------------------------------------------------------------- outputs and errors


def test_training_checkpoint_exports_to_hf_and_loads_for_inference(scenes, tmp_path, xla_cache):
    """Also: the held-out loss is logged when data.eval is set."""
    config = tiny_run_config(
        scenes.jsonl_path.parent,
        **{
            "train.num_steps": 1,
            "checkpointing.every_steps": 1,
            "data.eval": str(scenes.jsonl_path.parent),
            "eval_every": 1,
            "eval_batches": 2,
        },
    )
    assert trainer_lib.run(config, str(tmp_path / "run")) == 0
    logged = read_metrics(tmp_path / "run")
    assert [m["step"] for m in logged] == [1, 1] and np.isfinite(logged[-1]["eval_loss"])
    step_dir = str(tmp_path / "run" / "checkpoints" / "1")
    model = weights.load_model(step_dir)
    assert model.config.text.hidden_size == MllamaConfig.tiny().text.hidden_size
    out = weights.export_to_hf(step_dir, str(tmp_path / "hf"), progress=False)
    assert os.path.exists(os.path.join(out, "tokenizer.json"))  # the run's processor files travel along
    exported = from_hf(out)
    ids = np.array([[5, 6, 7, 8]], np.int32)
    np.testing.assert_array_equal(np.asarray(exported(input_ids=ids).logits), np.asarray(model(input_ids=ids).logits))
    processor = loading.load_processor(
        ml_collections.ConfigDict({"family": "mllama", "weights": step_dir, "processor": ""})
    )
    assert processor.tokenizer.pad_token_id is not None

    # A run that starts from it reads each parameter straight onto the mesh, placed as the train state wants it.
    config.model.weights = step_dir
    trainer = trainer_lib.Trainer(config, str(tmp_path / "second"))
    on_mesh = loading.initial_params(config.model, trainer.model_config, 0, trainer.spec.mesh)
    on_host = loading.initial_params(config.model, trainer.model_config, 0)
    targets = step_lib.param_shardings(trainer.spec)
    assert jax.tree.structure(on_mesh) == jax.tree.structure(on_host) == jax.tree.structure(targets)
    for placed, host, target in zip(jax.tree.leaves(on_mesh), jax.tree.leaves(on_host), jax.tree.leaves(targets)):
        assert isinstance(placed, jax.Array) and placed.sharding == target
        np.testing.assert_array_equal(np.asarray(placed), host)


def test_divergence_is_caught_before_blown_up_weights_are_saved_and_a_rerun_recovers(
    scenes, tmp_path, xla_cache, capsys
):
    """The issue's case: a huge learning rate whose update is finite but blows the weights up. The step is stopped
    before it is checkpointed; a plain rerun is refused with the command; that command (with a sane learning rate)
    resumes from the named checkpoint, reports the changed key and keeps the old config."""
    run = tmp_path / "run"
    overrides = {"train.num_steps": 4, "checkpointing.every_steps": 1, "optimizer.schedule": "constant"}
    config = tiny_run_config(scenes.jsonl_path.parent, **overrides, **{"optimizer.learning_rate": 1e6})
    assert trainer_lib.run(config, str(run)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "train.max_update_ratio" in lines[0], err[-2000:]
    assert "--config.checkpointing.restore_step=0" in lines[0]  # the first update already blew up: no sane step
    assert not os.listdir(run / "checkpoints")

    with pytest.raises(ValueError, match="diverged at step 1.*restore_step=0"):
        trainer_lib.Trainer(config, str(run))

    # A sane run to step 2, then a step-3 blow-up via a jump in loss is simulated by the check itself.
    config = tiny_run_config(scenes.jsonl_path.parent, **overrides, **{"optimizer.learning_rate": 1e-3})
    config.checkpointing.restore_step = 0
    config.train.num_steps = 2
    assert trainer_lib.run(config, str(run)) == 0
    capsys.readouterr()
    assert not (run / trainer_lib.DIVERGED_FILE).exists()

    config.checkpointing.restore_step = 1  # resume an earlier step with another setting
    config.train.num_steps = 3
    config.optimizer.learning_rate = 5e-4
    assert trainer_lib.run(config, str(run)) == 0
    out = capsys.readouterr().out
    assert "optimizer.learning_rate: 0.001 → 0.0005" in out and "set aside checkpoints 2" in out, out
    assert json.loads((run / "config.1.json").read_text())["optimizer"]["learning_rate"] == 1e-3
    assert json.loads((run / "config.json").read_text())["optimizer"]["learning_rate"] == 5e-4
    assert (run / trainer_lib.SET_ASIDE_DIR / "2").is_dir()
    assert sorted(int(s) for s in os.listdir(run / "checkpoints")) == [1, 2, 3]

    config.data.shuffle_seed = 7  # the data order may not change on resume
    with pytest.raises(ValueError, match="data.shuffle_seed changed"):
        trainer_lib.Trainer(config, str(run))
    config.data.shuffle_seed = 0
    saved = json.loads((run / "config.json").read_text())
    del saved["data"]["group_by_modality"]  # a run directory from before the key: it meant no grouping
    (run / "config.json").write_text(json.dumps(saved))
    trainer_lib.Trainer(config, str(run))
    config.model.preset = "demo"  # nor the model's shape
    with pytest.raises(ValueError, match="model's shape differs"):
        trainer_lib.Trainer(config, str(run))


def test_divergence_check_rules():
    check = trainer_lib.DivergenceCheck(factor=10, window=4, max_update_ratio=1.0)
    for loss in (2.0, 1.9, 1.8):
        values = {"loss": loss, "grad_norm": 1.0, "update_ratio": 1e-3}
        check.check(1, values)
        check.accept(values)
    with pytest.raises(trainer_lib.TrainingDiverged, match="loss 25 is over 10 x its median") as caught:
        check.check(4, {"loss": 25.0, "grad_norm": 1.0, "update_ratio": 1e-3})
    assert caught.value.bad_weights_step == 3  # the loss of step 4 is computed on step 3's weights
    with pytest.raises(trainer_lib.TrainingDiverged, match="gradient norm nan") as caught:
        check.check(4, {"loss": 1.0, "grad_norm": float("nan"), "update_ratio": 1e-3})
    with pytest.raises(trainer_lib.TrainingDiverged, match="max_update_ratio") as caught:
        check.check(4, {"loss": 1.0, "grad_norm": 1.0, "update_ratio": 3.0})
    assert caught.value.bad_weights_step == 4
    check.check(4, {"loss": 9.0, "grad_norm": 50.0, "update_ratio": 0.5})  # a gradient-norm jump alone is not
    argv = ["/x/llava_cot_jax/main.py", "--config=configs/sft_tiny.py", "--config.checkpointing.restore_step=5"]
    assert trainer_lib.resume_command(3, argv) == (
        "python -m llava_cot_jax.main --config=configs/sft_tiny.py --config.checkpointing.restore_step=3"
    )


def test_startup_errors_are_one_clear_line(scenes, tmp_path):
    data = scenes.jsonl_path.parent
    cases = {
        "unknown config key": (["--config.train.nope=1"], "unknown config key train.nope"),
        "moved config key": (["--config.model.init_from=x"], "model.init_from is now model.weights"),
        "no dataset": ([f"--config.data.train={tmp_path}"], "holds no dataset"),
        "missing start checkpoint": (
            [f"--config.model.weights={tmp_path}/missing"],
            "checkpoint directory not found",
        ),
        "mesh": (["--config.mesh.data=3", "--config.mesh.fsdp=1"], "needs 3 devices, have 1"),
        "batch": (["--config.train.global_batch=6", "--config.train.micro_batches=4"], "not divisible into 4"),
    }
    for name, (overrides, message) in cases.items():
        command = [
            sys.executable,
            "-m",
            "llava_cot_jax.main",
            f"--config={SFT_TINY}:runlocal",
            f"--workdir={tmp_path / name}",
            f"--config.data.train={data}",
            *overrides,
        ]
        out = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.returncode != 0 and message in out.stderr, (name, out.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error:"), (name, lines)
