"""LLaVA's conversation data (a JSON array) through the shared validator and the llava family's example encoder:
what is kept, what is left out and why, and what a text-only or multi-turn record becomes."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from llava_cot_jax.data import sources, tfds_builder
from llava_cot_jax.data.chat import IGNORE_INDEX
from llava_cot_jax.data.llava_image import LlavaImageProcessor
from llava_cot_jax.data.pipeline import (
    LlavaExampleEncoder,
    PadBatch,
    PipelineConfig,
    build_dataset,
    open_source,
    pad_image_axis,
    record_dataset,
    record_has_image,
)
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


# ------------------------------------------------------------------------------------- batches grouped by modality

GROUP = 4  # the global batch of the grouping tests: 2 processes x 2, or 1 process x 4


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """13 records with an image and 9 text-only ones, interleaved (22: not a multiple of the global batch, so epochs
    straddle global batches)."""
    root = tmp_path_factory.mktemp("mixed")
    PIL.Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "cube.png")
    records = []
    for i in range(22):
        text = i % 5 in (1, 3) or i == 20
        question = f"Record {i} here" if text else f"<image>\nRecord {i} here"
        turns = [{"from": "human", "value": question}, {"from": "gpt", "value": "Yes."}]
        records.append(
            {"id": f"{'txt' if text else 'img'}{i}", "conversations": turns, **({} if text else {"image": "cube.png"})}
        )
    path = root / "mixed.json"
    path.write_text(json.dumps(records))
    return sources.JsonlSource(path, root, record_filter="llava")


def _global_order(source, positions, process_count=1, **config):
    """The ids of the first `positions` records of the global order, read through `process_count` processes."""
    config = PipelineConfig(batch_size=GROUP // process_count, group_by_modality=True, **config)
    shards = [
        record_dataset(source, config, process_index=p, process_count=process_count) for p in range(process_count)
    ]
    per_process = config.batch_size
    order = []
    for k in range(positions // GROUP):  # global batch k: each process's slice of it in turn
        for shard in shards:
            order += [shard[k * per_process + j]["id"] for j in range(per_process)]
    return order


def _mixed_batches(order):
    kinds = [[record_id[:3] for record_id in order[k : k + GROUP]] for k in range(0, len(order), GROUP)]
    return [k for k, batch in enumerate(kinds) if len(set(batch)) > 1]


def test_grouped_batches_hold_one_modality_and_every_record_once_per_epoch(mixed):
    n, epochs = len(mixed), 5
    order = _global_order(mixed, n * epochs // GROUP * GROUP, seed=5)
    ids = sorted(s.id for s in mixed.samples)
    for epoch in range(epochs - 1):
        assert sorted(order[epoch * n : (epoch + 1) * n]) == ids
    # Mixed global batches only where an epoch's leftovers are: at most two per epoch, next to its end.
    mixed_batches = _mixed_batches(order)
    ends = [(epoch + 1) * n for epoch in range(epochs)]
    assert all(any(end - 2 * GROUP <= k * GROUP < end + GROUP for end in ends) for k in mixed_batches)
    assert len(mixed_batches) <= 2 * epochs
    ungrouped = [
        r["id"]
        for r in record_dataset(mixed, PipelineConfig(batch_size=GROUP, seed=5), process_count=1, process_index=0)[
            : len(order)
        ]
    ]
    assert len(_mixed_batches(ungrouped)) > 2 * len(mixed_batches)  # the grouping test is not vacuous
    # Reshuffled every epoch, reproducible from the seed, and the same global batches across 2 processes.
    assert order[:n] != order[n : 2 * n]
    assert _global_order(mixed, len(order), seed=5) == order
    assert _global_order(mixed, len(order), seed=6) != order
    assert _global_order(mixed, len(order), process_count=2, seed=5) == order


def test_grouped_pipeline_resumes_exactly_and_text_batches_carry_no_image(mixed):
    processor = LlavaImageProcessor(size=28)
    tokenizer = build_tiny_vicuna_tokenizer()
    config = PipelineConfig(batch_size=GROUP, seq_buckets=(64,), seed=2, group_by_modality=True)

    def fresh():
        return iter(build_dataset(mixed, tokenizer, processor, config, process_index=0, process_count=1))

    uninterrupted = fresh()
    expected = [next(uninterrupted) for _ in range(10)]  # 40 records: into the second epoch
    first = fresh()
    for _ in range(6):
        next(first)
    resumed = fresh()
    resumed.set_state(first.get_state())
    for want in expected[6:]:
        have = next(resumed)
        assert want.keys() == have.keys()
        for key in want:
            np.testing.assert_array_equal(want[key], have[key])
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    slots = set()
    for batch in expected:
        rows_with_image = (batch["input_ids"] == image_id).any(1)
        # an all-text batch has an empty image axis (CLIP does not run); otherwise one slot per row
        assert batch["pixel_values"].shape[1] == int(rows_with_image.any())
        slots.add(batch["pixel_values"].shape[1])
    assert slots == {0, 1}


def test_tfds_dataset_says_which_records_have_an_image(mixed, tmp_path):
    json_path = Path(mixed.report.source)
    prepared = tfds_builder.prepare_tfds(
        json_path, json_path.parent, tmp_path, record_filter="llava", num_shards=2, progress=False
    )
    source = open_source(prepared.builder_dir)
    flags = record_has_image(source)
    assert flags.tolist() == [bool(source[i]["image"]) for i in range(len(source))] and 0 < flags.sum() < len(flags)
    # Records in sample order with the same flags: the grouped order is the JSON source's.
    config = PipelineConfig(batch_size=GROUP, group_by_modality=True, num_epochs=1)
    grouped = record_dataset(source, config, process_index=0, process_count=1)
    assert [r["id"].decode() for r in grouped] == _global_order(mixed, 20, num_epochs=1)
    (prepared.builder_dir / tfds_builder.HAS_IMAGE_FILE).unlink()  # a dataset prepared before the sidecar existed
    with pytest.raises(
        FileNotFoundError, match=r"has_image.npy is missing.*tools/prepare_data.py.*group_by_modality=False"
    ):
        record_dataset(source, config, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="needs shuffle=True"):
        PipelineConfig(batch_size=2, group_by_modality=True, shuffle=False)


def test_processes_agree_on_the_image_axis():
    batch = {"input_ids": np.zeros((2, 3), np.int32), "pixel_values": np.zeros((2, 0, 3, 4, 4), np.uint8)}
    padded = pad_image_axis(batch, 1)
    assert padded["pixel_values"].shape == (2, 1, 3, 4, 4) and padded["input_ids"] is batch["input_ids"]
    assert pad_image_axis(padded, 1)["pixel_values"] is padded["pixel_values"]
