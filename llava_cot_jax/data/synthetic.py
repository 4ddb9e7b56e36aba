"""Offline CLEVR-like training data in the LLaVA-CoT-100k layout.

Each sample is a scene of simple solids (cubes, spheres, cylinders) drawn with PIL, a question whose answer follows
from the scene description alone (counting, attributes, comparisons, "remove all X"), and a four-stage answer
(summary, caption, reasoning, conclusion) written from the same description. Nothing is downloaded, and the same
seed always gives the same files, so tests and demos can train on it and check answers exactly.

Layout written by `write_synthetic_dataset(out_dir, ...)`:

    out_dir/train.jsonl            {"id", "image", "conversations": [{"from": "human", ...}, {"from": "gpt", ...}]}
    out_dir/images/<image path>    the "image" field is relative to this image root
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

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


def random_scene(rng: np.random.Generator, min_objects: int = 3, max_objects: int = 7) -> list[SceneObject]:
    """Objects with random attributes at random non-overlapping positions (rejection sampling on bounding circles)."""
    count = int(rng.integers(min_objects, max_objects + 1))
    objects: list[SceneObject] = []
    attempts = 0
    while len(objects) < count and attempts < 500:
        attempts += 1
        size = SIZES[rng.integers(len(SIZES))]
        r = _RADIUS[size]
        x, y = (float(v) for v in rng.uniform(r + 0.02, 1.0 - r - 0.02, size=2))
        # Keep a gap between objects so shapes never touch (counting must be unambiguous to the eye too).
        if any((x - o.x) ** 2 + (y - o.y) ** 2 < (r + _RADIUS[o.size] + 0.03) ** 2 for o in objects):
            continue
        objects.append(
            SceneObject(
                shape=SHAPES[rng.integers(len(SHAPES))],
                color=list(COLORS)[rng.integers(len(COLORS))],
                size=size,
                x=x,
                y=y,
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
    r = _RADIUS[obj.size] * side
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
        reasoning=(
            f"Checking each object, exactly one is a {name}: the {target.phrase()}. Its {asked} is {value}."
        ),
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
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if image_format not in ("jpeg", "png"):
        raise ValueError(f"image_format must be 'jpeg' or 'png', got {image_format!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    suffix = "jpg" if image_format == "jpeg" else "png"
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (tmp / IMAGE_ROOT_NAME / "synthetic").mkdir(parents=True)
        with open(tmp / JSONL_NAME, "w", encoding="utf-8") as jsonl:
            for index in range(num_samples):
                rng = np.random.default_rng([seed, index])
                objects = random_scene(rng)
                sample = make_sample(rng, objects)
                image_rel = f"synthetic/scene_{index:06d}.{suffix}"
                image = render_scene(objects, image_size)
                save_kwargs = {"quality": 90} if image_format == "jpeg" else {}
                image.save(tmp / IMAGE_ROOT_NAME / image_rel, format=image_format.upper(), **save_kwargs)
                record = {
                    "id": f"synthetic_{seed}_{index:06d}",
                    "image": image_rel,
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{sample.question}"},
                        {"from": "gpt", "value": sample.answer()},
                    ],
                }
                jsonl.write(json.dumps(record) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SyntheticDataset(out_dir / JSONL_NAME, out_dir / IMAGE_ROOT_NAME, num_samples)
