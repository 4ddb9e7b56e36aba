"""The original LLaVA repository's checkpoints (a LlavaLlama language model in torch .bin shards, the CLIP
checkpoint, a stage-1 mm_projector.bin) assembled into one llava model: the same logits as transformers' Llava
holding the same weights."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from llava_cot_jax.models.llava import hf_reference, original
from llava_cot_jax.models.llava.config import LlavaConfig
from llava_cot_jax.models.llava.model import LlavaForConditionalGeneration
from llava_cot_jax.models.mllama import layout
from llava_cot_jax.models.mllama.layout import CheckpointError

VOCAB = 300


def _names_of_transformers_5(state: dict) -> dict:
    """transformers 4.45's Llava state-dict names renamed to 5.x's, so that the fixture reads under both."""
    renames = (
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.vision_model.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    )
    renamed = {}
    for name, value in state.items():
        for old, new in renames:
            if name.startswith(old):
                name = new + name.removeprefix(old)
                break
        renamed[name] = value
    return renamed


@pytest.fixture(scope="module")
def original_dirs(tmp_path_factory):
    """(lm_dir, clip_dir, projector file, the same weights as a transformers Llava with a 364-token table)."""
    root = tmp_path_factory.mktemp("original")
    tiny = LlavaConfig.tiny()
    text = dataclasses.replace(tiny.text, vocab_size=VOCAB + 64, pad_token_id=VOCAB + 1)
    hf_config = hf_reference.hf_config(tiny.replace(text=text, image_token_id=VOCAB))
    torch.manual_seed(4)
    reference = transformers.LlavaForConditionalGeneration(hf_config).eval()
    hf_reference.perturb_(reference, 4)
    with torch.no_grad():  # the original has 32,000-way rows only: the added rows are zero, as the reader makes them
        reference.get_input_embeddings().weight[VOCAB:] = 0
    state = _names_of_transformers_5({k: v.clone() for k, v in reference.state_dict().items()})

    clip_dir = root / "clip"  # laid out as the Hub's CLIPModel checkpoint: `vision_model.*` (text half omitted)
    clip_dir.mkdir()
    tower = "model.vision_tower."
    save_file(
        {"vision_model." + k.removeprefix(tower): v.numpy() for k, v in state.items() if k.startswith(tower)},
        str(clip_dir / "model.safetensors"),
    )
    (clip_dir / "config.json").write_text(
        json.dumps({"model_type": "clip", "vision_config": reference.config.vision_config.to_dict()})
    )

    lm_dir = root / "llava-v1.5-tiny"
    lm_dir.mkdir()
    lm = {}
    for name, value in state.items():
        if name.startswith("model.language_model."):
            lm["model." + name.removeprefix("model.language_model.")] = value
    lm["model.embed_tokens.weight"] = lm["model.embed_tokens.weight"][:VOCAB].clone()
    lm["lm_head.weight"] = state["lm_head.weight"][:VOCAB].clone()
    projector = {
        f"model.mm_projector.{i}.{p}": state[f"model.multi_modal_projector.linear_{j}.{p}"]
        for i, j in ((0, 1), (2, 2))
        for p in ("weight", "bias")
    }
    torch.save({**lm, **{k: torch.zeros_like(v) for k, v in projector.items()}}, lm_dir / "pytorch_model.bin")
    text = reference.config.text_config
    (lm_dir / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llava_llama",
                "vocab_size": VOCAB,
                "hidden_size": text.hidden_size,
                "num_hidden_layers": text.num_hidden_layers,
                "num_attention_heads": text.num_attention_heads,
                "num_key_value_heads": text.num_key_value_heads,
                "intermediate_size": text.intermediate_size,
                "rms_norm_eps": text.rms_norm_eps,
                "max_position_embeddings": 2048,
                "mm_projector_type": "mlp2x_gelu",
                "mm_vision_select_layer": -2,
                "mm_hidden_size": reference.config.vision_config.hidden_size,
            }
        )
    )
    projector_file = root / "mm_projector.bin"
    torch.save(projector, projector_file)
    return str(lm_dir), str(clip_dir), str(projector_file), reference


def test_assembled_model_matches_transformers(original_dirs):
    lm_dir, clip_dir, projector, reference = original_dirs
    config, params = original.read_original(lm_dir, clip_dir, projector)
    assert (
        config.text.vocab_size == VOCAB and config.image_token_id == VOCAB and config.text.embedding_rows == VOCAB + 64
    )
    model = layout.model_from_params(config, params, None, LlavaForConditionalGeneration)
    inputs = hf_reference.random_inputs(config, np.random.default_rng(2), 12, [1, 1], [[2], [5]], [0, 2])
    with torch.no_grad():
        want = reference(**{k: torch.as_tensor(v) for k, v in inputs.items()}).logits.numpy()[..., :VOCAB]
    got = np.asarray(model(**inputs).logits)
    valid = inputs["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-4, rtol=1e-4)


def test_the_projector_file_replaces_the_language_models(original_dirs):
    lm_dir, clip_dir, projector, _ = original_dirs
    _, without = original.read_original(lm_dir, clip_dir)  # the zero projector stored beside the language model
    _, with_file = original.read_original(lm_dir, clip_dir, projector)
    assert not without[("multi_modal_projector", "linear_1")].any()
    assert with_file[("multi_modal_projector", "linear_1")].any()
    _, fresh = original.read_original(lm_dir, clip_dir, "random")
    assert 0.01 < fresh[("multi_modal_projector", "linear_2")].std() < 0.03


def test_a_missing_tower_is_named(original_dirs):
    lm_dir, _, projector, _ = original_dirs
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): .*vision_tower\.vision_model\.embeddings"):
        original.read_original(lm_dir, None, projector)


def test_the_tool_writes_a_checkpoint_that_loads(original_dirs, tmp_path):
    import subprocess
    import sys

    from llava_cot_jax import checkpoint

    lm_dir, clip_dir, projector, _ = original_dirs
    out = tmp_path / "ckpt"
    tool = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "convert_llava_original.py"
    )
    command = [sys.executable, tool, f"--lm={lm_dir}", f"--clip={clip_dir}", f"--projector={projector}", f"--out={out}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    config = checkpoint.load_config(str(out))
    assert config.text.vocab_size == VOCAB and config.image_token_id == VOCAB
    _, params = checkpoint.load_params(str(out))
    _, want = original.read_original(lm_dir, clip_dir, projector)
    for key, value in want.items():
        np.testing.assert_array_equal(np.asarray(params[key]), value)
