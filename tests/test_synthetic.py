"""Synthetic CLEVR-like data: layout, determinism, answers that follow from the scene, clean failure."""

import collections
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


def test_demo_scenes_are_unchanged():
    # The demo's numbers depend on these draws: adding kinds must not move them.
    first, second = synthetic.mcq_scene(2, 0, scale=1.8)[1], synthetic.mcq_scene(2, 1, scale=1.8)[1]
    assert (first.kind, first.caption, first.options) == (
        "count",
        "The image shows a green cube and a green cube.",
        ("2", "4", "3", "1"),
    )
    assert (second.kind, second.conclusion, second.options) == ("color", "gray", ("purple", "gray", "red", "brown"))


# --------------------------------------------------------------------------------- reasoning multiple choice


def _members(phrase, objects):
    """The objects a plural group phrase ("small purple objects", "cubes", "large spheres") names, read from the
    words alone."""
    *adjectives, noun = phrase.split()
    shape = None if noun == "objects" else noun[:-1]
    return [
        o for o in objects if (shape is None or o.shape == shape) and all(a in (o.size, o.color) for a in adjectives)
    ]


def _recount(question, objects):
    """The answer recomputed from the scene by reading the question, independently of the generator."""
    if m := re.fullmatch(r"How many objects remain after removing (.+)\?", question):
        groups = [g.removeprefix("all ") for g in m[1].split(" and all ")]
        removed = {id(o) for g in groups for o in _members(g, objects)}
        return str(len(objects) - len(removed))
    if m := re.fullmatch(r"How many more (.+) than (.+) are there\?", question):
        difference = len(_members(m[1], objects)) - len(_members(m[2], objects))
        assert difference >= 0, question
        return str(difference)
    if m := re.fullmatch(r"How many (.+) are there\?", question):
        return str(len(_members(m[1], objects)))
    if m := re.fullmatch(r"What color is the (small|large) (\w+)\?", question):
        (target,) = [o for o in objects if o.size == m[1] and o.shape == m[2]]
        return target.color
    raise AssertionError(f"unrecognised question {question!r}")


def _reasoning_samples(seed, n, scale=1.8):
    return [synthetic.mcq_scene(seed, index, synthetic.REASONING_KINDS, scale) for index in range(n)]


def test_reasoning_answers_follow_from_the_scene():
    from llava_cot_jax.eval import mcq

    kinds, questions = collections.Counter(), set()
    for objects, sample in _reasoning_samples(4, 400):
        assert sample.kind in synthetic.REASONING_KINDS
        hi = synthetic.REASONING_OBJECTS[1]
        assert 1 <= len(objects) <= hi and all(o.scale == 1.8 for o in objects)
        assert sample.conclusion == _recount(sample.question, objects), sample
        assert len(set(sample.options)) == 4 and sample.option_map()[sample.correct] == sample.conclusion
        # The conclusion is the option's text, as for the demo's kinds, and the evaluation reads its letter.
        assert mcq.extract_choice(sample.conclusion, sample.option_map()) == sample.correct
        if sample.conclusion.isdigit():
            # Counts: the distractors are within three of the answer (off by one or two, mostly), never negative.
            assert all(o.isdigit() and abs(int(o) - int(sample.conclusion)) <= 3 for o in sample.options)
        else:
            assert set(sample.options) <= set(synthetic.COLORS)
            # Colours in the scene come first among the distractors.
            others = {o.color for o in objects} - {sample.conclusion}
            assert len(others & set(sample.options)) == min(3, len(others))
        assert chat.validate_stages(sample.answer()) == []
        kinds[sample.kind] += 1
        questions.add(sample.question.split(" ")[2] if sample.kind != "conjunction" else sample.question[:8])
    assert min(kinds.values()) > 100
    assert {"objects", "more", "How many", "What col"} <= questions


