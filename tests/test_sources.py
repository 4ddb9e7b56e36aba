"""Validator (every kind of bad input is reported, counted and skipped or failed on), JsonlSource, TFDS build."""

import json
import subprocess
import sys
from pathlib import Path

import grain
import pytest

from llava_cot_jax.data import sources, synthetic, tfds_builder

GOOD = 6
REPO = Path(__file__).resolve().parents[1]


def _answer(summary="s", caption="c", reasoning="r", conclusion="3"):
    return (
        f"<SUMMARY> {summary} </SUMMARY>\n\n<CAPTION> {caption} </CAPTION>\n\n"
        f"<REASONING> {reasoning} </REASONING>\n\n<CONCLUSION> {conclusion} </CONCLUSION>"
    )


def _record(sample_id, image, answer, question="<image>\nHow many?", extra_turns=()):
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}, *extra_turns]
    return json.dumps({"id": sample_id, "image": image, "conversations": turns})


@pytest.fixture(scope="module")
def broken_dataset(tmp_path_factory):
    """GOOD valid synthetic samples followed by one line per kind of problem; returns (jsonl, image_root)."""
    root = tmp_path_factory.mktemp("broken")
    data = synthetic.write_synthetic_dataset(root / "d", GOOD, seed=0, image_size=28)
    good_image = "synthetic/scene_000000.jpg"
    jpeg = (data.image_root / good_image).read_bytes()
    (data.image_root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (data.image_root / "not_an_image.jpg").write_bytes(b"this is text, not a JPEG")
    bad_lines = [
        '{"id": "malformed", "image": "x.jpg", "conversations": [',  # cut-off JSON
        _record("missing_stage", good_image, "<SUMMARY> s </SUMMARY><CAPTION> c </CAPTION><CONCLUSION> 3</CONCLUSION>"),
        _record("empty_stage", good_image, _answer(reasoning="  ")),
        _record(
            "out_of_order",
            good_image,
            "<CAPTION> c </CAPTION><SUMMARY> s </SUMMARY><REASONING> r </REASONING><CONCLUSION> 3 </CONCLUSION>",
        ),
        _record("missing_file", "synthetic/no_such_scene.jpg", _answer()),
        _record("truncated_jpeg", "truncated.jpg", _answer()),
        _record("text_as_jpeg", "not_an_image.jpg", _answer()),
        _record("dangling_question", good_image, _answer(), extra_turns=[{"from": "human", "value": "And?"}]),
        _record(
            "two_pairs",
            good_image,
            _answer(),
            extra_turns=[{"from": "human", "value": "And?"}, {"from": "gpt", "value": _answer(conclusion="4")}],
        ),
        _record("multi_image", [good_image, good_image], _answer()),
        json.dumps({"id": "no_turns", "image": good_image}),
        _record("text_only", None, _answer(), question="What is 1 + 2?"),
    ]
    with open(data.jsonl_path, "a") as f:
        f.write("\n".join(bad_lines) + "\n\n")
    return data.jsonl_path, data.image_root


# Left out whatever the record filter: unreadable, unusable or without a usable image.
ALWAYS_SKIPPED = {"malformed_json": 1, "missing_image": 1, "corrupt_image": 2, "multi_image": 1, "bad_schema": 1}
# LLaVA-CoT's loader trains on these (kept and counted by default); record_filter="strict" leaves them out.
IRREGULAR = {"missing_stage": 1, "empty_stage": 1, "stage_order": 1, "turn_layout": 1, "multi_turn": 1}
EXPECTED_COUNTS = {**ALWAYS_SKIPPED, "no_image": 1}  # default (llava_cot): a record without an image is left out
KEPT = GOOD + sum(IRREGULAR.values())


def test_default_keeps_what_llava_cot_trained_on_and_counts_every_irregular_record(broken_dataset):
    jsonl, image_root = broken_dataset
    samples, report = sources.validate_jsonl(jsonl, image_root, on_error="skip")
    irregular_ids = ["missing_stage", "empty_stage", "out_of_order", "dangling_question", "two_pairs"]
    assert [s.id for s in samples] == [f"synthetic_0_{i:06d}" for i in range(GOOD)] + irregular_ids
    assert dict(report.counts) == EXPECTED_COUNTS and dict(report.irregular) == IRREGULAR
    assert report.kept == KEPT and report.skipped == sum(EXPECTED_COUNTS.values()) and report.blank_lines == 1
    by_id = {s.id: s for s in samples}
    # paired as LLaVA-CoT's loader pairs turns: the dangling question is dropped, both pairs of two_pairs train
    assert [t["from"] for t in by_id["dangling_question"].conversations] == ["human", "gpt"]
    assert [t["value"] for t in by_id["two_pairs"].conversations[1::2]] == [_answer(), _answer(conclusion="4")]

    summary = report.summary()
    assert f"{KEPT} samples kept, {sum(EXPECTED_COUNTS.values())} skipped" in summary
    assert "record_filter='llava_cot'" in summary and "kept, irregular:" in summary and "left out:" in summary
    # file:line of the malformed line (the first bad line follows the GOOD good ones)
    assert f"{jsonl}:{GOOD + 1}: " in summary
    assert "[id truncated_jpeg]" in summary and "[id text_as_jpeg]" in summary
    assert "missing stage REASONING" in summary and "stage REASONING is empty" in summary
    assert "no such file" in summary and "no_such_scene.jpg" in summary
    assert "train as 1 question/answer pair" in summary and "2 images" in summary and "[id text_only]" in summary
    assert "not checked: token budget" in summary


def test_strict_filter_keeps_single_turn_four_stage_records_only(broken_dataset):
    jsonl, image_root = broken_dataset
    samples, report = sources.validate_jsonl(jsonl, image_root, record_filter="strict")
    assert [s.id for s in samples] == [f"synthetic_0_{i:06d}" for i in range(GOOD)] + ["text_only"]
    assert samples[-1].image is None
    assert dict(report.counts) == {**ALWAYS_SKIPPED, **IRREGULAR} and not report.irregular
    assert report.kept == GOOD + 1 and report.skipped == sum(ALWAYS_SKIPPED.values()) + sum(IRREGULAR.values())
    with pytest.raises(ValueError, match="record_filter must be one of"):
        sources.validate_jsonl(jsonl, image_root, record_filter="loose")


def test_fail_mode_raises_with_the_full_report(broken_dataset):
    jsonl, image_root = broken_dataset
    with pytest.raises(sources.DataValidationError) as info:
        sources.validate_jsonl(jsonl, image_root, on_error="fail")
    message = str(info.value)
    for kind in [*EXPECTED_COUNTS, *IRREGULAR]:
        assert kind in message
    assert "on_error='fail'" in message
    # irregular records that the filter keeps are no reason to fail
    good_only = jsonl.parent / "good_only.jsonl"
    follow_up = [{"from": "human", "value": "And?"}, {"from": "gpt", "value": _answer()}]
    two_pairs = _record("two", "synthetic/scene_000000.jpg", _answer(), extra_turns=follow_up)
    good_only.write_text("".join(jsonl.read_text().splitlines(keepends=True)[:GOOD]) + two_pairs + "\n")
    samples, report = sources.validate_jsonl(good_only, image_root, on_error="fail")
    assert len(samples) == GOOD + 1 and report.ok and report.irregular == {"multi_turn": 1}


def test_examples_per_kind_are_capped(tmp_path):
    data = synthetic.write_synthetic_dataset(tmp_path / "d", 1, image_size=16)
    with open(data.jsonl_path, "a") as f:
        f.write("not json\n" * 7)
    _, report = sources.validate_jsonl(data.jsonl_path, data.image_root, max_examples=2)
    assert report.counts["malformed_json"] == 7
    assert len(report.examples["malformed_json"]) == 2
    assert str(report.examples["malformed_json"][1]).endswith(":3: Expecting value at column 1")


def test_judge_examples_train_under_the_default_filter_only(tmp_path):
    # The demo's judge examples answer "Better response: N" without stage tags.
    data = synthetic.write_synthetic_dataset(tmp_path / "d", 1, image_size=16)
    with open(data.jsonl_path, "a") as f:
        f.write(_record("judge", "synthetic/scene_000000.jpg", "Better response: 1") + "\n")
    samples, report = sources.validate_jsonl(data.jsonl_path, data.image_root)
    assert [s.id for s in samples] == ["synthetic_0_000000", "judge"] and report.ok
    assert report.irregular["missing_stage"] == 1
    samples, report = sources.validate_jsonl(data.jsonl_path, data.image_root, record_filter="strict")
    assert [s.id for s in samples] == ["synthetic_0_000000"] and report.counts["missing_stage"] == 1


def test_token_budget(broken_dataset):
    jsonl, image_root = broken_dataset

    def count_characters(conversations, has_image):
        return sum(len(turn["value"]) for turn in conversations)

    samples, report = sources.validate_jsonl(jsonl, image_root, token_counter=count_characters, max_tokens=450)
    assert report.counts["overlong"] >= 1
    assert all(count_characters(s.conversations, True) <= 450 for s in samples)
    assert "budget 450" in report.summary()
    with pytest.raises(ValueError, match="together"):
        sources.validate_jsonl(jsonl, image_root, max_tokens=10)


def test_token_counter_from_tokenizer(tmp_path):
    tokenizer_module = pytest.importorskip("llava_cot_jax.data.tokenizer")
    tokenizer = tokenizer_module.build_tiny_tokenizer()
    data = synthetic.write_synthetic_dataset(tmp_path / "d", 3, image_size=16)
    counter = sources.make_token_counter(tokenizer)
    samples, _ = sources.validate_jsonl(data.jsonl_path, data.image_root)
    lengths = [counter(s.conversations, True) for s in samples]
    assert all(length > 20 for length in lengths)
    _, report = sources.validate_jsonl(data.jsonl_path, data.image_root, token_counter=counter, max_tokens=min(lengths))
    assert report.kept == sum(length <= min(lengths) for length in lengths)


def test_jsonl_source_with_grain(broken_dataset, caplog):
    jsonl, image_root = broken_dataset
    source = sources.JsonlSource(jsonl, image_root)
    assert len(source) == KEPT
    assert f"{KEPT} samples kept, {sum(EXPECTED_COUNTS.values())} skipped" in caplog.text  # never silent
    assert len(sources.JsonlSource(jsonl, image_root, record_filter="strict")) == GOOD + 1
    record = grain.MapDataset.source(source)[2]
    assert record["id"] == "synthetic_0_000002"
    assert record["image"][:2] == b"\xff\xd8"  # JPEG magic
    assert json.loads(record["conversations"])[0]["from"] == "human"


def test_missing_inputs_have_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="JSONL file not found"):
        sources.validate_jsonl(tmp_path / "nope.jsonl", tmp_path)
    (tmp_path / "a.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="image root"):
        sources.validate_jsonl(tmp_path / "a.jsonl", tmp_path / "no_dir")


# ------------------------------------------------------------------------------------------------- TFDS build


def test_prepare_tfds_writes_shards_and_report(broken_dataset, tmp_path):
    jsonl, image_root = broken_dataset
    prepared = tfds_builder.prepare_tfds(jsonl, image_root, tmp_path / "tfds", num_shards=3, progress=False)
    assert prepared.num_examples == KEPT
    shards = sorted(p.name for p in prepared.builder_dir.glob("*.array_record-*"))
    assert len(shards) == 3
    report_text = (prepared.builder_dir / tfds_builder.REPORT_FILE).read_text()
    assert "corrupt_image: 2" in report_text and "multi_turn: 1" in report_text

    source = tfds_builder.load_tfds_source(prepared.builder_dir)
    assert len(source) == KEPT
    by_id = {source[i]["id"].decode(): source[i] for i in range(len(source))}
    originals = sources.JsonlSource(jsonl, image_root)
    for i in range(KEPT):
        original = originals[i]
        stored = by_id[original["id"]]
        assert stored["image"] == original["image"]
        assert json.loads(stored["conversations"]) == json.loads(original["conversations"])

    with pytest.raises(FileExistsError, match="overwrite"):
        tfds_builder.prepare_tfds(jsonl, image_root, tmp_path / "tfds", progress=False)


def test_prepare_tfds_fail_mode_writes_nothing(broken_dataset, tmp_path):
    jsonl, image_root = broken_dataset
    with pytest.raises(sources.DataValidationError):
        tfds_builder.prepare_tfds(jsonl, image_root, tmp_path / "tfds", on_error="fail", progress=False)
    assert not (tmp_path / "tfds").exists()


def test_interrupted_build_leaves_old_dataset_and_rerun_succeeds(tmp_path, monkeypatch):
    small = synthetic.write_synthetic_dataset(tmp_path / "small", 2, image_size=16)
    bigger = synthetic.write_synthetic_dataset(tmp_path / "bigger", 5, seed=1, image_size=16)
    out = tmp_path / "tfds"
    first = tfds_builder.prepare_tfds(small.jsonl_path, small.image_root, out, progress=False)

    # Interrupt the rebuild half-way through writing examples.
    real_read_record = tfds_builder.sources.read_record
    calls = []

    def read_then_interrupt(sample):
        calls.append(sample.id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_read_record(sample)

    monkeypatch.setattr(tfds_builder.sources, "read_record", read_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        tfds_builder.prepare_tfds(bigger.jsonl_path, bigger.image_root, out, overwrite=True, progress=False)
    monkeypatch.undo()

    assert len(tfds_builder.load_tfds_source(first.builder_dir)) == 2  # the previous dataset is intact
    assert sorted(p.name for p in out.iterdir()) == [tfds_builder.DATASET_NAME]  # no temp dirs left behind

    rerun = tfds_builder.prepare_tfds(bigger.jsonl_path, bigger.image_root, out, overwrite=True, progress=False)
    assert len(tfds_builder.load_tfds_source(rerun.builder_dir)) == 5


def test_killed_build_is_cleaned_up_by_the_rerun(tmp_path):
    """A build killed outright (no Python cleanup) leaves a temp dir, never a dataset; the rerun removes it."""
    data = synthetic.write_synthetic_dataset(tmp_path / "d", 3, image_size=16)
    out = tmp_path / "tfds"
    out.mkdir()
    # What SIGKILL during a build leaves: a temp dir named after a process that no longer exists.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=False
    )
    stale = out / f"{tfds_builder._TMP_PREFIX}{dead.stdout.strip()}-abc"
    (stale / "llava_cot" / "incomplete.x").mkdir(parents=True)
    with pytest.raises(FileNotFoundError):
        tfds_builder.load_tfds_source(out / tfds_builder.DATASET_NAME / tfds_builder.VERSION)
    prepared = tfds_builder.prepare_tfds(data.jsonl_path, data.image_root, out, progress=False)
    assert not stale.exists()
    assert len(tfds_builder.load_tfds_source(prepared.builder_dir)) == 3


def test_prepare_data_cli(broken_dataset, tmp_path):
    jsonl, image_root = broken_dataset
    command = [sys.executable, str(REPO / "tools" / "prepare_data.py"), "--jsonl", str(jsonl)]
    command += ["--image_root", str(image_root), "--num_shards", "2"]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    ok = subprocess.run(
        command + ["--out_dir", str(tmp_path / "a")], capture_output=True, text=True, env=env, check=False
    )
    assert ok.returncode == 0, ok.stderr
    assert f"wrote {KEPT} examples" in ok.stdout and "multi_turn: 1" in ok.stdout
    strict_command = command + ["--out_dir", str(tmp_path / "s"), "--record_filter", "strict"]
    strict = subprocess.run(strict_command, check=False, capture_output=True, text=True, env=env)
    assert strict.returncode == 0 and f"wrote {GOOD + 1} examples" in strict.stdout, strict.stderr
    failed = subprocess.run(
        command + ["--out_dir", str(tmp_path / "b"), "--on_error", "fail"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert failed.returncode == 1 and "corrupt_image: 2" in failed.stderr, failed.stderr
    assert not (tmp_path / "b").exists()
