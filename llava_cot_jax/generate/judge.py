"""Judge prompts, judge-reply parsing and the knock-out tournament.

The model judges its own candidates. Everything wording-related lives here so that a user can swap the
whole set for another (e.g. a published one) with a JSON file: `JudgePrompts.load(path)`; keys absent
from the file keep the defaults below (`configs/judge_prompts_example.json` is a complete example). Templates
are `str.format` strings over the fields

    {question}  the user's question          {response_1}, {response_2}  the two candidates (stage content)
    {hint}      accepted earlier stages      {reasoning}                 the candidate under screening

Fields may stand in any order; the search prefills the text before the first {response_1}/{response_2}
({reasoning} when screening) once per question and stage, so templates that end with them judge faster.

Verdicts. `verdict_phrases` are the two exact phrases that pick response 1 and response 2. A judge reply stops
as soon as it has written one of them (a stop string in the decode loop), because a LLaVA-CoT model tends to
answer any prompt in its four-stage format first and would otherwise spend the budget before its verdict.
Replies that end without a phrase are read with the `choice_patterns` (regular expressions, case-insensitive,
capturing "1" or "2"; the last match counts); `incorrect_pattern` / `correct_pattern` read a screening reply.

A reply that picks neither is settled by a fallback rule (`fallback_winner`): "symmetric" (ours; does not
depend on which candidate was shown first) or "second" (LLaVA-CoT's: their judge picks response 1 only when
the reply says so, anything else picks response 2).

The tournament (`knockout`) runs one of two brackets and two ways of screening reasoning (see there).
"""

from __future__ import annotations

import dataclasses
import json
import re
import string
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# Every template ends with the text that differs between calls (the responses, the screened reasoning): what
# comes before is the same for every call about one question in a stage, and the search prefills it once.
# The format names the verdict with a placeholder, so a reply that restates the instructions writes no verdict.
_SHARED_FORMAT = (
    'Think briefly about which response is better, then end your reply with the line "Better response: N", '
    "where N is 1 or 2."
)
_RESPONSES = "\n\nResponse 1: {response_1}\n\nResponse 2: {response_2}"

# Per judged kind: what the judge is asked to compare. Kinds are the stage names (lower case) plus "answer"
# (best-of-N over whole answers) and "sentence" (sentence-level beam search).
DEFAULT_COMPARE = {
    "summary": (
        "You are reviewing two plans for answering a question about an image. A good plan says what has to be "
        "looked at and which approach will answer the question; it does not yet work out the answer. "
        + _SHARED_FORMAT
        + "\n\nQuestion: {question}"
        + _RESPONSES
    ),
    "caption": (
        "You are reviewing two descriptions of an image, each written to help answer a question. Prefer the one "
        "that reports more of the details relevant to the question while stating nothing the image does not show. "
        + _SHARED_FORMAT
        + "\n\nQuestion: {question}"
        + _RESPONSES
    ),
    "reasoning": (
        "You are reviewing two lines of reasoning towards the answer of a question about an image. Check each step "
        "of both, note where they differ, and prefer the one whose steps are sound and whose arithmetic is right. "
        + _SHARED_FORMAT
        + "\n\nQuestion: {question}\n\nWhat the image shows: {hint}"
        + _RESPONSES
    ),
    "conclusion": (
        "You are reviewing two final answers to a question about an image. Prefer the answer that follows from the "
        "description and reasoning below and that actually answers the question rather than declining to. "
        + _SHARED_FORMAT
        + "\n\nQuestion: {question}\n\nDescription and reasoning: {hint}"
        + _RESPONSES
    ),
    "answer": (
        "You are reviewing two complete answers to a question about an image. Prefer the one that answers the "
        "question more correctly and more completely. " + _SHARED_FORMAT + "\n\nQuestion: {question}" + _RESPONSES
    ),
    "sentence": (
        "You are reviewing two candidates for the next sentence of an answer to a question about an image. Prefer "
        "the sentence that continues the answer so far more accurately and usefully. "
        + _SHARED_FORMAT
        + "\n\nQuestion: {question}\n\nAnswer so far: {hint}"
        + _RESPONSES
    ),
}

DEFAULT_SCREEN = (
    "Check the reasoning below for mistakes. Take the information about the image as true and judge only the "
    "reasoning: whether each step follows, and whether every calculation is right. "
    'Reply with the single word "correct" if you find no mistake, or "incorrect" if you find one.\n\n'
    "Information about the image: {hint}\n\nReasoning: {reasoning}"
)

DEFAULT_VERDICT_PHRASES = ("Better response: 1", "Better response: 2")
# Looser readings of the default verdict (other spacing, case or markup, or a "choose response N" sentence).
DEFAULT_CHOICE_PATTERNS = (
    r"better\s+response\s*[:\-]?\s*\**\s*\[?\s*([12])\b",
    r"(?:choose|chose|pick|select|prefer)\w*\s+(?:response|answer|text)\s*\[?\s*([12])\b",
)