def test_reasoning_answer_positions_are_balanced():
    samples = [sample for _, sample in _reasoning_samples(6, 400)]
    letters = collections.Counter(sample.correct for sample in samples)
    assert set(letters) == set("ABCD") and all(70 <= n <= 130 for n in letters.values()), letters
    # Nor does the answer's place among the counts shown (lowest, second, ...) lean anywhere.
    ranks = collections.Counter(
        sorted(map(int, sample.options)).index(int(sample.conclusion))
        for sample in samples
        if sample.conclusion.isdigit()
    )
    assert all(abs(n / ranks.total() - 0.25) < 0.07 for n in ranks.values()), ranks


def test_reasoning_stages_carry_the_counts():
    for objects, sample in _reasoning_samples(8, 200):
        # The caption names every object with its size, colour and shape, and their number.
        assert sample.caption.startswith(f"The image shows {synthetic._count_words(len(objects))} ")
        assert sample.caption.count(" a ") == len(objects)
        for o in objects:
            assert sample.caption.count(o.phrase()) == sum(p.phrase() == o.phrase() for p in objects)
        # The reasoning ends with the answer, and its tallies are the scene's counts.
        assert sample.reasoning.endswith(f" {sample.conclusion}.")
        for label, count in re.findall(r"(?:^|\. )([A-Z][a-z ]+): (\d+)", sample.reasoning):
            if not label.startswith("Of those"):
                assert int(count) == len(_members(label.lower(), objects)), (label, sample.reasoning)
        if sample.kind in ("remove", "compare"):
            terms, result = re.search(r"(\d+(?: - \d+)+) = (\d+)\.$", sample.reasoning).groups()
            numbers = [int(t) for t in terms.split(" - ")]
            assert numbers[0] - sum(numbers[1:]) == int(result) == int(sample.conclusion)
        if sample.kind == "remove":
            assert sample.reasoning.startswith(f"There are {len(objects)} objects.")
        if sample.kind == "conjunction" and not re.match(r"[A-Z][a-z ]+: 0\.", sample.reasoning):
            assert "Of those" in sample.reasoning


def test_answer_formats_differ_as_specified():
    _, sample = synthetic.mcq_scene(1, 3, synthetic.REASONING_KINDS, 1.8)
    tagged = synthetic.format_answer(sample, "tagged")
    untagged = synthetic.format_answer(sample, "untagged")
    direct = synthetic.format_answer(sample, "direct")
    assert tagged == sample.answer() and chat.validate_stages(tagged) == []
    # Untagged: the tagged answer with the tags (and the spaces inside them) taken out, nothing else.
    assert re.sub(r"<([A-Z]+)> (.*?) </\1>", r"\2", tagged, flags=re.DOTALL) == untagged
    assert "<" not in untagged and untagged.split("\n\n") == [
        sample.summary,
        sample.caption,
        sample.reasoning,
        sample.conclusion,
    ]
    assert direct == sample.conclusion and untagged.endswith("\n\n" + direct)
    with pytest.raises(ValueError, match="answer_format"):
        synthetic.format_answer(sample, "tags")


def test_write_answer_formats_writes_the_same_samples(tmp_path):
    written = synthetic.write_answer_formats(tmp_path / "ab", 4, seed=5, scale=1.8, image_size=32)
    assert list(written) == list(synthetic.ANSWER_FORMATS)
    records = {f: _read(d.jsonl_path) for f, d in written.items()}
    for k in range(4):
        row = {f: records[f][k] for f in records}
        assert len({(r["id"], r["image"], r["conversations"][0]["value"]) for r in row.values()}) == 1
        assert "Options:\nA. " in row["tagged"]["conversations"][0]["value"]
        answers = {f: r["conversations"][1]["value"] for f, r in row.items()}
        _, sample = synthetic.mcq_scene(5, k, synthetic.REASONING_KINDS, 1.8)
        assert answers == {f: synthetic.format_answer(sample, f) for f in synthetic.ANSWER_FORMATS}
        image = row["tagged"]["image"]
        assert (written["tagged"].image_root / image).read_bytes() == (
            written["direct"].image_root / image
        ).read_bytes()
    with pytest.raises(ValueError, match="answer formats"):
        synthetic.write_answer_formats(tmp_path / "x", 1, formats=("cot",))


