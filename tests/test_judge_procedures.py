"""Judge verdicts through the real decode loop (a scripted model), fallback rules, brackets and reasoning screens:
ours and LLaVA-CoT's, and why ours is the default."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from scripted_model import ScriptedModel

from llava_cot_jax.data import chat
from llava_cot_jax.data.image import MllamaImageProcessor
from llava_cot_jax.data.processor import MllamaProcessor
from llava_cot_jax.generate import judge as J
from llava_cot_jax.generate import stage_search as SS

EXAMPLE_PROMPTS = Path(__file__).resolve().parents[1] / "configs" / "judge_prompts_example.json"

ANSWER = (
    "<SUMMARY> I will count the cubes. </SUMMARY>\n\n<CAPTION> Three red cubes and a blue sphere. </CAPTION>\n\n"
    "<REASONING> There are three cubes, so the answer is 3. </REASONING>\n\n<CONCLUSION> 3 </CONCLUSION>"
)
# What a LLaVA-CoT model does with a judge prompt: answers it in its four stages, and only then gives the verdict.
PREAMBLE = (
    "<SUMMARY> I will compare the two responses and decide which one is better. </SUMMARY>\n\n<CAPTION> "
    + "The image shows several geometric shapes on a gray floor: a large red cube, a small blue sphere, a green "
    "cylinder and two yellow cubes. The light comes from the left and casts soft shadows. "
    * 3
    + "</CAPTION>\n\n<REASONING> First, I read each response. Both describe the objects, but the second one is "
    "more complete and states nothing the image does not show, so it is the better one. </REASONING>\n\n"
    "<CONCLUSION> "
)
AFTER_VERDICT = " </CONCLUSION> And some more words that a reply stopped at its verdict never writes."


@pytest.fixture(scope="module")
def scripted(tiny_tokenizer):
    """A scripted model answering questions with ANSWER; replies to judge and screen prompts are set per test."""
    model = ScriptedModel(tiny_tokenizer, lambda prompt: ANSWER)
    processor = MllamaProcessor(MllamaImageProcessor(size=28, max_image_tiles=4), tiny_tokenizer)
    return model, processor


def _script(compare_reply, screen_reply="correct", screen_marker="Reasoning: "):
    """The model's reply to a rendered prompt: the judge's when it is a comparison or a screen, else ANSWER."""

    def reply_for(prompt):
        if "Response 1:" in prompt or "First " in prompt:
            return compare_reply
        if screen_marker in prompt:
            return screen_reply
        return ANSWER

    return reply_for


def test_judge_reply_is_read_after_a_long_preamble_and_stops_at_the_verdict(scripted, tiny_tokenizer):
    model, processor = scripted
    model.set_script(_script(PREAMBLE + "Better response: 2" + AFTER_VERDICT))
    assert len(tiny_tokenizer(PREAMBLE)["input_ids"]) > 128  # more than the judge budget before this change

    searcher = SS.Searcher(model, processor, SS.SearchConfig(num_candidates=2, seed=3))
    result = searcher.ask(["How many cubes are there?"])[0]
    assert result.stages["CONCLUSION"] == "3" and [s["step"] for s in result.trace] == list(chat.STAGES)
    for step in result.trace:
        (match,) = step["matches"]
        assert match["rule"] == "judge" and match["winner"] == match["second"]
        assert match["reply"].startswith(PREAMBLE.strip()) and match["reply"].endswith("Better response: 2")
        assert step["verdicts"] == {"read": 1, "fallback": 0}
    assert result.verdicts == {"read": 4, "fallback": 0}

    # The old 128-token budget ends every reply inside the preamble: each decision falls back, and the trace says so.
    short = SS.Searcher(model, processor, SS.SearchConfig(num_candidates=2, seed=3, judge_max_new_tokens=128))
    result = short.ask(["How many cubes are there?"])[0]
    assert result.verdicts == {"read": 0, "fallback": 4}
    assert all(
        m["rule"].startswith("fallback:") and "Better response" not in m["reply"]
        for step in result.trace
        for m in step["matches"]
    )


def test_example_prompts_file_with_its_own_verdict_phrase_and_field_order(scripted):
    """configs/judge_prompts_example.json puts the responses before the question and reads "Verdict: N"; a search
    with it reads every verdict (no fallback) and stops each reply there."""
    model, processor = scripted
    prompts = J.JudgePrompts.load(str(EXAMPLE_PROMPTS))
    template = prompts.compare["summary"]
    assert template.index("{response_1}") < template.index("{question}")  # fields in another order
    model.set_script(_script(PREAMBLE + "Verdict: 1" + AFTER_VERDICT, screen_marker="Solution:"))
    config = SS.SearchConfig(num_candidates=2, seed=0, prompts_file=str(EXAMPLE_PROMPTS))
    result = SS.Searcher(model, processor, config).ask(["How many cubes are there?"])[0]
    assert result.verdicts == {"read": 4, "fallback": 0}
    for step in result.trace:
        (match,) = step["matches"]
        assert match["winner"] == match["first"] and match["reply"].endswith("Verdict: 1")
    screened = result.trace[2]["candidates"]
    assert all(c["screen"] is True and c["screen_reply"] == "correct" for c in screened)


def test_llava_cot_procedure_end_to_end(scripted):
    """procedure="llava_cot": pool bracket, per-match screen, unreadable replies go to the second candidate."""
    model, processor = scripted
    model.set_script(_script("I cannot decide.", screen_reply="All steps are right."))
    config = SS.SearchConfig(num_candidates=3, seed=1, procedure="llava_cot")
    assert (config.bracket, config.screen, config.fallback, config.sentence_end) == (
        "pool",
        "per_match",
        "second",
        "text_end",
    )
    result = SS.Searcher(model, processor, config).ask(["How many cubes are there?"])[0]
    assert result.verdicts == {"read": 0, "fallback": 8}
    for step in result.trace:
        assert len(step["matches"]) == 2 and all(m["rule"] == "fallback:second" for m in step["matches"])
        assert all(m["winner"] == m["second"] for m in step["matches"])
        screens = [len(m["screens"]) for m in step["matches"]]
        assert screens == ([2, 2] if step["step"] == "REASONING" else [0, 0])  # both sides, in every match
    # one of the three sat out the first match and met its winner: the winner was screened again
    first, second = result.trace[2]["matches"]
    assert first["winner"] in (second["first"], second["second"])


def test_sentence_candidates_end_where_each_procedure_says(scripted):
    """Sentence beam: ours ends a candidate at any token holding a period (".\n" included); LLaVA-CoT's only where
    the text ends with one."""
    model, processor = scripted
    answer = "<SUMMARY> Count them.\n\nThen answer. </SUMMARY> <CONCLUSION> 3 </CONCLUSION>"
    model.set_script(lambda prompt: "Better response: 1" if "Response 1:" in prompt else answer)
    steps = {}
    for sentence_end in SS.SENTENCE_ENDS:
        config = SS.SearchConfig(method="sentence", num_candidates=2, sentence_end=sentence_end)
        result = SS.Searcher(model, processor, config).ask(["How many cubes are there?"])[0]
        assert result.text == answer and result.conclusion == "3"
        steps[sentence_end] = [step["candidates"][step["winner"]]["text"] for step in result.trace]
    assert steps["period"] == ["<SUMMARY> Count them.\n", "\nThen answer.", " </SUMMARY> <CONCLUSION> 3 </CONCLUSION>"]
    assert steps["text_end"] == ["<SUMMARY> Count them.\n\nThen answer.", " </SUMMARY> <CONCLUSION> 3 </CONCLUSION>"]


# --- fallback rules --------------------------------------------------------------------------------------------


def test_fallback_rules_do_what_they_say():
    rng = np.random.default_rng(0)
    closed, cut = J.Candidate("a", closed=True, mean_logprob=-3.0), J.Candidate("b", closed=False, mean_logprob=-1.0)
    for a, b in ((closed, cut), (cut, closed)):
        assert J.fallback_winner(a, b, rng, "second") == (1, "fallback:second")  # whatever the candidates
    assert J.fallback_winner(closed, cut, rng, "symmetric") == (0, "fallback:closed")
    with pytest.raises(ValueError, match="fallback rule"):
        J.fallback_winner(closed, cut, rng, "first")

    unreadable = lambda matches: ["no idea"] * len(matches)
    groups = [[J.Candidate("x", mean_logprob=-1.0), J.Candidate("y", mean_logprob=-5.0)] for _ in range(20)]
    winners, matches = J.knockout(groups, unreadable, J.JudgePrompts().parse_choice, rng, fallback="second")
    assert all(m.rule == "fallback:second" and m.winner == m.second for m in matches)
    assert sorted(set(winners)) == [0, 1]  # the shuffled bracket shows either one second
    winners, _ = J.knockout(groups, unreadable, J.JudgePrompts().parse_choice, rng, fallback="symmetric")
    assert winners == [0] * 20  # the higher mean log-probability, whichever was shown second


def test_llava_cot_verdict_rule_as_a_prompts_file(tmp_path):
    """Their reading: "I choose response 1" picks the first, anything else the second. Their phrase as the verdict
    phrases (so a reply also stops there), no patterns, and fallback "second" reproduce it, except for a reply
    that is just the digit."""
    path = tmp_path / "theirs.json"
    path.write_text(json.dumps({"verdict_phrases": ["I choose response 1", "I choose response 2"]}))
    prompts = J.JudgePrompts.load(str(path))
    replies = [
        "Since it is clearer, I choose response 1.",
        "Since ..., I choose response 2.",
        "I choose Response 1",
        "Response 1 is better.",
        "1",
    ]
    theirs = [0 if "I choose response 1" in reply else 1 for reply in replies]
    ours = [1 if prompts.parse_choice(reply) is None else prompts.parse_choice(reply) for reply in replies]  # "second"
    assert ours[:4] == theirs[:4]
    assert ours[4] == 0 != theirs[4]  # the one difference: a reply that is just "1" reads as response 1 here
    with pytest.raises(ValueError, match="neither may contain the other"):
        path.write_text(json.dumps({"verdict_phrases": ["Pick 1", "Pick 1!"]}))
        J.JudgePrompts.load(str(path))


# --- brackets ----------------------------------------------------------------------------------------------------


def _depths(bracket):
    """How many matches each candidate would have to win to take the bracket."""
    depth = {}

    def walk(entry, d):
        if entry >= 0:
            depth[entry] = d
        else:
            for child in bracket[-entry - 1]:
                walk(child, d + 1)

    walk(-len(bracket), 0)
    return depth


def _perfect_judge(scores, calls=None):
    """Picks the higher score; appends each call's number of matches to `calls`."""

    def judge(matches):
        if calls is not None:
            calls.append(len(matches))
        return [f"Better response: {1 if scores[m.group][m.first] > scores[m.group][m.second] else 2}" for m in matches]

    return judge


