"""HF <-> Orbax conversion: bit-exact round trips, transformers loading the export, and bad checkpoints."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from llava_cot_jax import checkpoint
from llava_cot_jax.data.tokenizer import save_tiny_tokenizer
from llava_cot_jax.models.mllama.config import MllamaConfig
from llava_cot_jax.models.mllama.hf_reference import build_hf_model, random_inputs, save_hf_checkpoint
from llava_cot_jax.models.mllama.layout import CheckpointError
from llava_cot_jax.models.mllama.params import from_hf, hub_name, safetensors_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = MllamaConfig.tiny()


def _read_all(hf_dir):
    tensors = {}
    for f in safetensors_files(hf_dir):
        tensors.update({hub_name(k): v for k, v in load_file(f).items()})
    return tensors


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A multi-shard fp32 HF checkpoint (Hub key names, as save_pretrained writes them) with a tokenizer."""
    path = str(tmp_path_factory.mktemp("hf") / "model")
    save_hf_checkpoint(build_hf_model(CONFIG, seed=2), CONFIG, path, max_shard_size="300KB")
    save_tiny_tokenizer(path)
    assert len(safetensors_files(path)) > 1
    return path


def _no_partial_dirs(parent):
    return not [d for d in os.listdir(parent) if ".partial-" in d]


def test_round_trip_is_bit_exact_and_transformers_loads_the_export(hf_dir, tmp_path):
    ckpt = checkpoint.convert_hf_to_orbax(hf_dir, str(tmp_path / "ckpt"), progress=False)
    assert os.path.exists(os.path.join(ckpt, "tokenizer.json"))  # side files travel with the weights
    out = checkpoint.export_to_hf(ckpt, str(tmp_path / "hf_out"), max_shard_bytes=200_000, progress=False)

    original, exported = _read_all(hf_dir), _read_all(out)
    assert sorted(original) == sorted(exported)
    for name, value in original.items():
        assert exported[name].dtype == value.dtype and exported[name].shape == value.shape, name
        assert exported[name].tobytes() == value.tobytes(), name
    # Hub key names on disk, and transformers reads them back.
    on_disk = json.load(open(os.path.join(out, "model.safetensors.index.json")))["weight_map"]
    assert "language_model.model.embed_tokens.weight" in on_disk and "language_model.lm_head.weight" in on_disk
    reloaded = transformers.MllamaForConditionalGeneration.from_pretrained(out)
    reference = transformers.MllamaForConditionalGeneration.from_pretrained(hf_dir)
    ref_state = reference.state_dict()
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, ref_state[name]), name
    assert _no_partial_dirs(tmp_path)


def test_checkpoint_loads_the_same_model_as_from_hf(hf_dir, tmp_path):
    ckpt = checkpoint.convert_hf_to_orbax(hf_dir, str(tmp_path / "ckpt"), progress=False)
    inputs = random_inputs(CONFIG, np.random.default_rng(0), 1, 8, [1], [[2]])
    a = np.asarray(checkpoint.load_model(ckpt)(**inputs).logits)
    b = np.asarray(from_hf(hf_dir)(**inputs).logits)
    np.testing.assert_array_equal(a, b)
    # Saving a model back gives the same weights (the trainer's export path).
    again = checkpoint.save_model(str(tmp_path / "again"), checkpoint.load_model(ckpt))
    _, p1 = checkpoint.load_params(ckpt)
    _, p2 = checkpoint.load_params(again)
    assert all(np.array_equal(p1[k], p2[k]) for k in p1)


def test_newer_key_names_load(single_file_checkpoint, tmp_path):
    """Checkpoints saved as `model.language_model.*` / `model.vision_model.*` / `lm_head.*` load too."""
    inputs = random_inputs(CONFIG, np.random.default_rng(1), 1, 8, [1], [[1]])
    before = np.asarray(from_hf(single_file_checkpoint)(**inputs).logits)

    def rename(tensors):
        for name in list(tensors):
            new = (
                "model." + name.replace("language_model.model.", "language_model.", 1)
                if not name.startswith("language_model.lm_head")
                else "lm_head.weight"
            )
            tensors[new] = tensors.pop(name)

    _edit_tensors(single_file_checkpoint, rename)
    assert any(
        k.startswith("model.language_model.layers") for k in load_file(safetensors_files(single_file_checkpoint)[0])
    )
    np.testing.assert_array_equal(np.asarray(from_hf(single_file_checkpoint)(**inputs).logits), before)


