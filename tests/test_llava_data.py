"""LLaVA's conversation data (a JSON array) through the shared validator and the llava family's example encoder:
what is kept, what is left out and why, and what a text-only or multi-turn record becomes."""

import json

import numpy as np
import PIL.Image
import pytest

from llava_cot_jax.data import sources
from llava_cot_jax.data.chat import IGNORE_INDEX
from llava_cot_jax.data.llava_image import LlavaImageProcessor
from llava_cot_jax.data.pipeline import LlavaExampleEncoder, PadBatch, PipelineConfig
from llava_cot_jax.data.tokenizer import build_tiny_vicuna_tokenizer

RECORDS = [
    {
        "id": "multi_turn",
        "image": "cube.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"},
            {"from": "gpt", "value": "A red cube."},
            {"from": "human", "value": "How many?"},
            {"from": "gpt", "value": "One."},
        ],
    },
    {"id": "text_only", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]},
    {
        "id": "not_alternating",
        "image": "cube.png",
        "conversations": [
            {"from": "human", "value": "<image>\nA?"},
            {"from": "gpt", "value": "B."},
            {"from": "gpt", "value": "C."},
        ],
    },
    {
        "id": "tag_without_image",
        "conversations": [{"from": "human", "value": "<image>\nA?"}, {"from": "gpt", "value": "B"}],
    },
    {
        "id": "missing_file",
        "image": "nowhere.png",
        "conversations": [{"from": "human", "value": "<image>\nA?"}, {"from": "gpt", "value": "B"}],
    },
]


@pytest.fixture
def data(tmp_path):
    PIL.Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "cube.png")
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(RECORDS, indent=1))
    return path


def test_llava_filter_keeps_text_only_and_multi_turn_and_names_the_rest(data):
    samples, report = sources.validate_jsonl(data, data.parent, record_filter="llava")
    assert [s.id for s in samples] == ["multi_turn", "text_only"]
    assert report.counts["turn_layout"] == 1 and report.counts["missing_image"] == 2
    summary = report.summary()
    assert "mix.json[2]" in summary and "do not alternate" in summary  # located by array index
    assert "mix.json[3]" in summary or "mix.json[4]" in summary
    with pytest.raises(sources.DataValidationError, match="missing_image|image"):
        sources.validate_jsonl(data, data.parent, record_filter="llava", on_error="fail")


def test_llava_cot_filter_still_drops_text_only_records(data):
    samples, report = sources.validate_jsonl(data, data.parent)
    assert "text_only" not in [s.id for s in samples] and report.counts["no_image"] == 1


def test_a_broken_json_array_names_where(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"id": "a", "conversations": []},\n {"id": ')
    with pytest.raises(ValueError, match=r"broken.json: not a valid JSON array .* line 2"):
        sources.validate_jsonl(path, tmp_path, record_filter="llava")


def test_encoded_records_train_on_every_answer_and_read_their_image(data):
    source = sources.JsonlSource(data, data.parent, record_filter="llava")
    processor = LlavaImageProcessor(size=28)
    tokenizer = build_tiny_vicuna_tokenizer()
    config = PipelineConfig(batch_size=2, seq_buckets=(64, 128), pixel_dtype="float32")
    encoder = LlavaExampleEncoder(tokenizer, processor, config)
    multi, text_only = encoder(source[0]), encoder(source[1])
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert (multi["input_ids"] == image_id).sum() == processor.image_tokens and multi["pixel_values"].any()
    assert (text_only["input_ids"] == image_id).sum() == 0 and not text_only["pixel_values"].any()
    trained = tokenizer.decode(multi["input_ids"][multi["labels"] != IGNORE_INDEX]).replace(" ", "")
    assert trained == "Aredcube.</s>One.</s>"
    batch = PadBatch(config.seq_buckets, tokenizer.pad_token_id)([multi, text_only])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    assert batch["input_ids"].shape == (2, 64) and batch["pixel_values"].shape == (2, 1, 3, 28, 28)
    np.testing.assert_array_equal(
        batch["attention_mask"].sum(1), [len(multi["input_ids"]), len(text_only["input_ids"])]
    )
