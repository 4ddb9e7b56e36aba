"""Judge prompts, judge-reply parsing and the knock-out tournament.

The model judges its own candidates. Everything wording-related lives here so that a user can swap the
whole set for another (e.g. a published one) with a JSON file: `JudgePrompts.load(path)`; keys absent
from the file keep the defaults below. Templates are `str.format` strings over the fields

    {question}  the user's question          {response_1}, {response_2}  the two candidates (stage content)
    {hint}      accepted earlier stages      {reasoning}                 the candidate under screening

and the reply patterns are regular expressions (case-insensitive): `choice_patterns` must capture "1" or
"2" (the last match in a reply counts), `incorrect_pattern` / `correct_pattern` read a screening reply.
Fields may stand in any order; the search prefills the text before the first {response_1}/{response_2}
({reasoning} when screening) once per question and stage, so templates that end with them judge faster.

Unparseable replies and the tournament's other ties are settled by `fallback_winner`, a rule that does not
depend on the order in which the two candidates were shown (see there).
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
_SHARED_FORMAT = (
    "Think briefly about which response is better, then end your reply with one line that reads exactly "
    '"Better response: 1" or "Better response: 2".'
)
_RESPONSES = "\n\nResponse 1: {response_1}\n\nResponse 2: {response_2}"

# Per judged kind: what the judge is asked to compare. Kinds are the stage names (lower case) plus "answer"
# (best-of-N over whole answers) and "sentence" (sentence-level beam search).
DEFAULT_COMPARE = {
    "summary": (
        "You are reviewing two plans for answering a question about an image. A good plan says what has to be "
        "looked at and which approach will answer the question; it does not yet work out the answer. "
        + _SHARED_FORMAT + "\n\nQuestion: {question}" + _RESPONSES
    ),
    "caption": (
        "You are reviewing two descriptions of an image, each written to help answer a question. Prefer the one "
        "that reports more of the details relevant to the question while stating nothing the image does not show. "
        + _SHARED_FORMAT + "\n\nQuestion: {question}" + _RESPONSES
    ),
    "reasoning": (
        "You are reviewing two lines of reasoning towards the answer of a question about an image. Check each step "
        "of both, note where they differ, and prefer the one whose steps are sound and whose arithmetic is right. "
        + _SHARED_FORMAT + "\n\nQuestion: {question}\n\nWhat the image shows: {hint}" + _RESPONSES
    ),
    "conclusion": (
        "You are reviewing two final answers to a question about an image. Prefer the answer that follows from the "
        "description and reasoning below and that actually answers the question rather than declining to. "
        + _SHARED_FORMAT + "\n\nQuestion: {question}\n\nDescription and reasoning: {hint}" + _RESPONSES
    ),
    "answer": (
        "You are reviewing two complete answers to a question about an image. Prefer the one that answers the "
        "question more correctly and more completely. " + _SHARED_FORMAT + "\n\nQuestion: {question}" + _RESPONSES
    ),
    "sentence": (
        "You are reviewing two candidates for the next sentence of an answer to a question about an image. Prefer "
        "the sentence that continues the answer so far more accurately and usefully. "
        + _SHARED_FORMAT + "\n\nQuestion: {question}\n\nAnswer so far: {hint}" + _RESPONSES
    ),
}

DEFAULT_SCREEN = (
    "Check the reasoning below for mistakes. Take the information about the image as true and judge only the "
    "reasoning: whether each step follows, and whether every calculation is right. "
    'Reply with the single word "correct" if you find no mistake, or "incorrect" if you find one.\n\n'
    "Information about the image: {hint}\n\nReasoning: {reasoning}"
)

DEFAULT_CHOICE_PATTERNS = (
    r"better\s+response\s*[:\-]?\s*\**\s*\[?\s*([12])\b",
    r"(?:choose|chose|pick|select|prefer)\w*\s+(?:response|answer|text)\s*\[?\s*([12])\b",
)


@dataclasses.dataclass(frozen=True)
class JudgePrompts:
    compare: dict[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_COMPARE))
    screen: str = DEFAULT_SCREEN
    choice_patterns: tuple[str, ...] = DEFAULT_CHOICE_PATTERNS
    incorrect_pattern: str = r"\bincorrect\b|\bwrong\b|\bnot correct\b"
    correct_pattern: str = r"\bcorrect\b"
    # Whether comparison prompts show the image (the screening prompt is text only, as in the paper's code).
    compare_with_image: bool = True

    @classmethod
    def load(cls, path: str | None) -> "JudgePrompts":
        """Defaults, overridden by the keys of a JSON file (`compare` may override single kinds)."""
        if not path:
            return cls()
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object")
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        compare = dict(DEFAULT_COMPARE)
        compare.update(data.pop("compare", {}))
        if "choice_patterns" in data:
            data["choice_patterns"] = tuple(data["choice_patterns"])
        prompts = cls(compare=compare, **data)
        prompts.validate()
        return prompts

    def validate(self) -> None:
        for kind, template in self.compare.items():
            _check_fields(template, {"question", "hint", "response_1", "response_2"}, f"compare[{kind}]")
        _check_fields(self.screen, {"hint", "reasoning", "question"}, "screen")
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
        """0 if the reply picks response 1, 1 for response 2, None if it picks neither (the last verdict counts)."""
        found = []
        for pattern in self.choice_patterns:
            found += [(m.start(), m.group(1)) for m in re.finditer(pattern, reply, re.IGNORECASE)]
        if not found:
            bare = reply.strip().strip(".*\"' ")
            return {"1": 0, "2": 1}.get(bare)
        return 0 if max(found)[1] == "1" else 1

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
        out.append(("{" + field + ("!" + conversion if conversion else "") + (":" + spec if spec else "") + "}")
                   .format(**values))
    return "".join(out)


def _check_fields(template: str, allowed: set[str], where: str) -> None:
    for _, field, _, _ in string.Formatter().parse(template):
        if field is not None and field not in allowed:
            raise ValueError(f"{where}: unknown field {{{field}}}; allowed: {sorted(allowed)}")


# --- Tournament --------------------------------------------------------------------------------------------


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
    round: int = 0
    reply: str | None = None
    winner: int | None = None
    rule: str = ""  # judge | screen | fallback:closed | fallback:logprob | fallback:coin

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def fallback_winner(a: Candidate, b: Candidate, rng: np.random.Generator) -> tuple[int, str]:
    """Settles a match the judge did not: 0 picks `a`, 1 picks `b`. Symmetric in (a, b):

    1. a candidate that closed its stage beats one that was cut;
    2. otherwise the higher mean token log-probability under the model wins;
    3. an exact tie is a fair coin from the seeded generator.
    """
    if a.closed != b.closed:
        return (0 if a.closed else 1), "fallback:closed"
    if a.mean_logprob != b.mean_logprob:
        return (0 if a.mean_logprob > b.mean_logprob else 1), "fallback:logprob"
    return int(rng.integers(2)), "fallback:coin"


JudgeFn = Callable[[Sequence[Match]], Sequence[str]]


def knockout(
    candidates: Sequence[Sequence[Candidate]],
    judge: JudgeFn,
    parse: Callable[[str], int | None],
    rng: np.random.Generator,
) -> tuple[list[int], list[Match]]:
    """A knock-out tournament per group; returns (winner index per group, every match played).

    Each group's candidates are shuffled into a bracket (which also randomises which one the judge sees
    first); each round pairs neighbours, an odd one out advances on a bye. All matches of a round, over
    all groups, go to `judge` in one call, which returns one reply per match. Before asking the judge, a
    match in which exactly one side failed the correctness screen goes to the other side.
    """
    alive = [list(rng.permutation(len(group))) for group in candidates]
    played: list[Match] = []
    round_index = 0
    while any(len(a) > 1 for a in alive):
        matches, advancing = [], []
        for g, pool in enumerate(alive):
            nxt = []
            for k in range(0, len(pool) - 1, 2):
                m = Match(group=g, first=int(pool[k]), second=int(pool[k + 1]), round=round_index)
                a, b = candidates[g][m.first], candidates[g][m.second]
                if a.screen is False and b.screen is not False:
                    m.winner, m.rule = m.second, "screen"
                elif b.screen is False and a.screen is not False:
                    m.winner, m.rule = m.first, "screen"
                else:
                    matches.append(m)
                nxt.append(m)
            if len(pool) % 2:
                nxt.append(int(pool[-1]))  # bye
            advancing.append(nxt)
        if matches:
            replies = judge(matches)
            if len(replies) != len(matches):
                raise RuntimeError(f"judge returned {len(replies)} replies for {len(matches)} matches")
            for m, reply in zip(matches, replies):
                m.reply = reply
                verdict = parse(reply)
                if verdict is None:
                    verdict, m.rule = fallback_winner(candidates[m.group][m.first], candidates[m.group][m.second], rng)
                else:
                    m.rule = "judge"
                m.winner = m.first if verdict == 0 else m.second
        for g, nxt in enumerate(advancing):
            played += [m for m in nxt if isinstance(m, Match)]
            alive[g] = [m.winner if isinstance(m, Match) else m for m in nxt]
        round_index += 1
    return [pool[0] for pool in alive], played
