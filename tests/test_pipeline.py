"""Grain pipeline: TFDS round trip, batch contents, buckets, per-process sharding, resume exactness, global batch."""

import json
import re

import grain
import jax
import numpy as np
import pytest
from PIL import Image

from llava_cot_jax.data import chat, pipeline, sources, synthetic, tfds_builder
from llava_cot_jax.data.image import MllamaImageProcessor, normalize_on_device

BUCKETS = (64, 128, 256, 512)


@pytest.fixture(scope="module")
def processor():
    return MllamaImageProcessor(size=28, max_image_tiles=4)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """10 synthetic samples with 56x56 images (2x2 tiles of 28 px)."""
    data = synthetic.write_synthetic_dataset(tmp_path_factory.mktemp("scenes") / "d", 10, seed=4, image_size=56)
    return data, sources.JsonlSource(data.jsonl_path, data.image_root)


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """Text-only samples whose question names their index, so a batch shows which records it holds."""
    root = tmp_path_factory.mktemp("numbered")
    (root / "images").mkdir()
    answer = "<SUMMARY> s </SUMMARY><CAPTION> c </CAPTION><REASONING> r </REASONING><CONCLUSION> ok </CONCLUSION>"
    with open(root / "train.jsonl", "w") as f:
        for i in range(11):
            turns = [{"from": "human", "value": f"Record {i} here"}, {"from": "gpt", "value": answer}]
            f.write(json.dumps({"id": str(i), "conversations": turns}) + "\n")
    return sources.JsonlSource(root / "train.jsonl", root / "images", record_filter="strict")  # strict keeps text-only


def _record_numbers(batch, tiny_tokenizer):
    texts = tiny_tokenizer.batch_decode(
        np.where(batch["attention_mask"] == 1, batch["input_ids"], tiny_tokenizer.pad_token_id)
    )
    return [int(re.search(r"Record (\d+) here", text)[1]) for text in texts]


def _single_process(source, tiny_tokenizer, processor, config):
    return pipeline.build_dataset(source, tiny_tokenizer, processor, config, process_index=0, process_count=1)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _close(iterator):
    if hasattr(iterator, "close"):
        iterator.close()  # stops grain worker processes now rather than at garbage collection


def test_batch_contents_match_direct_encoding(scenes, tiny_tokenizer, processor):
    data, source = scenes
    config = pipeline.PipelineConfig(batch_size=4, seq_buckets=BUCKETS, shuffle=False, num_epochs=1)
    batches = list(pipeline.build_dataset(source, tiny_tokenizer, processor, config, process_index=0, process_count=1))
    assert len(batches) == 2  # 10 records, batch 4, remainder dropped
    batch = batches[0]
    assert set(batch) == set(pipeline.BATCH_KEYS)
    length = batch["input_ids"].shape[1]
    assert length in BUCKETS and batch["attention_mask"].sum(1).max() > length // 2  # smallest bucket that fits
    assert batch["pixel_values"].shape == (4, 1, 4, 3, 28, 28) and batch["pixel_values"].dtype == np.float32
    assert batch["cross_attention_mask"].shape == (4, length, 1, 4)

    record = source[0]
    conversations = json.loads(record["conversations"])
    image = processor([Image.open(data.image_root / "synthetic/scene_000000.jpg")])
    direct = chat.encode_training_example(tiny_tokenizer, conversations, True, num_tiles=image["num_tiles"][0])
    n = len(direct["input_ids"])
    np.testing.assert_array_equal(batch["input_ids"][0, :n], direct["input_ids"])
    np.testing.assert_array_equal(batch["labels"][0, :n], direct["labels"])
    np.testing.assert_array_equal(batch["cross_attention_mask"][0, :n], direct["cross_attention_mask"])
    assert (batch["input_ids"][0, n:] == tiny_tokenizer.pad_token_id).all() and (batch["labels"][0, n:] == -100).all()
    assert batch["attention_mask"][0].sum() == n and (batch["cross_attention_mask"][0, n:] == 0).all()
    np.testing.assert_array_equal(batch["pixel_values"][0], image["pixel_values"][0])
    np.testing.assert_array_equal(batch["aspect_ratio_ids"][0], image["aspect_ratio_ids"][0])
    np.testing.assert_array_equal(batch["aspect_ratio_mask"][0], image["aspect_ratio_mask"][0])
    # Only the assistant turn is trained on (from the header's "\n\n", as LLaVA-CoT): the four stages come back.
    answer = tiny_tokenizer.decode(batch["labels"][0][batch["labels"][0] != -100])
    assert answer.startswith("\n\n<SUMMARY>") and answer.endswith(f"</CONCLUSION>{chat.EOT}")