def _noisy_judge(p, rng):
    """Picks the candidate with the higher index with probability p."""
    return lambda ms: [f"Better response: {1 if (m.first > m.second) == (rng.random() < p) else 2}" for m in ms]


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8, 10])
def test_brackets_do_what_their_docstrings_say(n):
    rng = np.random.default_rng(n)
    for bracket in (J.bracket_rounds(n, rng), J.bracket_pool(n, rng)):
        assert len(bracket) == n - 1 and sorted(_depths(bracket)) == list(range(n))  # each candidate enters once
        played_on = sorted(-e for pair in bracket for e in pair if e < 0)
        assert played_on == list(range(1, n - 1))  # every winner but the last one's plays on, once
    rounds = [J.bracket_rounds(n, np.random.default_rng(s)) for s in range(200)]
    assert all(max(_depths(b).values()) == int(np.ceil(np.log2(n))) for b in rounds)  # balanced
    pool = [J.bracket_pool(n, np.random.default_rng(s)) for s in range(2000)]
    if n == 4:  # the winner of the first match goes back and meets one of the two others with probability 2/3
        uneven = np.mean([max(_depths(b).values()) == 3 for b in pool])
        assert 0.62 < uneven < 0.71
    if n >= 4:
        assert max(max(_depths(b).values()) for b in pool) > int(np.ceil(np.log2(n)))  # a winner may play on and on

    scores = [np.random.default_rng(s).permutation(n) for s in range(4)]
    groups = [[J.Candidate(str(x)) for x in g] for g in scores]
    calls = {}
    for name in J.BRACKETS:
        seen = []
        winners, matches = J.knockout(
            groups, _perfect_judge(scores, seen), J.JudgePrompts().parse_choice, np.random.default_rng(0), bracket=name
        )
        assert winners == [int(np.argmax(g)) for g in scores]  # a perfect judge: the same winner either way
        assert len(matches) == 4 * (n - 1) and sum(seen) == len(matches)
        calls[name] = len(seen)
    assert calls["rounds"] == int(np.ceil(np.log2(n))) <= calls["pool"]  # rounds: every round one batched call