@dataclasses.dataclass(frozen=True)
class JudgePrompts:
    compare: dict[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_COMPARE))
    screen: str = DEFAULT_SCREEN
    verdict_phrases: tuple[str, str] = DEFAULT_VERDICT_PHRASES  # exact; they also end a judge reply
    choice_patterns: tuple[str, ...] = DEFAULT_CHOICE_PATTERNS
    incorrect_pattern: str = r"\bincorrect\b|\bwrong\b|\bnot correct\b"
    correct_pattern: str = r"\bcorrect\b"
    # Whether comparison prompts show the image (the screening prompt is text only, as in the paper's code).
    compare_with_image: bool = True

    @classmethod
    def load(cls, path: str | None) -> JudgePrompts:
        """Defaults, overridden by the keys of a JSON file (`compare` may override single kinds; keys starting with
        "_" are comments). A file that sets its own `verdict_phrases` and no `choice_patterns` gets no patterns:
        the default ones read the default phrase's wording."""
        if not path:
            return cls()
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object")
        data = {key: value for key, value in data.items() if not key.startswith("_")}  # "_..." keys are comments
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        compare = dict(DEFAULT_COMPARE)
        compare.update(data.pop("compare", {}))
        if "verdict_phrases" in data:
            data["verdict_phrases"] = tuple(data["verdict_phrases"])
            data.setdefault("choice_patterns", ())
        if "choice_patterns" in data:
            data["choice_patterns"] = tuple(data["choice_patterns"])
        prompts = cls(compare=compare, **data)
        try:
            prompts.validate()
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        return prompts

    def validate(self) -> None:
        for kind, template in self.compare.items():
            _check_fields(template, {"question", "hint", "response_1", "response_2"}, f"compare[{kind}]")
        _check_fields(self.screen, {"hint", "reasoning", "question"}, "screen")
        phrases = self.verdict_phrases
        if len(phrases) != 2 or not all(isinstance(p, str) and p for p in phrases):
            raise ValueError(f"verdict_phrases must be two non-empty strings (response 1, response 2), got {phrases!r}")
        if phrases[0] in phrases[1] or phrases[1] in phrases[0]:
            raise ValueError(f"verdict_phrases {phrases!r}: neither may contain the other (each ends a reply)")
        for pattern in self.choice_patterns:
            if re.compile(pattern).groups < 1:
                raise ValueError(f"choice pattern {pattern!r} must capture the chosen number")

    def compare_text(self, kind: str, question: str, response_1: str, response_2: str, hint: str = "") -> str:
        if kind not in self.compare:
            raise ValueError(f"no judge prompt for {kind!r}; have {sorted(self.compare)}")
        return self.compare[kind].format(question=question, hint=hint, response_1=response_1, response_2=response_2)

    def screen_text(self, question: str, reasoning: str, hint: str = "") -> str:
        return self.screen.format(question=question, hint=hint, reasoning=reasoning)

    def compare_prefix(self, kind: str, question: str, hint: str = "") -> str:
        """The start of `compare_text` before the first response: the same for every match about one question,
        so the search prefills it once and every judge call continues from it."""
        return _text_before(self.compare[kind], {"response_1", "response_2"}, question=question, hint=hint)

    def screen_prefix(self, question: str, hint: str = "") -> str:
        """The start of `screen_text` before the screened reasoning."""
        return _text_before(self.screen, {"reasoning"}, question=question, hint=hint)

    def parse_choice(self, reply: str) -> int | None:
        """0 if the reply picks response 1, 1 for response 2, None if it picks neither. The last verdict (a verdict
        phrase or a `choice_patterns` match) counts; without any, a reply that is just "1" or "2"."""
        found = [(reply.rfind(phrase), choice) for choice, phrase in enumerate(self.verdict_phrases)]
        for pattern in self.choice_patterns:
            matches = re.finditer(pattern, reply, re.IGNORECASE)
            found += [(m.start(), {"1": 0, "2": 1}.get(m.group(1))) for m in matches]
        found = [(position, choice) for position, choice in found if position >= 0 and choice is not None]
        if not found:
            bare = reply.strip().strip(".*\"' ")
            return {"1": 0, "2": 1}.get(bare)
        return max(found)[1]

    def parse_screen(self, reply: str) -> bool | None:
        """True = no mistake found, False = judged incorrect, None = neither word."""
        if re.search(self.incorrect_pattern, reply, re.IGNORECASE):
            return False
        if re.search(self.correct_pattern, reply, re.IGNORECASE):
            return True
        return None