def test_uint8_tiles_normalise_to_the_float_batch(scenes, tiny_tokenizer, processor):
    _, source = scenes
    config = pipeline.PipelineConfig(batch_size=2, seq_buckets=BUCKETS, shuffle=False, num_epochs=1)
    as_float = next(iter(_single_process(source, tiny_tokenizer, processor, config)))
    config = pipeline.PipelineConfig(**{**vars(config), "pixel_dtype": "uint8"})
    as_uint8 = next(iter(_single_process(source, tiny_tokenizer, processor, config)))
    assert as_uint8["pixel_values"].dtype == np.uint8
    normalised = normalize_on_device(
        as_uint8["pixel_values"],
        aspect_ratio_ids=as_uint8["aspect_ratio_ids"],
        aspect_ratio_mask=as_uint8["aspect_ratio_mask"],
    )
    np.testing.assert_allclose(np.asarray(normalised), as_float["pixel_values"], atol=1e-5)


def test_text_only_samples_and_overlong_policy(numbered, tiny_tokenizer, processor):
    config = pipeline.PipelineConfig(batch_size=3, seq_buckets=(16, 32), shuffle=False, num_epochs=1)
    with pytest.raises(ValueError, match=r"sample '0': \d+ tokens exceed the largest sequence bucket \(32\)"):
        config_error = pipeline.PipelineConfig(**{**vars(config), "overlong": "error"})
        next(iter(_single_process(numbered, tiny_tokenizer, processor, config_error)))
    batch = next(iter(_single_process(numbered, tiny_tokenizer, processor, config)))
    assert batch["input_ids"].shape == (3, 32) and batch["attention_mask"].all()  # truncated to the last bucket
    assert (batch["cross_attention_mask"] == 0).all() and (batch["aspect_ratio_ids"] == 0).all()
    assert (batch["pixel_values"] == 0).all()


def test_bucket_length_and_config_checks():
    assert pipeline.bucket_length(1, BUCKETS) == 64
    assert pipeline.bucket_length(64, BUCKETS) == 64
    assert pipeline.bucket_length(65, BUCKETS) == 128
    with pytest.raises(ValueError, match="exceeds the largest bucket 512"):
        pipeline.bucket_length(513, BUCKETS)
    with pytest.raises(ValueError, match="strictly increasing"):
        pipeline.PipelineConfig(batch_size=1, seq_buckets=(128, 64))


def test_processes_share_one_global_order():
    """Global batch k holds the same records however many processes read it; each process reads only its slice;
    every epoch is every record once, reshuffled per epoch."""
    records = list(range(12))
    single = list(
        pipeline.record_dataset(
            records, pipeline.PipelineConfig(batch_size=4, seed=3, num_epochs=2), process_index=0, process_count=1
        )
    )
    config = pipeline.PipelineConfig(batch_size=2, seed=3, num_epochs=2)
    shards = [list(pipeline.record_dataset(records, config, process_index=p, process_count=2)) for p in (0, 1)]
    assert len(single) == 24 and [len(s) for s in shards] == [12, 12]
    for k in range(6):  # global batch k = process 0's slice, then process 1's
        assert single[4 * k : 4 * k + 4] == shards[0][2 * k : 2 * k + 2] + shards[1][2 * k : 2 * k + 2]
    assert sorted(single[:12]) == sorted(single[12:]) == records and single[:12] != single[12:]
    # Finite and not a whole number of global batches: with drop_remainder every process stops at the last whole
    # global batch (hosts stay in step); without it, the last global batch is split as far as it goes.
    odd = pipeline.PipelineConfig(batch_size=2, shuffle=False, num_epochs=1)
    assert [list(pipeline.record_dataset(range(11), odd, process_index=p, process_count=2)) for p in (0, 1)] == [
        [0, 1, 4, 5],
        [2, 3, 6, 7],
    ]
    ragged = pipeline.PipelineConfig(batch_size=2, shuffle=False, num_epochs=1, drop_remainder=False)
    assert [list(pipeline.record_dataset(range(11), ragged, process_index=p, process_count=2)) for p in (0, 1)] == [
        [0, 1, 4, 5, 8, 9],
        [2, 3, 6, 7, 10],
    ]


def test_two_processes_end_to_end(numbered, tiny_tokenizer, processor):
    """Through tokenisation and batching: the two processes' batches hold every record exactly once."""
    config = pipeline.PipelineConfig(batch_size=2, seq_buckets=(64,), num_epochs=1, drop_remainder=False)
    seen = []
    for process in (0, 1):
        dataset = pipeline.build_dataset(
            numbered, tiny_tokenizer, processor, config, process_index=process, process_count=2
        )
        for batch in dataset:
            seen += _record_numbers(batch, tiny_tokenizer)
    assert sorted(seen) == list(range(11))