def test_balanced_bracket_gives_the_best_candidate_the_best_chance():
    """Why "rounds" is the default. With a judge that picks the better of two with probability p, the best
    candidate wins the tournament with probability E[p ** matches it must win]. For p > 1/2 a balanced bracket
    maximises that over every bracket shape (p ** d is convex and decreasing in d, and the depths satisfy
    sum 2 ** -d = 1), so it beats the pool's random shapes on average; at p = 1/2 every shape gives 1/n."""
    chance = lambda shapes, p: np.mean([np.mean([p**d for d in depth.values()]) for depth in shapes])
    shapes = {}
    for n in (4, 8, 10):
        shapes[n] = {
            "rounds": [_depths(J.bracket_rounds(n, np.random.default_rng(s))) for s in range(300)],
            "pool": [_depths(J.bracket_pool(n, np.random.default_rng(s))) for s in range(3000)],
        }
        for p in (0.6, 0.75, 0.9):
            assert chance(shapes[n]["rounds"], p) > chance(shapes[n]["pool"], p) + 0.005, (n, p)
        for name in J.BRACKETS:
            assert chance(shapes[n][name], 0.5) == pytest.approx(1 / n)

    # the same seen through the tournament itself (n = 8), with a judge that is right 3 times in 4
    trials = 3000
    for name in J.BRACKETS:
        rng = np.random.default_rng(1)
        groups = [[J.Candidate(str(i)) for i in range(8)] for _ in range(trials)]  # candidate 7 is the best
        winners, _ = J.knockout(groups, _noisy_judge(0.75, rng), J.JudgePrompts().parse_choice, rng, bracket=name)
        expected = chance(shapes[8][name], 0.75)  # 0.42 for rounds, about 0.39 for the pool
        assert np.mean(np.asarray(winners) == 7) == pytest.approx(expected, abs=4 * np.sqrt(0.25 / trials))


