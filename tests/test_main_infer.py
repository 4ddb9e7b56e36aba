"""The command line: `python -m llava_cot_jax.main --config configs/infer.py ...` on a tiny HF checkpoint."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import PIL.Image
import pytest

from llava_cot_jax import main as main_lib
from llava_cot_jax.data.image import MllamaImageProcessor
from llava_cot_jax.data.processor import MllamaProcessor
from llava_cot_jax.data.tokenizer import build_tiny_tokenizer
from llava_cot_jax.models.mllama.config import MllamaConfig
from llava_cot_jax.models.mllama.hf_reference import build_hf_model, save_hf_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def infer_command(tmp_path, ckpt, *extra):
    """`main --config configs/infer.py:runlocal` on a random image, a short stage search, the trace in
    tmp_path/trace.json; returns (command, trace path)."""
    image = tmp_path / "img.png"
    PIL.Image.fromarray((np.random.default_rng(0).random((20, 40, 3)) * 255).astype(np.uint8)).save(image)
    trace = tmp_path / "trace.json"
    cmd = [
        sys.executable,
        "-m",
        "llava_cot_jax.main",
        f"--config={REPO}/configs/infer.py:runlocal",
        *extra,
        f"--config.model.weights={ckpt}",
        f"--config.image={image}",
        "--config.question=How many cubes?",
        "--config.search.stage_max_new_tokens=6",
        "--config.search.judge_max_new_tokens=4",
        f"--config.trace={trace}",
        f"--config.compilation_cache={tmp_path}/xla",
    ]
    return cmd, trace


def test_infer_prints_conclusion_and_writes_trace(tmp_path):
    config = MllamaConfig.tiny()
    ckpt = save_hf_checkpoint(build_hf_model(config), config, str(tmp_path / "ckpt"))
    MllamaProcessor(
        MllamaImageProcessor(size=config.vision.image_size, max_image_tiles=4), build_tiny_tokenizer()
    ).save_pretrained(ckpt)
    cmd, trace = infer_command(tmp_path, ckpt)
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(trace.read_text())
    result = data["result"]
    assert [step["step"] for step in result["trace"]] == ["SUMMARY", "CAPTION", "REASONING", "CONCLUSION"]
    assert all(len(step["candidates"]) == 2 for step in result["trace"])
    assert out.stdout.strip().splitlines()[-1] == result["conclusion"].strip() or result["conclusion"].strip() == ""

    missing = subprocess.run(
        cmd[:4] + ["--config.question=hi", f"--config.image={tmp_path}/nope.png"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert missing.returncode == 1 and missing.stderr.startswith("error: image file not found"), missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_infer_runs_a_llava_checkpoint(tmp_path):
    """The same command on the llava family: the question asked in Vicuna v1, a stage search over its four stages."""
    from flax import nnx

    from llava_cot_jax import checkpoint, families

    family = families.get("llava")
    config = family.preset("llava15_tiny")
    ckpt = checkpoint.save_model(str(tmp_path / "ckpt"), family.model_class(config, rngs=nnx.Rngs(0)))
    family.built_in_processor(config).save_pretrained(ckpt)
    cmd, trace = infer_command(tmp_path, ckpt, "--config.model.family=llava")
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(trace.read_text())["result"]
    assert [step["step"] for step in result["trace"]] == ["SUMMARY", "CAPTION", "REASONING", "CONCLUSION"]
    assert all(len(step["candidates"]) == 2 and step["matches"] for step in result["trace"])
    assert out.stdout.strip().splitlines()[-1] == result["conclusion"].strip() or result["conclusion"].strip() == ""


def test_dispatch_rejects_unknown_mode():
    from absl import app

    with pytest.raises(app.UsageError, match="not one of"):
        main_lib.dispatch(ml_collections.ConfigDict({"mode": "nope"}))