@pytest.mark.parametrize("worker_count", [0, 1])
def test_resume_sees_exactly_the_uninterrupted_batches(numbered, tiny_tokenizer, processor, worker_count):
    # 11 records, batch 3: the batches straddle epoch boundaries, where the shuffle changes.
    config = pipeline.PipelineConfig(batch_size=3, seq_buckets=(64,), seed=9, worker_count=worker_count)

    def fresh_iterator():
        return iter(_single_process(numbered, tiny_tokenizer, processor, config))

    uninterrupted = fresh_iterator()
    expected = _take(uninterrupted, 8)
    _close(uninterrupted)

    first = fresh_iterator()
    _take(first, 5)
    state = first.get_state()
    json.dumps(state)  # the state is plain data that can be stored with a checkpoint
    _close(first)
    resumed = fresh_iterator()
    resumed.set_state(state)
    got = _take(resumed, 3)
    _close(resumed)
    for want, have in zip(expected[5:], got):
        assert _record_numbers(want, tiny_tokenizer) == _record_numbers(have, tiny_tokenizer)
        for key in pipeline.BATCH_KEYS:
            np.testing.assert_array_equal(want[key], have[key])
    # Two epochs in, the order differs from the first epoch (reshuffled per epoch), yet each epoch is complete.
    order = sum((_record_numbers(b, tiny_tokenizer) for b in expected), [])
    assert sorted(order[:11]) == sorted(order[11:22]) == list(range(11)) and order[:11] != order[11:22]


def test_iterator_state_through_orbax(numbered, tiny_tokenizer, processor, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    config = pipeline.PipelineConfig(batch_size=2, seq_buckets=(64,), seed=1)
    dataset = pipeline.build_dataset(numbered, tiny_tokenizer, processor, config, process_index=0, process_count=1)
    iterator = iter(dataset)
    _take(iterator, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
        manager.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
    expected = next(iterator)

    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
        restored = iter(dataset)
        manager.restore(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    np.testing.assert_array_equal(next(restored)["input_ids"], expected["input_ids"])


def test_tfds_round_trip(scenes, tiny_tokenizer, processor, tmp_path):
    """JSONL → prepare_tfds → tfds data source → Grain gives the same samples as reading the JSONL directly."""
    data, jsonl_source = scenes
    prepared = tfds_builder.prepare_tfds(data.jsonl_path, data.image_root, tmp_path, num_shards=2, progress=False)
    tfds_source = pipeline.open_source(prepared.builder_dir)
    assert len(tfds_source) == len(jsonl_source) == 10
    config = pipeline.PipelineConfig(batch_size=5, seq_buckets=BUCKETS, shuffle=False, num_epochs=1)

    def rows(source):
        """(tokens, pixels) per sample, keyed by the token bytes since TFDS stores records in its own order."""
        out = {}
        for batch in pipeline.build_dataset(
            source, tiny_tokenizer, processor, config, process_index=0, process_count=1
        ):
            for row in range(len(batch["input_ids"])):
                n = batch["attention_mask"][row].sum()
                out[batch["input_ids"][row, :n].tobytes()] = batch["pixel_values"][row]
        return out

    from_tfds, from_jsonl = rows(tfds_source), rows(jsonl_source)
    assert len(from_jsonl) == 10 and from_tfds.keys() == from_jsonl.keys()
    for key in from_jsonl:
        np.testing.assert_array_equal(from_tfds[key], from_jsonl[key])


def test_make_global_batch_single_process(numbered, tiny_tokenizer, processor):
    devices = np.array(jax.devices())
    mesh = jax.sharding.Mesh(devices, ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    config = pipeline.PipelineConfig(batch_size=2 * len(devices), seq_buckets=(64,), shuffle=False)
    local = next(iter(_single_process(numbered, tiny_tokenizer, processor, config)))
    global_batch = pipeline.make_global_batch(local, sharding)
    assert set(global_batch) == set(local)
    for key, value in global_batch.items():
        assert value.shape == local[key].shape and value.sharding == sharding
        np.testing.assert_array_equal(np.asarray(value), local[key])


def test_pad_sequence_axis():
    batch = {
        "input_ids": np.ones((2, 3), np.int32),
        "labels": np.ones((2, 3), np.int32),
        "attention_mask": np.ones((2, 3), np.int32),
        "cross_attention_mask": np.ones((2, 3, 1, 4), np.int32),
        "pixel_values": np.ones((2, 1, 4, 3, 2, 2), np.float32),
    }
    padded = pipeline.pad_sequence_axis(batch, 5, pad_id=7)
    assert padded["input_ids"][:, 3:].tolist() == [[7, 7], [7, 7]]
    assert (padded["labels"][:, 3:] == -100).all() and (padded["attention_mask"][:, 3:] == 0).all()
    assert padded["cross_attention_mask"].shape == (2, 5, 1, 4) and padded["pixel_values"] is batch["pixel_values"]
    with pytest.raises(ValueError, match="longer"):
        pipeline.pad_sequence_axis(batch, 2, pad_id=7)