# --- reasoning screens ---------------------------------------------------------------------------------------


def _screen_log(failing):
    """A scripted per-match screen: candidates in `failing` are judged incorrect; records every request."""
    asked = []

    def screen(pairs):
        asked.extend(pairs)
        return [("incorrect" if j in failing else "correct", j not in failing) for _, j in pairs]

    return screen, asked


def test_per_match_screen_does_what_its_docstring_says():
    rng = np.random.default_rng(0)
    never = lambda matches: pytest.fail("the judge must not be asked when a screen decides")
    # the first shown fails: the second wins without being screened
    screen, asked = _screen_log(failing={0})
    groups = [[J.Candidate("a"), J.Candidate("b")]]
    for seed in range(6):
        asked.clear()
        winners, (m,) = J.knockout(
            groups, never, J.JudgePrompts().parse_choice, np.random.default_rng(seed), screen=screen
        )
        assert winners == [1] and m.rule == "screen"
        assert asked == ([(0, 0)] if m.first == 0 else [(0, 1), (0, 0)])  # second screened only when first passed
    # nobody fails: both sides screened in every match, and a winner again in each later match
    screen, asked = _screen_log(failing=set())
    scores = [[0, 1, 2, 3]]
    J.knockout(
        [[J.Candidate(str(i)) for i in range(4)]],
        _perfect_judge(scores),
        J.JudgePrompts().parse_choice,
        rng,
        bracket="pool",
        screen=screen,
    )
    assert len(asked) == 2 * 3 and max(asked.count(c) for c in set(asked)) >= 2