def test_held_out_seeds_give_other_scenes():
    train = {repr(objects) for objects, _ in _reasoning_samples(0, 100)}
    heldout = {repr(objects) for objects, _ in _reasoning_samples(1, 100)}
    assert len(train) == 100 and len(heldout) == 100 and not train & heldout
    assert _reasoning_samples(0, 3) == _reasoning_samples(0, 3)


def test_size_is_visible_at_the_demo_resolution():
    # The reasoning kinds ask about size: at 64 px with object_scale 1.8 a large object paints about twice the
    # pixels of a small one of the same shape.
    floor = np.asarray(synthetic.render_scene([], 64)).astype(int)
    for shape in synthetic.SHAPES:
        area = {}
        for size in synthetic.SIZES:
            image = synthetic.render_scene([synthetic.SceneObject(shape, "red", size, 0.5, 0.5, 1.8)], 64)
            area[size] = (np.abs(np.asarray(image).astype(int) - floor).sum(-1) > 0).sum()
        assert area["large"] > 1.8 * area["small"] > 300, area


# ------------------------------------------------------------------------------------------- judge / reward pairs


def test_stage_pairs_are_wrong_balanced_and_deterministic():
    from llava_cot_jax.data import pairs

    made = pairs.stage_pairs(3, 60, scale=1.8)
    assert len(made) == 60 * len(pairs.PAIR_STAGES)
    for pair in made:
        sample = pair.sample
        assert pair.right == getattr(sample, pair.stage.lower()) and pair.wrong and pair.wrong != pair.right
        if pair.stage == "CONCLUSION":
            assert pair.wrong in sample.options
        if pair.stage == "REASONING":
            # An arithmetic slip: the same steps, the last result replaced by another option.
            head = sample.reasoning[: sample.reasoning.rfind(sample.conclusion)]
            slipped = pair.wrong.removeprefix(head).removesuffix(".")
            assert pair.wrong.startswith(head) and slipped in sample.options and slipped != sample.conclusion
        if pair.stage == "CAPTION":
            assert pair.wrong.startswith("The image shows ")
        assert pair.responses[pair.better - 1] == pair.right and pair.responses[2 - pair.better] == pair.wrong
        assert pair.chosen.endswith(f"<{pair.stage}> {pair.right} </{pair.stage}>")
        assert pair.rejected.startswith(pair.context) and pair.chosen.startswith(pair.context)
        assert sample.answer().startswith(pair.chosen)
    for stage in pairs.PAIR_STAGES:
        firsts = [p.right_first for p in made if p.stage == stage]
        assert sum(firsts) == len(firsts) // 2 and len(set(firsts[:10])) == 2
    assert pairs.stage_pairs(3, 60, scale=1.8)[-3:] == made[-3:]
    assert pairs.stage_pairs(3, 2, scale=1.8, start=58) == made[-6:]
    assert pairs.stage_pairs(4, 2, scale=1.8) != made[:6]


def test_judge_accuracy_counts_right_picks():
    from llava_cot_jax.data import pairs

    made = pairs.stage_pairs(0, 4, scale=1.8)
    right = [p.better for p in made]
    assert pairs.judge_accuracy(made, right)["all"] == 1.0
    assert pairs.judge_accuracy(made, [3 - b for b in right])["all"] == 0.0
    picks = [p.better if p.stage == "CAPTION" else None for p in made]
    scores = pairs.judge_accuracy(made, picks)
    assert scores["CAPTION"] == 1.0 and scores["REASONING"] == 0.0 and abs(scores["all"] - 1 / 3) < 1e-9
    with pytest.raises(ValueError, match="picks"):
        pairs.judge_accuracy(made, right[:-1])


def test_reasoning_kinds_are_accepted_and_checked():
    assert synthetic.mcq_scene(0, 1, ("compare",))[1].kind == "compare"
    with pytest.raises(ValueError, match="remove"):
        synthetic.mcq_scene(0, 1, ("subtract",))
    objects, sample = synthetic.mcq_scene(0, 2, ("remove",))
    summary = synthetic.corrupt_stage(np.random.default_rng(0), objects, sample, "SUMMARY")
    assert summary != sample.summary and summary.startswith("I will")