def test_bf16_round_trip_is_bit_exact(tmp_path):
    path = str(tmp_path / "bf16")
    save_hf_checkpoint(build_hf_model(CONFIG, seed=4).to(torch.bfloat16), CONFIG, path)
    ckpt = checkpoint.convert_hf_to_orbax(path, str(tmp_path / "ckpt"), progress=False)
    assert checkpoint.load_config(ckpt).param_dtype == "bfloat16"
    out = checkpoint.export_to_hf(ckpt, str(tmp_path / "out"), progress=False)
    original, exported = _read_all(path), _read_all(out)
    assert all(exported[k].tobytes() == v.tobytes() and exported[k].dtype == v.dtype for k, v in original.items())


def test_convert_to_bf16_from_fp32(hf_dir, tmp_path):
    ckpt = checkpoint.convert_hf_to_orbax(hf_dir, str(tmp_path / "ckpt"), dtype="bfloat16", progress=False)
    _, params = checkpoint.load_params(ckpt)
    assert {str(v.dtype) for v in params.values()} == {"bfloat16"}


def test_cli_converts(hf_dir, tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "convert_hf_to_orbax.py"), "--hf_dir", hf_dir, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert checkpoint.load_config(str(out)) == MllamaConfig.from_hf_config(hf_dir)


def test_existing_output_is_not_overwritten(hf_dir, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        checkpoint.convert_hf_to_orbax(hf_dir, str(out), progress=False)
    assert (out / "keep.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def single_file_checkpoint(tmp_path):
    path = str(tmp_path / "hf")
    save_hf_checkpoint(build_hf_model(CONFIG, seed=5), CONFIG, path)
    return path


def _edit_tensors(hf_dir, edit):
    (file,) = safetensors_files(hf_dir)
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _convert_fails(hf_dir, tmp_path, match):
    out = tmp_path / "out"
    with pytest.raises((CheckpointError, ValueError), match=match):
        checkpoint.convert_hf_to_orbax(hf_dir, str(out), progress=False)
    assert not out.exists() and _no_partial_dirs(tmp_path)


def test_missing_tensor(single_file_checkpoint, tmp_path):
    name = "language_model.model.layers.3.cross_attn.k_norm.weight"
    _edit_tensors(single_file_checkpoint, lambda t: t.pop(name))
    _convert_fails(
        single_file_checkpoint, tmp_path, r"1 missing tensor\(s\): language_model\.model\.layers\.3\.cross_attn\.k_norm"
    )


def test_unexpected_tensor(single_file_checkpoint, tmp_path):
    _edit_tensors(single_file_checkpoint, lambda t: t.update({"model.extra_head.weight": np.zeros((2, 2), np.float32)}))
    _convert_fails(single_file_checkpoint, tmp_path, r"1 unexpected tensor\(s\): model\.extra_head\.weight")


def test_shape_mismatch_names_expected_and_found(single_file_checkpoint, tmp_path):
    name = "vision_model.transformer.layers.1.mlp.fc1.weight"
    _edit_tensors(single_file_checkpoint, lambda t: t.update({name: np.zeros((65, 32), np.float32)}))
    _convert_fails(single_file_checkpoint, tmp_path, r"fc1\.weight: expected \(64, 32\), found \(65, 32\)")


def test_unsupported_model_type(single_file_checkpoint, tmp_path):
    cfg_path = os.path.join(single_file_checkpoint, "config.json")
    d = json.load(open(cfg_path))
    d["model_type"] = "qwen2_vl"
    json.dump(d, open(cfg_path, "w"))
    _convert_fails(single_file_checkpoint, tmp_path, r"model_type 'qwen2_vl' is not one this package reads")


def test_truncated_safetensors(single_file_checkpoint, tmp_path):
    (file,) = safetensors_files(single_file_checkpoint)
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size // 2)
    _convert_fails(single_file_checkpoint, tmp_path, r"truncated or corrupt")
