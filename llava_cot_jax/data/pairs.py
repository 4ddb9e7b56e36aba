"""Right and corrupted stages of synthetic multiple-choice samples, in pairs: data for a self-judge ("which response
is better?"), for a reward model (a Bradley-Terry loss on the two texts, `train/pairwise.py`), and for measuring
how often a judge picks the right one.

A pair takes one stage of one sample (`synthetic.mcq_scene`) and sets the stage as written against
`synthetic.corrupt_stage`'s wrong version of it: for the reasoning kinds, a caption with one object's size, colour
or shape changed (or one object dropped or doubled), reasoning whose last step slips to a wrong option, or a
conclusion naming another option. Which side is shown first is balanced exactly: within every two consecutive
scenes, for every stage, the right text comes first once.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from llava_cot_jax import files
from llava_cot_jax.data import synthetic

PAIRS_JSONL = "pairs.jsonl"

PAIR_STAGES = ("CAPTION", "REASONING", "CONCLUSION")
_STAGE_ORDER = ("SUMMARY", "CAPTION", "REASONING", "CONCLUSION")


@dataclasses.dataclass(frozen=True)
class StagePair:
    index: int  # the scene's index in its multiple-choice set
    stage: str  # one of PAIR_STAGES (or SUMMARY)
    sample: synthetic.McqSample  # the question and its right stages
    right: str
    wrong: str
    right_first: bool  # whether the right text is response 1

    @property
    def responses(self) -> tuple[str, str]:
        """(response 1, response 2) as a judge sees them."""
        return (self.right, self.wrong) if self.right_first else (self.wrong, self.right)

    @property
    def better(self) -> int:
        """The number of the right response (1 or 2): the judge's target, "Better response: N"."""
        return 1 if self.right_first else 2

    @property
    def context(self) -> str:
        """The tagged stages before this one, as the answer writes them (ending in a blank line, or empty)."""
        earlier = _STAGE_ORDER[: _STAGE_ORDER.index(self.stage)]
        return "".join(f"<{s}> {getattr(self.sample, s.lower())} </{s}>\n\n" for s in earlier)

    def tagged(self, text: str) -> str:
        """The answer up to and including this stage with `text` in it: what a reward model scores."""
        return f"{self.context}<{self.stage}> {text} </{self.stage}>"

    @property
    def chosen(self) -> str:
        return self.tagged(self.right)

    @property
    def rejected(self) -> str:
        return self.tagged(self.wrong)


