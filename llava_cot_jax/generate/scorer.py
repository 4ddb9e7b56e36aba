"""What keeps a search's candidates: a `Scorer` (`search.scorer`).

    self_judge  the model judges its own candidates in a knock-out tournament (`judge.knockout`, LLaVA-CoT's
                stage-level beam search); the reasoning stage is screened first
    reward      a reward model (`models/reward.py`: a checkpoint of this package with a scalar head, trained with
                `train.objective = "pairwise"`) scores every candidate, the accepted answer so far followed by the
                candidate, in one batched call; the highest reward wins

A scorer sees one step's candidates (`StepCandidates`) and returns a `Selection`: each question's winner, its
candidates' rewards when it has them, and per question a trace entry, which always counts the tokens the scorer
read and generated (`scorer_tokens`), so a run's cost is every candidate's tokens plus these.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from llava_cot_jax.data import chat
from llava_cot_jax.data.pairs import pair_conversations
from llava_cot_jax.generate import judge as judge_lib

SCORERS = ("self_judge", "reward")
REWARD_ROW_BUCKET = 128  # reward inputs are padded to multiples of this many tokens (a handful of compiles)


@dataclasses.dataclass
class StepCandidates:
    """One search step's candidates: per question, the accepted text before this step and its candidates."""

    kind: str  # summary | caption | reasoning | conclusion | answer | sentence
    stage: str | None  # the stage name, or None for whole answers and sentences
    questions: list[str]  # as the judge / reward model is shown them
    prefixes: list[str]  # the accepted answer so far, per question
    groups: list[list[judge_lib.Candidate]]  # per question: what a judge is shown of each candidate
    texts: list[list[str]]  # per question: each candidate's text as generated (with its tags)
    live: list[int]  # the questions still answering


@dataclasses.dataclass
class Selection:
    winners: list[int]  # per question (0 for questions that are not live)
    trace: list[dict]  # per question: what the trace records of the choice, "scorer_tokens" always among it
    scores: list[list[float]] | None = None  # per question, each candidate's reward (reward scorers only)


class Scorer(Protocol):
    def select(self, step: StepCandidates) -> Selection: ...


def verdict_counts(matches: Sequence[judge_lib.Match]) -> dict[str, int]:
    """How many judge replies were read and how many fell back to the fallback rule (screen-decided matches
    asked no judge and count in neither)."""
    return {
        "read": sum(m.rule == "judge" for m in matches),
        "fallback": sum(m.rule.startswith("fallback") for m in matches),
    }


def _tokens(read: int = 0, generated: int = 0) -> dict:
    return {"read": int(read), "generated": int(generated)}


class SelfJudge:
    """The model judges its own candidates (`judge.knockout`). `judge(matches, step)` and `screen(pairs, step)`
    ask the model in one batched call each (the searcher's judge runner); `tally()` returns and resets the judge
    tokens read and generated per question since the last call."""

    def __init__(
        self,
        judge: Callable,
        screen: Callable,
        tally: Callable[[], dict[int, dict]],
        parse_choice: Callable,
        rng: Callable[[], np.random.Generator],
        bracket: str,
        fallback: str,
        screen_mode: str,
    ):
        self.judge, self.screen, self.tally = judge, screen, tally
        self.parse_choice, self.rng = parse_choice, rng
        self.bracket, self.fallback, self.screen_mode = bracket, fallback, screen_mode

    def select(self, step: StepCandidates) -> Selection:
        b, live = len(step.groups), step.live
        n = len(step.groups[0]) if step.groups else 0
        screen_replies: dict[tuple[int, int], str] = {}
        screen_per_match = None
        if step.stage == "REASONING" and n > 1:
            if self.screen_mode == "once":  # every candidate, in one batch, before the tournament
                pairs = [(q, j) for q in live for j in range(n)]
                for (q, j), (reply, verdict) in zip(pairs, self.screen(pairs, step)):
                    step.groups[q][j].screen = verdict
                    screen_replies[(q, j)] = reply
            else:  # the tournament asks, match by match (knockout's groups are the live questions)
                screen_per_match = lambda pairs: self.screen([(live[g], j) for g, j in pairs], step)
        winners = [0] * b
        matches: list[judge_lib.Match] = []
        if n > 1 and live:
            live_winners, matches = judge_lib.knockout(
                [step.groups[q] for q in live],
                lambda ms: self.judge(ms, step),
                self.parse_choice,
                self.rng(),
                bracket=self.bracket,
                fallback=self.fallback,
                screen=screen_per_match,
            )
            for q, w in zip(live, live_winners):
                winners[q] = w
            for m in matches:
                m.group = live[m.group]
        tokens = self.tally()
        trace = []
        for q in range(b):
            mine = [m for m in matches if m.group == q]
            entry = {"matches": [m.as_dict() for m in mine], "verdicts": verdict_counts(mine)}
            entry["scorer_tokens"] = tokens.get(q, _tokens())
            entry["screen_replies"] = {j: r for (g, j), r in screen_replies.items() if g == q}
            trace.append(entry)
        return Selection(winners, trace)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _rewards(graphdef, state, inputs):
    from flax import nnx

    return nnx.merge(graphdef, state).reward(**inputs)