def _text_before(template: str, stop: set[str], **values: str) -> str:
    """`template` formatted up to (not including) its first field named in `stop`."""
    out = []
    for literal, field, spec, conversion in string.Formatter().parse(template):
        out.append(literal)
        if field is None or field in stop:
            break
        out.append(
            ("{" + field + ("!" + conversion if conversion else "") + (":" + spec if spec else "") + "}").format(
                **values
            )
        )
    return "".join(out)


def _check_fields(template: str, allowed: set[str], where: str) -> None:
    for _, field, _, _ in string.Formatter().parse(template):
        if field is not None and field not in allowed:
            raise ValueError(f"{where}: unknown field {{{field}}}; allowed: {sorted(allowed)}")


# --- Tournament --------------------------------------------------------------------------------------------

BRACKETS = ("rounds", "pool")
SCREENS = ("once", "per_match")
FALLBACKS = ("symmetric", "second")


@dataclasses.dataclass
class Candidate:
    """One sampled continuation, as the tournament sees it."""

    text: str  # what the judge is shown
    closed: bool = True  # ended at its stop string (False: cut at the budget or by EOS)
    mean_logprob: float = 0.0  # mean log-probability of its tokens under the model (temperature 1)
    screen: bool | None = None  # reasoning screen: True ok, False judged incorrect, None not screened/unclear


@dataclasses.dataclass
class Match:
    group: int  # which question (row of the batch) the match belongs to
    first: int  # candidate index shown as "Response 1"
    second: int  # candidate index shown as "Response 2"
    round: int = 0  # the batch of matches it was decided in
    reply: str | None = None
    winner: int | None = None
    rule: str = ""  # judge | screen | fallback:closed | fallback:logprob | fallback:coin | fallback:second
    screens: list[dict] = dataclasses.field(default_factory=list)  # per-match screening: candidate, reply, verdict

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def fallback_winner(a: Candidate, b: Candidate, rng: np.random.Generator, rule: str = "symmetric") -> tuple[int, str]:
    """Settles a match the judge did not: 0 picks `a` (shown first), 1 picks `b`.

    "symmetric" (ours) does not depend on the order the two were shown in:
      1. a candidate that closed its stage beats one that was cut;
      2. otherwise the higher mean token log-probability under the model wins;
      3. an exact tie is a fair coin from the seeded generator.
    "second" is LLaVA-CoT's: the candidate shown second wins (their judge picks the first only when the reply says
    so; `inference/VLMEvalKit/inference_demo.py`, `judge`).
    """
    if rule == "second":
        return 1, "fallback:second"
    if rule != "symmetric":
        raise ValueError(f"fallback rule must be one of {FALLBACKS}, got {rule!r}")
    if a.closed != b.closed:
        return (0 if a.closed else 1), "fallback:closed"
    if a.mean_logprob != b.mean_logprob:
        return (0 if a.mean_logprob > b.mean_logprob else 1), "fallback:logprob"
    return int(rng.integers(2)), "fallback:coin"


# A bracket is a list of pairings in an order where each input exists before it is used: an input >= 0 is a
# candidate, an input k < 0 is the winner of pairing -k - 1.
Bracket = list[tuple[int, int]]