def test_screening_once_is_equivalent_or_better():
    """Ours screens every candidate once (N screens) and lets a screen decide only a match with exactly one failed
    candidate: there it agrees with theirs. Where both failed, theirs gives the match to whichever was shown second;
    ours asks the judge."""
    prefer_higher = _perfect_judge([[0, 1]])
    for failing, judged_winner in (({0}, 1), ({1}, 0), ({0, 1}, 1), (set(), 1)):
        for seed in range(4):
            ours_groups = [[J.Candidate("a", screen=0 not in failing), J.Candidate("b", screen=1 not in failing)]]
            ours, (m_ours,) = J.knockout(
                ours_groups, prefer_higher, J.JudgePrompts().parse_choice, np.random.default_rng(seed)
            )
            screen, asked = _screen_log(failing)
            theirs, (m_theirs,) = J.knockout(
                [[J.Candidate("a"), J.Candidate("b")]],
                prefer_higher,
                J.JudgePrompts().parse_choice,
                np.random.default_rng(seed),
                screen=screen,
            )
            assert ours == [judged_winner]
            if len(failing) == 1:
                assert theirs == ours and m_theirs.rule == m_ours.rule == "screen"
            elif failing:  # both failed: theirs is decided by the order shown, ours by the judge
                assert theirs == [m_theirs.second] and m_ours.rule == "judge"
    # screens asked for: N once, against up to 2 (N - 1) per match
    screen, asked = _screen_log(failing=set())
    J.knockout(
        [[J.Candidate(str(i)) for i in range(8)]],
        _perfect_judge([list(range(8))]),
        J.JudgePrompts().parse_choice,
        np.random.default_rng(0),
        screen=screen,
    )
    assert len(asked) == 2 * 7 > 8


def test_search_config_resolves_defaults_with_their_sources():
    assert SS.SearchConfig().num_candidates == 2  # the paper's tables (their issue #38) and their demo
    assert SS.SearchConfig(method="best_of_n").num_candidates == 10  # their evaluation script
    assert SS.SearchConfig(method="sentence").num_candidates == 5  # their evaluation script
    assert SS.SearchConfig(num_candidates=4).num_candidates == 4
    ours = SS.SearchConfig()
    assert (ours.bracket, ours.screen, ours.fallback, ours.sentence_end) == ("rounds", "once", "symmetric", "period")
    assert (ours.judge_max_new_tokens, ours.temperature, ours.top_p, ours.bos) == (2048, 0.6, 0.9, "transformers")
    mixed = SS.SearchConfig(procedure="llava_cot", bracket="rounds")  # one setting overridden
    assert (mixed.bracket, mixed.screen) == ("rounds", "per_match")
    for bad in ({"procedure": "theirs"}, {"bracket": "swiss"}, {"fallback": "first"}, {"bos": "twice"}):
        with pytest.raises(ValueError, match=re.escape(next(iter(bad)))):
            SS.SearchConfig(**bad)