def stage_pairs(
    seed: int,
    num_scenes: int,
    kinds: tuple[str, ...] = synthetic.REASONING_KINDS,
    scale: float = 1.0,
    stages: Sequence[str] = PAIR_STAGES,
    start: int = 0,
) -> list[StagePair]:
    """One pair per stage in `stages` for each scene `start .. start + num_scenes - 1` of `mcq_scene(seed, index,
    kinds, scale)`. Pair (index, stage) depends only on (seed, index, kinds, scale, stage), so a held-out seed
    gives held-out pairs and a longer run extends a shorter one."""
    unknown = [s for s in stages if s not in _STAGE_ORDER]
    if unknown or not stages:
        raise ValueError(f"unknown stages {unknown or stages!r}; choose from {_STAGE_ORDER}")
    pairs = []
    for index in range(start, start + num_scenes):
        objects, sample = synthetic.mcq_scene(seed, index, kinds, scale)
        for stage in stages:
            # The corruption's draws are the pair's own (stage by name), apart from the scene's.
            rng = np.random.default_rng([seed, index, 2, _STAGE_ORDER.index(stage)])
            wrong = synthetic.corrupt_stage(rng, objects, sample, stage)
            # Scenes 2k and 2k+1 share one coin per stage and take opposite sides of it: exact balance.
            coin = bool(np.random.default_rng([seed, index // 2, 3, _STAGE_ORDER.index(stage)]).integers(2))
            right = getattr(sample, stage.lower())
            pairs.append(StagePair(index, stage, sample, right, wrong, coin == (index % 2 == 0)))
    return pairs


def judge_accuracy(pairs: Sequence[StagePair], picks: Iterable[int | None]) -> dict[str, float]:
    """The fraction of pairs where the judge's pick (1, 2, or None for no verdict) is the right response, overall
    and per stage ("all", "CAPTION", ...); a missing verdict counts as wrong."""
    picks = list(picks)
    if len(picks) != len(pairs):
        raise ValueError(f"{len(picks)} picks for {len(pairs)} pairs")
    hits: dict[str, list[bool]] = {"all": []}
    for pair, pick in zip(pairs, picks):
        hit = pick == pair.better
        hits["all"].append(hit)
        hits.setdefault(pair.stage, []).append(hit)
    return {key: float(np.mean(values)) if values else float("nan") for key, values in hits.items()}


def pair_conversations(question: str, answer: str, has_image: bool = True) -> list[dict]:
    """The conversation a reward model reads for one side of a pair (and the search's reward scorer for one
    candidate): the question as the user turn, the tagged answer so far as the assistant turn."""
    return [
        {"from": "human", "value": ("<image>\n" if has_image else "") + question},
        {"from": "gpt", "value": answer.strip()},
    ]


def write_pairs(
    out_dir: str | os.PathLike,
    seed: int,
    num_scenes: int,
    kinds: tuple[str, ...] = synthetic.REASONING_KINDS,
    scale: float = 1.0,
    image_size: int = 64,
    stages: Sequence[str] = PAIR_STAGES,
) -> Path:
    """Writes `stage_pairs(...)` as reward-model training data: `out_dir/pairs.jsonl`, one line
    {"id", "image", "question", "chosen", "rejected"} per pair (image relative to out_dir, question as the
    model is asked it, `chosen`/`rejected` the tagged answers up to the stage), and the scene images. Returns the
    JSONL path. Written in a temporary directory and renamed into place."""
    pairs = stage_pairs(seed, num_scenes, kinds, scale, stages)
    with files.atomic_directory(out_dir, overwrite=True) as tmp:
        (Path(tmp) / "images").mkdir()
        with open(Path(tmp) / PAIRS_JSONL, "w", encoding="utf-8") as out:
            for pair in pairs:
                image = f"images/scene_{pair.index:06d}.png"
                if not (Path(tmp) / image).exists():
                    objects, _ = synthetic.mcq_scene(seed, pair.index, kinds, scale)
                    synthetic.render_scene(objects, image_size).save(Path(tmp) / image, format="PNG")
                record = {
                    "id": f"pair_{seed}_{pair.index:06d}_{pair.stage.lower()}",
                    "image": image,
                    "question": synthetic.mcq_prompt(pair.sample),
                    "chosen": pair.chosen,
                    "rejected": pair.rejected,
                }
                out.write(json.dumps(record) + "\n")
    return Path(out_dir) / PAIRS_JSONL


class PairSource:
    """Random-access source over a pairs JSONL (`write_pairs`; images relative to the file's directory): records
    {"id", "image" (bytes, empty without an image), "question", "chosen", "rejected"}."""

    def __init__(self, jsonl_path: str | os.PathLike):
        self.path = Path(jsonl_path)
        with open(self.path, encoding="utf-8") as f:
            self.records = [json.loads(line) for line in f if line.strip()]
        for record in self.records:
            missing = {"question", "chosen", "rejected"} - set(record)
            if missing:
                raise ValueError(f"{self.path}: record {record.get('id')!r} lacks {sorted(missing)}")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = dict(self.records[index])
        image = record.get("image") or ""
        record["image"] = (self.path.parent / image).read_bytes() if image else b""
        record.setdefault("id", f"pair_{index}")
        return record

    def __repr__(self) -> str:
        return f"PairSource({str(self.path)!r}, {len(self)} pairs)"
