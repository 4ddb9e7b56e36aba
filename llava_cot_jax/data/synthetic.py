"""Offline CLEVR-like training data in the LLaVA-CoT-100k layout.

Each sample is a scene of simple solids (cubes, spheres, cylinders) drawn with PIL, a question whose answer follows
from the scene description alone (counting, attributes, comparisons, "remove all X"), and a four-stage answer
(summary, caption, reasoning, conclusion) written from the same description. Nothing is downloaded, and the same
seed always gives the same files, so tests and demos can train on it and check answers exactly.

The demo's multiple-choice questions (`mcq_scene`: the colour of a lone object, or the number of objects, each with
four options) come with `corrupt_stage` (a wrong version of any stage, for judge examples) and `write_scenes`
(any conversations about the scenes, several per image, in the same layout).

Layout written by `write_synthetic_dataset(out_dir, ...)`:

    out_dir/train.jsonl            {"id", "image", "conversations": [{"from": "human", ...}, {"from": "gpt", ...}]}
    out_dir/images/<image path>    the "image" field is relative to this image root
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from llava_cot_jax import files

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
    from `kinds` (a colour question shows one object, a count question one to MCQ_MAX_OBJECTS). Depends only on
    (seed, index, kinds, scale)."""
    unknown = [k for k in kinds if k not in _MCQ_MAKERS]
    if unknown or not kinds:
        raise ValueError(f"unknown multiple-choice kinds {unknown or kinds!r}; choose from {MCQ_KINDS}")
    rng = np.random.default_rng([seed, index])
    kind = kinds[rng.integers(len(kinds))]
    objects = random_scene(rng, *_MCQ_TEXT[kind][3], scale)
    return objects, _MCQ_MAKERS[kind](rng, objects)


def corrupt_stage(rng: np.random.Generator, objects: list[SceneObject], sample: McqSample, stage: str) -> str:
    """A wrong version of one stage of `sample` (a judge example's losing side): another kind's plan, a caption with
    one object recoloured, reshaped, dropped or doubled, or reasoning and conclusion that pick a wrong option."""
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


def _altered_scene(rng: np.random.Generator, objects: list[SceneObject]) -> list[SceneObject]:
    """The objects with one change that alters the caption."""
    changes = ["color", "shape", "double"] + (["drop"] if len(objects) > 1 else [])
    change = changes[rng.integers(len(changes))]
    i = int(rng.integers(len(objects)))
    target = objects[i]
    if change == "drop":
        return objects[:i] + objects[i + 1 :]
    if change == "double":
        return objects + [target]
    if change == "color":
        altered = dataclasses.replace(target, color=str(rng.choice([c for c in COLORS if c != target.color])))
    else:
        altered = dataclasses.replace(target, shape=str(rng.choice([s for s in SHAPES if s != target.shape])))
    return objects[:i] + [altered] + objects[i + 1 :]


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
