"""Offline CLEVR-like training data in the LLaVA-CoT-100k layout.

Each sample is a scene of simple solids (cubes, spheres, cylinders) drawn with PIL, a question whose answer follows
from the scene description alone (counting, attributes, comparisons, "remove all X"), and a four-stage answer
(summary, caption, reasoning, conclusion) written from the same description. Nothing is downloaded, and the same
seed always gives the same files, so tests and demos can train on it and check answers exactly.

The demo's multiple-choice questions (`mcq_scene`: the colour of a lone object, or the number of objects, each with
four options) come with `corrupt_stage` (a wrong version of any stage, for judge examples) and `write_scenes`
(any conversations about the scenes, several per image, in the same layout). `mcq_scene` also asks the
`REASONING_KINDS` (counting after removals, differences between groups, attribute conjunctions), whose stages
write the counting out; `format_answer` / `write_answer_formats` give the same samples with tagged stages, untagged
stages or the conclusion alone (the ablation formats), and `data/pairs.py` makes right/corrupted stage pairs.

Layout written by `write_synthetic_dataset(out_dir, ...)`:

    out_dir/train.jsonl            {"id", "image", "conversations": [{"from": "human", ...}, {"from": "gpt", ...}]}
    out_dir/images/<image path>    the "image" field is relative to this image root
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from llava_cot_jax import files
from llava_cot_jax.data import mcq_prompt as mcq_prompt_lib

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (173, 35, 35),
    "blue": (42, 75, 215),
    "green": (29, 105, 20),
    "yellow": (233, 222, 55),
    "purple": (129, 38, 192),
    "cyan": (41, 208, 208),
    "brown": (129, 74, 25),
    "gray": (87, 87, 87),
}
SHAPES = ("cube", "sphere", "cylinder")
SIZES = ("small", "large")
_SHAPE_PLURAL = {"cube": "cubes", "sphere": "spheres", "cylinder": "cylinders"}
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

# Object radius as a fraction of the image side; the scene is laid out on a unit square and scaled at draw time.
_RADIUS = {"small": 0.07, "large": 0.11}
IMAGE_ROOT_NAME = "images"
JSONL_NAME = "train.jsonl"


@dataclasses.dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    x: float  # centre, fraction of the image width
    y: float  # centre, fraction of the image height
    scale: float = 1.0  # the radius is _RADIUS[size] * scale

    @property
    def radius(self) -> float:
        """Radius as a fraction of the image side."""
        return _RADIUS[self.size] * self.scale

    def phrase(self) -> str:
        return f"{self.size} {self.color} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Sample:
    question: str
    summary: str
    caption: str
    reasoning: str
    conclusion: str

    def answer(self) -> str:
        """The assistant turn exactly as LLaVA-CoT-100k writes it: four tagged stages separated by blank lines."""
        return (
            f"<SUMMARY> {self.summary} </SUMMARY>\n\n<CAPTION> {self.caption} </CAPTION>\n\n"
            f"<REASONING> {self.reasoning} </REASONING>\n\n<CONCLUSION> {self.conclusion} </CONCLUSION>"
        )


def random_scene(
    rng: np.random.Generator, min_objects: int = 3, max_objects: int = 7, scale: float = 1.0
) -> list[SceneObject]:
    """Objects with random attributes at random non-overlapping positions (rejection sampling on bounding circles);
    `scale` enlarges every object (small images want larger objects)."""
    count = int(rng.integers(min_objects, max_objects + 1))
    objects: list[SceneObject] = []
    attempts = 0
    while len(objects) < count and attempts < 500:
        attempts += 1
        size = SIZES[rng.integers(len(SIZES))]
        r = _RADIUS[size] * scale
        x, y = (float(v) for v in rng.uniform(r + 0.02, 1.0 - r - 0.02, size=2))
        # Keep a gap between objects so shapes never touch (counting must be unambiguous to the eye too).
        if any((x - o.x) ** 2 + (y - o.y) ** 2 < (r + o.radius + 0.03) ** 2 for o in objects):
            continue
        objects.append(
            SceneObject(
                shape=SHAPES[rng.integers(len(SHAPES))],
                color=list(COLORS)[rng.integers(len(COLORS))],
                size=size,
                x=x,
                y=y,
                scale=scale,
            )
        )
    # Draw back to front so nearer (lower) objects are painted last, as a camera above the table would see them.
    return sorted(objects, key=lambda o: o.y)


def render_scene(objects: list[SceneObject], image_size: int) -> Image.Image:
    """Draws the scene as flat-shaded 2-D solids on a soft gray floor."""
    side = image_size
    floor = np.linspace(200, 160, side, dtype=np.float32)[:, None].repeat(side, axis=1)
    image = Image.fromarray(np.stack([floor] * 3, axis=-1).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw_object(draw, obj, side)
    return image


def _shade(color: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c * factor))) for c in color)


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, side: int) -> None:
    base = COLORS[obj.color]
    r = obj.radius * side
    cx, cy = obj.x * side, obj.y * side
    # A drop shadow below-right of every object grounds it on the floor.
    draw.ellipse([cx - r * 0.9, cy + r * 0.55, cx + r * 1.1, cy + r * 1.05], fill=(135, 135, 135))
    if obj.shape == "sphere":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_shade(base, 0.8))
        draw.ellipse([cx - r * 0.8, cy - r * 0.85, cx + r * 0.55, cy + r * 0.5], fill=base)
        draw.ellipse([cx - r * 0.5, cy - r * 0.6, cx - r * 0.1, cy - r * 0.2], fill=_shade(base, 1.4))
    elif obj.shape == "cube":
        h = r * 0.8  # half the front face; the top face is a parallelogram receding up and to the right
        depth = r * 0.45
        draw.rectangle([cx - h, cy - h + depth / 2, cx + h, cy + h + depth / 2], fill=base)
        top = [
            (cx - h, cy - h + depth / 2),
            (cx - h + depth, cy - h - depth / 2),
            (cx + h + depth, cy - h - depth / 2),
            (cx + h, cy - h + depth / 2),
        ]
        draw.polygon(top, fill=_shade(base, 1.3))
        right = [
            (cx + h, cy - h + depth / 2),
            (cx + h + depth, cy - h - depth / 2),
            (cx + h + depth, cy + h - depth / 2),
            (cx + h, cy + h + depth / 2),
        ]
        draw.polygon(right, fill=_shade(base, 0.65))
    elif obj.shape == "cylinder":
        w = r * 0.8
        cap = r * 0.3  # half-height of the elliptical caps
        draw.ellipse([cx - w, cy + r * 0.7 - cap, cx + w, cy + r * 0.7 + cap], fill=_shade(base, 0.75))
        draw.rectangle([cx - w, cy - r * 0.7, cx + w, cy + r * 0.7], fill=base)
        draw.ellipse([cx - w, cy - r * 0.7 - cap, cx + w, cy - r * 0.7 + cap], fill=_shade(base, 1.3))
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


# ----------------------------------------------------------------------------------------------------- questions


def _count_words(n: int) -> str:
    return _NUMBER_WORDS[n] if n < len(_NUMBER_WORDS) else str(n)


def _noun(shape: str | None, n: int) -> str:
    if shape is None:
        return "object" if n == 1 else "objects"
    return shape if n == 1 else _SHAPE_PLURAL[shape]


def _describe_group(color: str | None, shape: str | None, plural: bool = True) -> str:
    """'red cylinders', 'cubes', 'gray objects'."""
    words = [color] if color else []
    words.append(_noun(shape, 2 if plural else 1))
    return " ".join(words)


def _matches(obj: SceneObject, color: str | None, shape: str | None) -> bool:
    return (color is None or obj.color == color) and (shape is None or obj.shape == shape)


def _caption(objects: list[SceneObject]) -> str:
    listed = ", ".join(f"a {o.phrase()}" for o in objects[:-1])
    last = f"a {objects[-1].phrase()}"
    inventory = f"{listed} and {last}" if listed else last
    return (
        f"The picture shows {_count_words(len(objects))} solid {_noun(None, len(objects))} resting on a plain gray "
        f"surface. From back to front they are {inventory}."
    )


def _pick_group(rng: np.random.Generator, objects: list[SceneObject]) -> tuple[str | None, str | None]:
    """A (colour, shape) filter, biased towards groups that actually occur in the scene so answers are not all zero."""
    anchor = objects[rng.integers(len(objects))]
    kind = rng.integers(3)
    if kind == 0:
        return anchor.color, None
    if kind == 1:
        return None, anchor.shape
    return anchor.color, anchor.shape


def _count_question(rng, objects) -> Sample:
    color, shape = _pick_group(rng, objects)
    group = _describe_group(color, shape)
    hits = [o for o in objects if _matches(o, color, shape)]
    n = len(hits)
    reasoning = (
        f"I go through the objects one by one and keep those that are {group}: "
        + (", ".join(f"the {o.phrase()}" for o in hits) if hits else "none of them qualify")
        + f". That makes {_count_words(n)} in total."
    )
    return Sample(
        question=f"How many {group} are in the image?",
        summary=f"I will list every object in the scene, pick out the {group}, and count them.",
        caption=_caption(objects),
        reasoning=reasoning,
        conclusion=str(n),
    )


def _subtract_question(rng, objects) -> Sample:
    color, shape = _pick_group(rng, objects)
    group = _describe_group(color, shape)
    removed = [o for o in objects if _matches(o, color, shape)]
    left = len(objects) - len(removed)
    reasoning = (
        f"There are {_count_words(len(objects))} objects in all. The {group} to take away are "
        + (", ".join(f"the {o.phrase()}" for o in removed) if removed else "absent, so nothing is removed")
        + f", which is {_count_words(len(removed))}. {len(objects)} minus {len(removed)} leaves {left}."
    )
    return Sample(
        question=f"Subtract all {group}. How many objects are left?",
        summary=f"I will count all objects, count the {group} to be removed, and take the difference.",
        caption=_caption(objects),
        reasoning=reasoning,
        conclusion=str(left),
    )


def _attribute_question(rng, objects) -> Sample | None:
    """Asks the colour (or shape) of an object named by attributes that pick it out uniquely; None if none do."""
    order = rng.permutation(len(objects))
    for i in order:
        target = objects[i]
        # Name by size + shape when unique, else by size + colour: the answer must not be in the question.
        if rng.integers(2) == 0:
            same = [o for o in objects if o.size == target.size and o.shape == target.shape]
            if len(same) == 1:
                name, asked, value = f"{target.size} {target.shape}", "color", target.color
                break
        same = [o for o in objects if o.size == target.size and o.color == target.color]
        if len(same) == 1:
            name, asked, value = f"{target.size} {target.color} object", "shape", target.shape
            break
    else:
        return None
    return Sample(
        question=f"What {asked} is the {name}?",
        summary=f"I will find the only {name} in the scene and report its {asked}.",
        caption=_caption(objects),
        reasoning=(f"Checking each object, exactly one is a {name}: the {target.phrase()}. Its {asked} is {value}."),
        conclusion=value,
    )


def _compare_question(rng, objects) -> Sample:
    a, b = rng.choice(SHAPES, size=2, replace=False)
    na = sum(o.shape == a for o in objects)
    nb = sum(o.shape == b for o in objects)
    if rng.integers(2) == 0:
        question = f"Are there more {_SHAPE_PLURAL[a]} than {_SHAPE_PLURAL[b]}?"
        answer = "Yes" if na > nb else "No"
        relation = "more" if na > nb else ("as many" if na == nb else "fewer")
    else:
        question = f"Is the number of {_SHAPE_PLURAL[a]} the same as the number of {_SHAPE_PLURAL[b]}?"
        answer = "Yes" if na == nb else "No"
        relation = "the same number" if na == nb else "a different number"
    return Sample(
        question=question,
        summary=f"I will count the {_SHAPE_PLURAL[a]} and the {_SHAPE_PLURAL[b]} separately and compare the counts.",
        caption=_caption(objects),
        reasoning=(
            f"The scene has {_count_words(na)} {_noun(a, na)} and {_count_words(nb)} {_noun(b, nb)}, "
            f"so there are {relation} {_SHAPE_PLURAL[a]} compared with {_SHAPE_PLURAL[b]}."
        ),
        conclusion=answer,
    )


def make_sample(rng: np.random.Generator, objects: list[SceneObject]) -> Sample:
    """One question about `objects`, with the kind of question drawn from `rng`."""
    kind = rng.integers(4)
    if kind == 2:
        sample = _attribute_question(rng, objects)
        if sample is not None:
            return sample
        kind = 0
    return (_count_question, _subtract_question, None, _compare_question)[kind](rng, objects)


# ------------------------------------------------------------------------------------------------ multiple choice

MCQ_KINDS = ("color", "count")
OPTION_LETTERS = "ABCD"
MCQ_MAX_OBJECTS = 4  # counts stay within the four options 1-4


@dataclasses.dataclass(frozen=True)
class McqSample(Sample):
    """A four-option question: the options in the order shown, the correct letter, and the kind of question
    (`MCQ_KINDS`; the evaluation's category). The conclusion is the correct option's text, which VLMEvalKit's
    answer extraction (and ours) maps to its letter."""

    options: tuple[str, ...] = ()
    correct: str = ""
    kind: str = ""

    def option_map(self) -> dict[str, str]:
        return dict(zip(OPTION_LETTERS, self.options))


def _listed(words) -> str:
    words = list(words)
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _short_caption(objects: list[SceneObject]) -> str:
    """The objects in a fixed order (by colour, then shape), so the caption depends on what is in the scene and
    not on where."""
    ranked = sorted(objects, key=lambda o: (list(COLORS).index(o.color), SHAPES.index(o.shape)))
    return f"The image shows {_listed(f'a {o.color} {o.shape}' for o in ranked)}."


# Per kind: the question, the plan (summary), the reasoning that gives the answer, and the scene's object counts.
_MCQ_TEXT = {
    "color": ("What color is the object?", "I will find the color of the object.", "The object is {}.", (1, 1)),
    "count": (
        "How many objects are in the image?",
        "I will count the objects.",
        "Counting the objects gives {}.",
        (1, MCQ_MAX_OBJECTS),
    ),
}


def _mcq(rng: np.random.Generator, objects: list[SceneObject], kind: str, answer: str, distractors) -> McqSample:
    options = [answer, *distractors]
    options = tuple(options[i] for i in rng.permutation(len(options)))
    question, summary, reasoning, _ = _MCQ_TEXT[kind]
    return McqSample(
        question=question,
        summary=summary,
        caption=_short_caption(objects),
        reasoning=reasoning.format(answer),
        conclusion=answer,
        options=options,
        correct=OPTION_LETTERS[options.index(answer)],
        kind=kind,
    )


def _color_mcq(rng: np.random.Generator, objects: list[SceneObject]) -> McqSample:
    """The colour of the only object, among three others."""
    answer = objects[0].color
    return _mcq(
        rng,
        objects,
        "color",
        answer,
        [str(c) for c in rng.choice([c for c in COLORS if c != answer], 3, replace=False)],
    )


def _count_mcq(rng: np.random.Generator, objects: list[SceneObject]) -> McqSample:
    """The number of objects, among every count a scene can have."""
    answer = str(len(objects))
    return _mcq(rng, objects, "count", answer, [str(i) for i in range(1, MCQ_MAX_OBJECTS + 1) if str(i) != answer])


_MCQ_MAKERS = {"color": _color_mcq, "count": _count_mcq}


def mcq_scene(
    seed: int, index: int, kinds: tuple[str, ...] = MCQ_KINDS, scale: float = 1.0
) -> tuple[list[SceneObject], McqSample]:
    """Scene `index` of the multiple-choice set `seed`, objects sized by `scale`, and its question, the kind drawn
    from `kinds` (MCQ_KINDS or REASONING_KINDS; a colour question shows one object, a count question one to
    MCQ_MAX_OBJECTS, a reasoning question REASONING_OBJECTS). Depends only on (seed, index, kinds, scale)."""
    makers = {**_MCQ_MAKERS, **_REASONING_MAKERS}
    unknown = [k for k in kinds if k not in makers]
    if unknown or not kinds:
        raise ValueError(
            f"unknown multiple-choice kinds {unknown or kinds!r}; choose from {MCQ_KINDS + REASONING_KINDS}"
        )
    rng = np.random.default_rng([seed, index])
    kind = kinds[rng.integers(len(kinds))]
    if kind in _MCQ_TEXT:
        objects = random_scene(rng, *_MCQ_TEXT[kind][3], scale)
        return objects, makers[kind](rng, objects)
    plan = _draw_plan(rng, kind)
    for attempt in range(_SCENE_TRIES):
        objects = random_scene(rng, *REASONING_OBJECTS, scale)
        # The last try takes any answer, so a sample always comes back.
        sample = makers[kind](rng, objects, plan if attempt < _SCENE_TRIES - 1 else None)
        if sample is not None:
            return objects, sample
    raise AssertionError("unreachable: the last try accepts any answer")


def corrupt_stage(rng: np.random.Generator, objects: list[SceneObject], sample: McqSample, stage: str) -> str:
    """A wrong version of one stage of `sample` (a judge example's losing side): another kind's plan, a caption with
    one object recoloured, reshaped, dropped or doubled, or reasoning and conclusion that pick a wrong option.
    For REASONING_KINDS: another kind's plan, a caption with one object changed (its size too), reasoning whose
    last step slips to a wrong option."""
    if sample.kind in _REASONING_MAKERS:
        return _corrupt_reasoning_stage(rng, objects, sample, stage)
    if stage == "SUMMARY":
        return next(summary for kind, (_, summary, _, _) in _MCQ_TEXT.items() if kind != sample.kind)
    if stage == "CAPTION":
        return _short_caption(_altered_scene(rng, objects))
    wrong = [o for o in sample.options if o != sample.conclusion]
    option = wrong[rng.integers(len(wrong))]
    if stage == "REASONING":
        return _MCQ_TEXT[sample.kind][2].format(option)
    if stage == "CONCLUSION":
        return option
    raise ValueError(f"unknown stage {stage!r}")


def _altered_scene(rng: np.random.Generator, objects: list[SceneObject], resize: bool = False) -> list[SceneObject]:
    """The objects with one change that alters the caption (`resize`: a size change is one of the choices)."""
    changes = ["color", "shape", "double"] + (["drop"] if len(objects) > 1 else []) + (["size"] if resize else [])
    change = changes[rng.integers(len(changes))]
    i = int(rng.integers(len(objects)))
    target = objects[i]
    if change == "drop":
        return objects[:i] + objects[i + 1 :]
    if change == "double":
        return objects + [target]
    if change == "color":
        altered = dataclasses.replace(target, color=str(rng.choice([c for c in COLORS if c != target.color])))
    elif change == "size":
        altered = dataclasses.replace(target, size=next(z for z in SIZES if z != target.size))
    else:
        altered = dataclasses.replace(target, shape=str(rng.choice([s for s in SHAPES if s != target.shape])))
    return objects[:i] + [altered] + objects[i + 1 :]


# ------------------------------------------------------------------------------------- reasoning multiple choice
# Questions where writing the work out should pay: counting after removing groups, the difference between two
# groups' counts, and attribute conjunctions. Objects are told apart by size, colour and shape only: the renderer
# draws no material, and at the demo's 64 px (object_scale 1.8) a small object is ~8 px in radius and a large one
# ~13 px (2.2x the painted area), so size is visible while a shine highlight would be a pixel or two.

REASONING_KINDS = ("remove", "compare", "conjunction")
REASONING_OBJECTS = (3, 6)  # at object_scale 1.8 more than six rarely fit a scene without overlap
ANSWER_FORMATS = ("tagged", "untagged", "direct")
_ATTRIBUTES = ("size", "color", "shape")  # the order a group is named and narrowed in

Group = tuple[tuple[str, str], ...]  # (attribute, value) pairs in _ATTRIBUTES order: "small purple objects"


def _group_phrase(group: Group, plural: bool = True) -> str:
    """'small purple objects', 'cubes', 'large blue sphere' (plural=False)."""
    values = dict(group)
    words = [values[a] for a in ("size", "color") if a in values]
    words.append(_noun(values.get("shape"), 2 if plural else 1))
    return " ".join(words)


def _in_group(obj: SceneObject, group: Group) -> bool:
    return all(getattr(obj, attribute) == value for attribute, value in group)


def _groups(objects: list[SceneObject], num_attributes: int, present: bool = True) -> list[Group]:
    """Every group named by `num_attributes` attributes: those of the scene's objects (`present`), else every
    combination of values, in a fixed order."""
    combos = list(itertools.combinations(_ATTRIBUTES, num_attributes))
    if present:
        found = (tuple((a, getattr(o, a)) for a in combo) for o in objects for combo in combos)
        return list(dict.fromkeys(found))
    values = {"size": SIZES, "color": tuple(COLORS), "shape": SHAPES}
    return [tuple(zip(combo, vs)) for combo in combos for vs in itertools.product(*(values[a] for a in combo))]


def _ranked(objects: list[SceneObject]) -> list[SceneObject]:
    """The order the caption lists objects in (colour, shape, size), which does not depend on where they stand."""
    return sorted(objects, key=lambda o: (list(COLORS).index(o.color), SHAPES.index(o.shape), SIZES.index(o.size)))


def _the(objects: list[SceneObject]) -> str:
    return ", ".join(f"the {o.phrase()}" for o in _ranked(objects))


def _tally(label: str, members: list[SceneObject]) -> str:
    """'Small cubes: 2 (the small red cube, the small blue cube).'"""
    label = label[0].upper() + label[1:]
    return f"{label}: {len(members)} ({_the(members)})." if members else f"{label}: 0."


def _full_caption(objects: list[SceneObject]) -> str:
    """Every object with its size, colour and shape (`_ranked`), led by their number."""
    listed = _listed(f"a {o.phrase()}" for o in _ranked(objects))
    return f"The image shows {_count_words(len(objects))} {_noun(None, len(objects))}: {listed}."


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What a reasoning question is to be, drawn before its scene: for a count, the four consecutive counts shown
    (from `lowest`) and the answer among them; for a conjunction, whether to ask a colour."""

    lowest: int
    answer: int
    ask_color: bool


_HIGHEST_COUNT = {"remove": 4, "compare": 3, "conjunction": 3}  # the highest option; higher answers are rare
_SCENE_TRIES = 64


def _draw_plan(rng: np.random.Generator, kind: str) -> _Plan:
    """The options' lowest count uniformly, then the answer's place among them uniformly. Scenes are then drawn
    until one has a question with that answer, so any four counts shown hold the answer at each place equally
    often: neither the options nor how common a count is tells the answer without counting."""
    width = len(OPTION_LETTERS)
    lowest = int(rng.integers(_HIGHEST_COUNT[kind] - width + 2))
    return _Plan(lowest, lowest + int(rng.integers(width)), bool(rng.integers(2)))


def _counted(
    rng: np.random.Generator, candidates: list, answer: Callable[[object], int], plan: _Plan | None
) -> tuple[object, list[str]] | None:
    """A candidate question with the planned answer and the other three options; None when no
    candidate has it. Without a plan: any candidate, its answer at a random place among four consecutive counts."""
    width = len(OPTION_LETTERS)
    if plan is None:
        chosen = candidates[rng.integers(len(candidates))]
        value = answer(chosen)
        lowest = value - min(value, int(rng.integers(width)))
    else:
        hits = [c for c in candidates if answer(c) == plan.answer]
        if not hits:
            return None
        chosen, value, lowest = hits[rng.integers(len(hits))], plan.answer, plan.lowest
    return chosen, [str(v) for v in range(lowest, lowest + width) if v != value]


def _reasoning_mcq(rng, objects, kind, question, summary, reasoning, answer: str, distractors) -> McqSample:
    """The answer at a uniformly drawn letter, the distractors shuffled around it."""
    position = int(rng.integers(len(OPTION_LETTERS)))
    others = [distractors[i] for i in rng.permutation(len(distractors))]
    options = tuple(others[:position] + [answer] + others[position:])
    return McqSample(
        question=question,
        summary=summary,
        caption=_full_caption(objects),
        reasoning=reasoning,
        conclusion=answer,
        options=options,
        correct=OPTION_LETTERS[position],
        kind=kind,
    )


def _remove_mcq(rng: np.random.Generator, objects: list[SceneObject], plan: _Plan | None = None) -> McqSample | None:
    """How many objects remain after removing one or two groups of the scene (the second may overlap the first)."""
    present = _groups(objects, 1) + _groups(objects, 2)
    if rng.integers(2):
        candidates = [(g,) for g in present]
    else:
        candidates = [(a, b) for a, b in itertools.permutations(present, 2)]
    remaining = lambda groups: sum(not any(_in_group(o, g) for g in groups) for o in objects)
    counted = _counted(rng, candidates, remaining, plan)
    if counted is None:
        return None
    groups, distractors = counted
    phrases = [_group_phrase(g) for g in groups]
    steps, taken, removed = [f"There are {len(objects)} objects."], [], set()
    for group, phrase in zip(groups, phrases):
        members = [i for i, o in enumerate(objects) if _in_group(o, group)]
        already = [i for i in members if i in removed]
        step = _tally(phrase, [objects[i] for i in members])
        if already:
            gone = [f"the {o.phrase()}" for o in _ranked([objects[i] for i in already])]
            verb = "is" if len(already) == 1 else "are"
            more = len(members) - len(already)
            step = f"{step[:-1]}; {_listed(gone)} {verb} already removed, so {more} more " + (
                "goes." if more == 1 else "go."
            )
        steps.append(step)
        taken.append(len(members) - len(already))
        removed.update(members)
    left = len(objects) - sum(taken)
    steps.append(" - ".join(str(n) for n in [len(objects), *taken]) + f" = {left}.")
    question = "How many objects remain after removing " + " and ".join(f"all {p}" for p in phrases) + "?"
    if len(groups) == 1:
        summary = f"I will count all the objects and the {phrases[0]}, then subtract."
    else:
        summary = f"I will count all the objects, the {phrases[0]} and the {phrases[1]} not among them, then subtract."
    return _reasoning_mcq(rng, objects, "remove", question, summary, " ".join(steps), str(left), distractors)


def _compare_mcq(rng: np.random.Generator, objects: list[SceneObject], plan: _Plan | None = None) -> McqSample | None:
    """How many more of one group than of another (the larger named first; 0 when they tie)."""
    count = lambda group: sum(_in_group(o, group) for o in objects)
    candidates = list(itertools.combinations(_groups(objects, 1), 2))
    counted = _counted(rng, candidates, lambda pair: abs(count(pair[0]) - count(pair[1])), plan)
    if counted is None:
        return None
    (first, second), distractors = counted
    members = {g: [o for o in objects if _in_group(o, g)] for g in (first, second)}
    if len(members[first]) < len(members[second]):
        first, second = second, first
    a, b = _group_phrase(first), _group_phrase(second)
    difference = len(members[first]) - len(members[second])
    reasoning = (
        f"{_tally(a, members[first])} {_tally(b, members[second])} "
        f"{len(members[first])} - {len(members[second])} = {difference}."
    )
    return _reasoning_mcq(
        rng,
        objects,
        "compare",
        f"How many more {a} than {b} are there?",
        f"I will count the {a} and the {b}, then take the difference.",
        reasoning,
        str(difference),
        distractors,
    )


def _narrow(objects: list[SceneObject], group: Group) -> tuple[list[str], list[SceneObject]]:
    """The steps that filter the objects by one attribute of `group` at a time, and the objects left."""
    left, steps = objects, []
    for k, (attribute, value) in enumerate(group):
        left = [o for o in left if getattr(o, attribute) == value]
        label = (
            _group_phrase(((attribute, value),))
            if k == 0
            else "of those, " + (_SHAPE_PLURAL[value] if attribute == "shape" else f"{value} ones")
        )
        steps.append(_tally(label, left))
        if not left:
            break
    return steps, left


def _conjunction_mcq(
    rng: np.random.Generator, objects: list[SceneObject], plan: _Plan | None = None
) -> McqSample | None:
    """The colour of the only object of some size and shape, or how many objects have two or three given
    attributes (as planned; without a plan, a colour when some size and shape is unique, by a coin)."""
    if plan.ask_color if plan else rng.integers(2):
        for i in rng.permutation(len(objects)):
            target = objects[i]
            name = (("size", target.size), ("shape", target.shape))
            if sum(_in_group(o, name) for o in objects) == 1:
                steps, _ = _narrow(objects, name)
                seen = list(dict.fromkeys(o.color for o in objects if o.color != target.color))
                unseen = [c for c in COLORS if c != target.color and c not in seen]
                # Colours in the scene first: the wrong object's colour is the likely mistake.
                distractors = ([seen[j] for j in rng.permutation(len(seen))] + list(rng.permutation(unseen)))[:3]
                phrase = _group_phrase(name, plural=False)
                return _reasoning_mcq(
                    rng,
                    objects,
                    "conjunction",
                    f"What color is the {phrase}?",
                    f"I will find the only {phrase} and report its color.",
                    " ".join(steps) + f" Its color is {target.color}.",
                    target.color,
                    [str(c) for c in distractors],
                )
        if plan:
            return None
    candidates = _groups(objects, 2, present=False) + _groups(objects, 3, present=False)
    counted = _counted(rng, candidates, lambda g: sum(_in_group(o, g) for o in objects), plan)
    if counted is None:
        return None
    group, distractors = counted
    steps, left = _narrow(objects, group)
    phrase = _group_phrase(group)
    attributes = _listed([a for a, _ in group])
    return _reasoning_mcq(
        rng,
        objects,
        "conjunction",
        f"How many {phrase} are there?",
        f"I will narrow the objects down by {attributes}, one at a time, and count those left.",
        " ".join(steps) + f" So the count is {len(left)}.",
        str(len(left)),
        distractors,
    )


_REASONING_MAKERS = {"remove": _remove_mcq, "compare": _compare_mcq, "conjunction": _conjunction_mcq}


def _corrupt_reasoning_stage(rng: np.random.Generator, objects, sample: McqSample, stage: str) -> str:
    """`corrupt_stage` for REASONING_KINDS: the plan of a question of another kind about the same scene, the caption
    of the scene with one object changed, the reasoning with its last step slipped to a wrong option (its final
    number or colour), or a wrong option."""
    wrong = [o for o in sample.options if o != sample.conclusion]
    option = wrong[rng.integers(len(wrong))]
    if stage == "SUMMARY":
        others = [k for k in REASONING_KINDS if k != sample.kind]
        return _REASONING_MAKERS[others[rng.integers(len(others))]](rng, objects).summary
    if stage == "CAPTION":
        return _full_caption(_altered_scene(rng, objects, resize=True))
    if stage == "REASONING":
        cut = sample.reasoning.rfind(sample.conclusion)
        return sample.reasoning[:cut] + option + sample.reasoning[cut + len(sample.conclusion) :]
    if stage == "CONCLUSION":
        return option
    raise ValueError(f"unknown stage {stage!r}")


def format_answer(sample: Sample, answer_format: str = "tagged") -> str:
    """The assistant turn in one of ANSWER_FORMATS: "tagged" (the four tagged stages, `Sample.answer`),
    "untagged" (the same four texts without tags, separated by blank lines) or "direct" (the conclusion alone)."""
    if answer_format == "tagged":
        return sample.answer()
    if answer_format == "untagged":
        return f"{sample.summary}\n\n{sample.caption}\n\n{sample.reasoning}\n\n{sample.conclusion}"
    if answer_format == "direct":
        return sample.conclusion
    raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")


def mcq_prompt(sample: McqSample, instruction: str | None = None) -> str:
    """The user text of a multiple-choice sample: VLMEvalKit's multiple-choice prompt (as the evaluation asks),
    stripped; `instruction`: a family's own closing line instead (its processor's `mcq_instruction`)."""
    return mcq_prompt_lib.build_prompt(sample.question, sample.option_map(), "", "mcq", instruction).strip()


def write_answer_formats(
    out_dir: str | os.PathLike,
    num_scenes: int,
    seed: int = 0,
    kinds: tuple[str, ...] = REASONING_KINDS,
    scale: float = 1.0,
    image_size: int = 64,
    formats: tuple[str, ...] = ANSWER_FORMATS,
    overwrite: bool = False,
    progress: bool = False,
    extra_turns: Callable | None = None,
) -> dict[str, SyntheticDataset]:
    """The same `mcq_scene(seed, index, kinds, scale)` samples written once per answer format, to
    `out_dir/<format>/` (the `write_scenes` layout, PNG images), so the ablations train on identical questions
    and images and differ only in the assistant turn. Untagged and direct answers have no stage tags: train them
    with the default record filter ("llava_cot"), which keeps records whatever their tags. `extra_turns(index,
    objects, sample)` returns (user, reply) turns appended to scene `index` in every format alike (judge
    examples: the formats then differ only in the answer still)."""
    unknown = [f for f in formats if f not in ANSWER_FORMATS]
    if unknown or not formats:
        raise ValueError(f"unknown answer formats {unknown or formats!r}; choose from {ANSWER_FORMATS}")
    written = {}
    for answer_format in formats:

        def scene(index, answer_format=answer_format):
            objects, sample = mcq_scene(seed, index, kinds, scale)
            extra = extra_turns(index, objects, sample) if extra_turns else []
            return objects, [(mcq_prompt(sample), format_answer(sample, answer_format)), *extra]

        written[answer_format] = write_scenes(
            Path(out_dir) / answer_format, num_scenes, scene, seed, image_size, "png", overwrite, progress
        )
    return written


# -------------------------------------------------------------------------------------------------------- writer


@dataclasses.dataclass(frozen=True)
class SyntheticDataset:
    jsonl_path: Path
    image_root: Path
    num_samples: int


def write_synthetic_dataset(
    out_dir: str | os.PathLike,
    num_samples: int,
    seed: int = 0,
    image_size: int = 224,
    image_format: str = "jpeg",
    overwrite: bool = False,
) -> SyntheticDataset:
    """Writes `num_samples` scenes + questions to `out_dir` (see the module docstring for the layout).

    The dataset is built in a temporary sibling directory and moved into place at the end, so an interrupted run
    leaves no partial dataset at `out_dir`. Sample i depends only on (seed, i).
    """

    def scene(index):
        rng = np.random.default_rng([seed, index])
        objects = random_scene(rng)
        sample = make_sample(rng, objects)
        return objects, [(sample.question, sample.answer())]

    return write_scenes(out_dir, num_samples, scene, seed, image_size, image_format, overwrite)


def write_scenes(
    out_dir: str | os.PathLike,
    num_scenes: int,
    scene: Callable[[int], tuple[list[SceneObject], list[tuple[str, str]]]],
    seed: int = 0,
    image_size: int = 224,
    image_format: str = "jpeg",
    overwrite: bool = False,
    progress: bool = False,
) -> SyntheticDataset:
    """Writes the LLaVA-CoT layout for `scene(index)` -> (objects, [(user text, assistant text), ...]) over
    `num_scenes` indexes: one image per scene and one record per conversation about it (a record's id is
    `synthetic_{seed}_{index:06d}`, then `_1`, `_2`, ... for further conversations on the same image).
    Built in a temporary sibling directory and renamed into place; `progress` shows a bar."""
    if num_scenes < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_scenes}")
    if image_format not in ("jpeg", "png"):
        raise ValueError(f"image_format must be 'jpeg' or 'png', got {image_format!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True to replace it")

    suffix = "jpg" if image_format == "jpeg" else "png"
    save_kwargs = {"quality": 90} if image_format == "jpeg" else {}
    num_records = 0
    # an empty directory may be replaced without overwrite=True
    with files.atomic_directory(out_dir, overwrite=True) as tmp:
        tmp = Path(tmp)
        (tmp / IMAGE_ROOT_NAME / "synthetic").mkdir(parents=True)
        with open(tmp / JSONL_NAME, "w", encoding="utf-8") as jsonl:
            for index in tqdm(range(num_scenes), desc="scenes", unit="scene", disable=not progress):
                objects, conversations = scene(index)
                image_rel = f"synthetic/scene_{index:06d}.{suffix}"
                render_scene(objects, image_size).save(
                    tmp / IMAGE_ROOT_NAME / image_rel, format=image_format.upper(), **save_kwargs
                )
                for k, (question, answer) in enumerate(conversations):
                    record = {
                        "id": f"synthetic_{seed}_{index:06d}" + (f"_{k}" if k else ""),
                        "image": image_rel,
                        "conversations": [
                            {"from": "human", "value": f"<image>\n{question}"},
                            {"from": "gpt", "value": answer},
                        ],
                    }
                    jsonl.write(json.dumps(record) + "\n")
                    num_records += 1
    return SyntheticDataset(out_dir / JSONL_NAME, out_dir / IMAGE_ROOT_NAME, num_records)