def bracket_rounds(n: int, rng: np.random.Generator) -> Bracket:
    """Ours: a single-elimination bracket over a shuffled order. A first round pairs just enough candidates that
    the rest is a full power-of-two bracket (byes go to the others), so every candidate plays floor(log2 n) or
    ceil(log2 n) matches, the most even split there is. A round's matches are independent, so all of them (over
    every question) go to the judge as one batch: ceil(log2 n) judge calls per tournament."""
    order = [int(i) for i in rng.permutation(n)]
    first_round = n - (1 << (n.bit_length() - 1))  # 0 when n is a power of two
    bracket: Bracket = [(order[2 * k], order[2 * k + 1]) for k in range(first_round)]
    pool = [-(k + 1) for k in range(first_round)] + order[2 * first_round :]
    while len(pool) > 1:
        for k in range(0, len(pool), 2):
            bracket.append((pool[k], pool[k + 1]))
        pool = [-(len(bracket) - len(pool) // 2 + k + 1) for k in range(len(pool) // 2)]
    return bracket


def bracket_pool(n: int, rng: np.random.Generator) -> Bracket:
    """LLaVA-CoT's: two entries are drawn at random from the pool (the first drawn is shown first) and the winner
    goes back into it, until one is left (`inference/VLMEvalKit/inference_demo.py`, `generate_inner_stage_beam`).
    A winner may play again at once, so one candidate can play up to n - 1 matches."""
    pool = list(range(n))
    bracket: Bracket = []
    while len(pool) > 1:
        first = pool.pop(int(rng.integers(len(pool))))
        second = pool.pop(int(rng.integers(len(pool))))
        bracket.append((first, second))
        pool.append(-len(bracket))
    return bracket


_BRACKET_BUILDERS = {"rounds": bracket_rounds, "pool": bracket_pool}

JudgeFn = Callable[[Sequence[Match]], Sequence[str]]
# Screens candidates (group, candidate index) → (reply, verdict: True ok / False incorrect / None unclear) each.
ScreenFn = Callable[[Sequence[tuple[int, int]]], Sequence[tuple[str, bool | None]]]


def knockout(
    candidates: Sequence[Sequence[Candidate]],
    judge: JudgeFn,
    parse: Callable[[str], int | None],
    rng: np.random.Generator,
    *,
    bracket: str = "rounds",
    fallback: str = "symmetric",
    screen: ScreenFn | None = None,
) -> tuple[list[int], list[Match]]:
    """A knock-out tournament per group; returns (winner index per group, every match played).

    `bracket` ("rounds" or "pool", see `bracket_rounds` / `bracket_pool`) orders the matches. Matches whose
    entrants are known are decided together: every such match over all groups goes to `judge` in one call, which
    returns one reply per match; an unreadable reply goes to `fallback_winner(..., fallback)`.

    Reasoning screens (candidates judged incorrect lose), in one of two ways:
      screen=None ("once", ours): the candidates' `screen` verdicts were set beforehand, each candidate screened
        once; a match in which exactly one side failed goes to the other without asking the judge, and a match
        of two failed candidates is judged like any other.
      screen=fn ("per_match", LLaVA-CoT's): within each match the first candidate is screened; if it fails, the
        second wins unscreened; otherwise the second is screened and loses if it fails; otherwise the judge
        decides. A winner is screened again in each later match. Only a reply judged "incorrect" fails (theirs:
        "incorrect" in the reply).
    """
    if bracket not in _BRACKET_BUILDERS:
        raise ValueError(f"bracket must be one of {BRACKETS}, got {bracket!r}")
    brackets = [_BRACKET_BUILDERS[bracket](len(group), rng) for group in candidates]
    winners: list[list[int | None]] = [[None] * len(b) for b in brackets]

    def _entrants(g: int, k: int) -> tuple[int | None, int | None]:
        """The two candidates of group g's pairing k; None for a side whose match is not decided yet."""
        return tuple(x if x >= 0 else winners[g][-x - 1] for x in brackets[g][k])

    pending = [list(range(len(b))) for b in brackets]
    played: list[Match] = []
    round_index = 0
    while any(pending):
        ready = [(g, k) for g, ks in enumerate(pending) for k in ks if None not in _entrants(g, k)]
        matches = [Match(g, *_entrants(g, k), round_index) for g, k in ready]
        undecided = _screen_matches(matches, candidates, screen)
        if undecided:
            replies = judge(undecided)
            if len(replies) != len(undecided):
                raise RuntimeError(f"judge returned {len(replies)} replies for {len(undecided)} matches")
            for m, reply in zip(undecided, replies):
                m.reply = reply
                verdict = parse(reply)
                if verdict is None:
                    a, b = candidates[m.group][m.first], candidates[m.group][m.second]
                    verdict, m.rule = fallback_winner(a, b, rng, fallback)
                else:
                    m.rule = "judge"
                m.winner = m.first if verdict == 0 else m.second
        for (g, k), m in zip(ready, matches):
            winners[g][k] = m.winner
            pending[g].remove(k)
        played += matches
        round_index += 1
    return [w[-1] if w else 0 for w in winners], played


def _screen_matches(matches: list[Match], candidates, screen: ScreenFn | None) -> list[Match]:
    """Decides the matches a reasoning screen settles (see `knockout`); returns the ones left for the judge."""
    if screen is None:
        undecided = []
        for m in matches:
            a, b = candidates[m.group][m.first], candidates[m.group][m.second]
            if a.screen is False and b.screen is not False:
                m.winner, m.rule = m.second, "screen"
            elif b.screen is False and a.screen is not False:
                m.winner, m.rule = m.first, "screen"
            else:
                undecided.append(m)
        return undecided
    undecided = matches
    for side, other in (("first", "second"), ("second", "first")):
        if not undecided:
            break
        verdicts = screen([(m.group, getattr(m, side)) for m in undecided])
        if len(verdicts) != len(undecided):
            raise RuntimeError(f"screen returned {len(verdicts)} verdicts for {len(undecided)} candidates")
        still = []
        for m, (reply, verdict) in zip(undecided, verdicts):
            m.screens.append({"candidate": getattr(m, side), "reply": reply, "verdict": verdict})
            if verdict is False:
                m.winner, m.rule = getattr(m, other), "screen"
            else:
                still.append(m)
        undecided = still
    return undecided