class RewardScorer:
    """Scores candidates with a reward model (`models/reward.reward_model_class`), every candidate of every live
    question in one batched call. A candidate is read as the reward model was trained to read a pair's side
    (`data/pairs.pair_conversations`): the question, then the answer so far with the candidate appended.

    `images(q)` gives question q's processed image arrays {pixel_values [I, T, 3, H, W], aspect_ratio_ids [I],
    aspect_ratio_mask [I, T], num_tiles [I]}, or None for a text-only question."""

    def __init__(self, model, tokenizer, images: Callable[[int], dict | None] | None = None, bos=chat.DEFAULT_BOS):
        from flax import nnx

        self.graphdef, self.state = nnx.split(model)
        self.config = model.config
        self.tokenizer, self.images, self.bos = tokenizer, images or (lambda q: None), bos

    def score(self, questions: Sequence[str], answers: Sequence[str], owners: Sequence[int]) -> np.ndarray:
        """Rewards [R] of R (question, answer) rows; row r is about question `owners[r]` (its image)."""
        rows = []
        for question, answer, q in zip(questions, answers, owners):
            image = self.images(q)
            encoded = chat.encode_training_example(
                self.tokenizer,
                pair_conversations(question, answer, has_image=image is not None),
                has_image=image is not None,
                num_tiles=None if image is None else list(image["num_tiles"]),
                max_images=None if image is None else len(image["num_tiles"]),
                max_tiles=self.config.vision.max_num_tiles,
                bos=self.bos,
            )
            rows.append((encoded, image))
        length = -(-max(len(e["input_ids"]) for e, _ in rows) // REWARD_ROW_BUCKET) * REWARD_ROW_BUCKET
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = np.full((len(rows), length), pad_id, np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        for r, (e, _) in enumerate(rows):
            ids[r, : len(e["input_ids"])] = e["input_ids"]
            mask[r, : len(e["input_ids"])] = 1
        inputs: dict[str, Any] = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
        if rows[0][1] is not None:
            xmask = np.zeros((len(rows), length) + rows[0][0]["cross_attention_mask"].shape[1:], np.int32)
            for r, (e, _) in enumerate(rows):
                xmask[r, : len(e["input_ids"])] = e["cross_attention_mask"]
            for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
                inputs[key] = jnp.asarray(np.stack([np.asarray(image[key]) for _, image in rows]))
            inputs["cross_attention_mask"] = jnp.asarray(xmask)
        self.last_tokens_read = mask.sum(axis=1)
        return np.asarray(_rewards(self.graphdef, self.state, inputs), np.float32)

    def select(self, step: StepCandidates) -> Selection:
        b = len(step.groups)
        winners, trace, scores = [0] * b, [{"scorer_tokens": _tokens()} for _ in range(b)], [[] for _ in range(b)]
        rows = [(q, j) for q in step.live for j in range(len(step.texts[q]))]
        if not rows:
            return Selection(winners, trace, scores)
        rewards = self.score(
            [step.questions[q] for q, _ in rows],
            [step.prefixes[q] + step.texts[q][j] for q, j in rows],
            [q for q, _ in rows],
        )
        for (q, _), reward, read in zip(rows, rewards, self.last_tokens_read):
            scores[q].append(float(reward))
            trace[q]["scorer_tokens"]["read"] += int(read)
        for q in step.live:
            winners[q] = int(np.argmax(scores[q]))
            trace[q]["rewards"] = scores[q]
        return Selection(winners, trace, scores)


def load_reward_model(path: str, dtype: str | None = None):
    """A reward model from a training checkpoint DIR/checkpoints/STEP of `train.objective = "pairwise"` (the base
    model's parameters in their stored, scanned layout, and the head), in `dtype` (default: as stored)."""
    from flax import nnx

    from llava_cot_jax import checkpoint, families
    from llava_cot_jax.models import reward

    config, params = checkpoint.load_params(path)
    if dtype:
        config = config.replace(dtype=dtype, param_dtype=dtype)
    model_class = reward.reward_model_class(families.of(config).model_class)
    model = nnx.eval_shape(lambda: model_class(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    values = {**checkpoint.nested(params), reward.HEAD_KEY: checkpoint.load_reward_head(path)}
    pure = jax.tree.map(lambda a, v: np.asarray(v, a.dtype), nnx.to_pure_dict(state), values)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)
