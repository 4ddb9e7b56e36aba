"""Synthetic CLEVR-like data: layout, determinism, answers that follow from the scene, clean failure."""

import dataclasses
import json
import re

import numpy as np
import pytest
from PIL import Image

from llava_cot_jax.data import chat, synthetic


def _read(jsonl_path):
    with open(jsonl_path) as f:
        return [json.loads(line) for line in f]


def test_layout_matches_llava_cot(tmp_path):
    data = synthetic.write_synthetic_dataset(tmp_path / "d", num_samples=12, seed=3, image_size=56)
    records = _read(data.jsonl_path)
    assert len(records) == 12
    assert len({r["id"] for r in records}) == 12
    for record in records:
        assert set(record) == {"id", "image", "conversations"}
        human, gpt = record["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt"
        assert chat.validate_stages(gpt["value"]) == [], gpt["value"]
        with Image.open(data.image_root / record["image"]) as image:
            assert image.size == (56, 56) and image.format == "JPEG"


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = synthetic.write_synthetic_dataset(tmp_path / "a", 5, seed=7, image_size=32, image_format="png")
    b = synthetic.write_synthetic_dataset(tmp_path / "b", 5, seed=7, image_size=32, image_format="png")
    c = synthetic.write_synthetic_dataset(tmp_path / "c", 5, seed=8, image_size=32, image_format="png")
    assert a.jsonl_path.read_bytes() == b.jsonl_path.read_bytes()
    image = "synthetic/scene_000004.png"
    assert (a.image_root / image).read_bytes() == (b.image_root / image).read_bytes()
    assert [r["conversations"] for r in _read(a.jsonl_path)] != [r["conversations"] for r in _read(c.jsonl_path)]


def _expected_answer(question, objects):
    """Recomputes the answer from the scene spec by reading the question, independently of the generator."""

    def select(group):
        words = group.split()
        noun = words[-1].rstrip("s")
        color = words[0] if len(words) == 2 else None
        return [o for o in objects if (color is None or o.color == color) and noun in ("object", o.shape)]

    if m := re.fullmatch(r"How many (.+) are in the image\?", question):
        return str(len(select(m[1])))
    if m := re.fullmatch(r"Subtract all (.+)\. How many objects are left\?", question):
        return str(len(objects) - len(select(m[1])))
    if m := re.fullmatch(r"Are there more (\w+)s than (\w+)s\?", question):
        return "Yes" if sum(o.shape == m[1] for o in objects) > sum(o.shape == m[2] for o in objects) else "No"
    if m := re.fullmatch(r"Is the number of (\w+)s the same as the number of (\w+)s\?", question):
        return "Yes" if sum(o.shape == m[1] for o in objects) == sum(o.shape == m[2] for o in objects) else "No"
    if m := re.fullmatch(r"What color is the (\w+) (\w+)\?", question):
        (target,) = [o for o in objects if o.size == m[1] and o.shape == m[2]]
        return target.color
    if m := re.fullmatch(r"What shape is the (\w+) (\w+) object\?", question):
        (target,) = [o for o in objects if o.size == m[1] and o.color == m[2]]
        return target.shape
    raise AssertionError(f"unrecognised question {question!r}")


def test_answers_follow_from_the_scene():
    kinds = set()
    for index in range(300):
        rng = np.random.default_rng([11, index])
        objects = synthetic.random_scene(rng)
        sample = synthetic.make_sample(rng, objects)
        assert sample.conclusion == _expected_answer(sample.question, objects)
        # The caption names every object, so the reasoning can be checked against it.
        assert sample.caption.count(" a ") >= len(objects) - 1
        kinds.add(sample.question.split()[0])
    assert kinds == {"How", "Subtract", "Are", "Is", "What"}


def test_objects_do_not_overlap():
    for index in range(100):
        objects = synthetic.random_scene(np.random.default_rng([5, index]))
        assert 3 <= len(objects) <= 7
        for i, a in enumerate(objects):
            for b in objects[i + 1 :]:
                gap = np.hypot(a.x - b.x, a.y - b.y)
                assert gap > synthetic._RADIUS[a.size] + synthetic._RADIUS[b.size]


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def render_then_fail(objects, image_size):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return Image.new("RGB", (image_size, image_size))

    monkeypatch.setattr(synthetic, "render_scene", render_then_fail)
    with pytest.raises(KeyboardInterrupt):
        synthetic.write_synthetic_dataset(tmp_path / "d", 10, image_size=16)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_without_permission(tmp_path):
    synthetic.write_synthetic_dataset(tmp_path / "d", 2, image_size=16)
    with pytest.raises(FileExistsError, match="overwrite"):
        synthetic.write_synthetic_dataset(tmp_path / "d", 2, image_size=16)
    data = synthetic.write_synthetic_dataset(tmp_path / "d", 3, image_size=16, overwrite=True)
    assert len(_read(data.jsonl_path)) == 3


# ------------------------------------------------------------------------------------------------ multiple choice


def test_multiple_choice_answers_follow_from_the_scene():
    kinds, counts = set(), set()
    for index in range(200):
        objects, sample = synthetic.mcq_scene(2, index, scale=1.8)
        assert 1 <= len(objects) <= synthetic.MCQ_MAX_OBJECTS and all(o.scale == 1.8 for o in objects)
        options = sample.option_map()
        assert list(options) == list("ABCD") and len(set(sample.options)) == 4
        assert options[sample.correct] == sample.conclusion
        assert chat.validate_stages(sample.answer()) == []
        if sample.kind == "color":
            assert len(objects) == 1 and sample.conclusion == objects[0].color
            assert set(sample.options) <= set(synthetic.COLORS)
        else:
            assert sample.kind == "count" and sample.conclusion == str(len(objects))
            assert sorted(sample.options) == ["1", "2", "3", "4"]
            counts.add(len(objects))
        # The caption names every object (colour and shape), whatever the question.
        assert sample.caption.count(" a ") == len(objects)
        assert all(f"{o.color} {o.shape}" in sample.caption for o in objects)
        kinds.add(sample.kind)
    assert kinds == set(synthetic.MCQ_KINDS) and counts == {1, 2, 3, 4}
    assert synthetic.mcq_scene(2, 7) == synthetic.mcq_scene(2, 7)
    assert synthetic.mcq_scene(2, 7, ("count",))[1].kind == "count"
    with pytest.raises(ValueError, match="kinds"):
        synthetic.mcq_scene(2, 7, ("shape",))


def test_corrupted_stages_are_wrong():
    rng = np.random.default_rng(0)
    for index in range(100):
        objects, sample = synthetic.mcq_scene(3, index)
        for stage in chat.STAGES:
            wrong = synthetic.corrupt_stage(rng, objects, sample, stage)
            assert wrong and wrong != getattr(sample, stage.lower()), (stage, wrong)
        wrong = synthetic.corrupt_stage(rng, objects, sample, "CONCLUSION")
        assert wrong in sample.options and wrong != sample.conclusion


def test_larger_objects_do_not_overlap_and_are_drawn_larger():
    rng = np.random.default_rng(4)
    big = synthetic.random_scene(rng, 4, 4, scale=1.8)
    for i, a in enumerate(big):
        for b in big[i + 1 :]:
            assert np.hypot(a.x - b.x, a.y - b.y) > a.radius + b.radius
    one = [dataclasses.replace(big[0], x=0.5, y=0.5)]
    floor = np.asarray(synthetic.render_scene([], 64)).astype(int)
    painted = lambda objects: (
        np.abs(np.asarray(synthetic.render_scene(objects, 64)).astype(int) - floor).sum(-1) > 0
    ).sum()
    assert painted(one) > 2.5 * painted([dataclasses.replace(one[0], scale=1.0)])


def test_write_scenes_writes_several_conversations_per_image(tmp_path):
    def scene(index):
        objects, sample = synthetic.mcq_scene(0, index)
        return objects, [(sample.question, sample.answer()), ("Which is better?", "Better response: 1")]

    data = synthetic.write_scenes(tmp_path / "d", 3, scene, image_size=32, image_format="png")
    records = _read(data.jsonl_path)
    assert data.num_samples == 6 and len(records) == 6
    assert [r["id"] for r in records[:2]] == ["synthetic_0_000000", "synthetic_0_000000_1"]
    assert records[0]["image"] == records[1]["image"] == "synthetic/scene_000000.png"
    assert records[1]["conversations"][0]["value"] == "<image>\nWhich is better?"
