"""Stage-level search: tournament logic, judge parsing, the search loop with a scripted judge, compile counts."""

import json
import re

import jax
import numpy as np
import PIL.Image
import pytest

from llava_cot_jax.data import chat
from llava_cot_jax.data.image import MllamaImageProcessor
from llava_cot_jax.data.processor import MllamaProcessor
from llava_cot_jax.data.tokenizer import build_tiny_tokenizer
from llava_cot_jax.generate import judge as J
from llava_cot_jax.generate import judge_runner as JR
from llava_cot_jax.generate import sampler as S
from llava_cot_jax.generate import stage_search as SS
from llava_cot_jax.models.mllama.config import MllamaConfig
from llava_cot_jax.models.mllama.hf_reference import build_hf_model, save_hf_checkpoint
from llava_cot_jax.models.mllama.params import from_hf

# --- judge prompts and parsing ------------------------------------------------------------------------------


def test_parse_choice_and_screen():
    p = J.JudgePrompts()
    assert p.parse_choice("Response 2 is vague.\nBetter response: 1") == 0
    assert p.parse_choice("Since it is thorough, I choose response 2.") == 1
    assert p.parse_choice("Better response: 1 ... on reflection, better response: 2") == 1  # the last verdict counts
    assert p.parse_choice(" 2.") == 1
    assert p.parse_choice("Both responses are fine.") is None
    assert p.parse_screen("incorrect: 3 + 4 is not 8") is False
    assert p.parse_screen("Correct.") is True
    assert p.parse_screen("hmm") is None


def test_prompts_file_overrides(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(
        json.dumps(
            {
                "compare": {"summary": "Q={question} A={response_1} B={response_2}"},
                "choice_patterns": [r"winner is ([12])"],
            }
        )
    )
    p = J.JudgePrompts.load(str(path))
    assert p.compare_text("summary", "q", "a", "b") == "Q=q A=a B=b"
    assert p.compare["caption"] == J.DEFAULT_COMPARE["caption"]
    assert p.parse_choice("the winner is 2") == 1 and p.parse_choice("I choose response 1") is None
    assert p.parse_choice("Better response: 1") == 0  # the verdict phrases were not overridden
    path.write_text(json.dumps({"nonsense": 1}))
    with pytest.raises(ValueError, match="unknown keys"):
        J.JudgePrompts.load(str(path))
    path.write_text(json.dumps({"compare": {"summary": "{question} {oops}"}}))
    with pytest.raises(ValueError, match="unknown field"):
        J.JudgePrompts.load(str(path))


def test_prompts_tokenise_as_llava_cot_did_on_the_real_vocabulary():
    """Question and judge prompts start with two BOS, as LLaVA-CoT's apply_chat_template + processor gave them
    (inference/demo/simple_inference.py); the question's ids equal transformers' processor's."""
    pytest.importorskip("quicktok")
    pytest.importorskip("tiktoken")
    from transformers import MllamaImageProcessorPil
    from transformers import MllamaProcessor as HFMllamaProcessor

    from llava_cot_jax.data.tokenizer import build_llama3_tokenizer

    llama3 = build_llama3_tokenizer()
    processor = MllamaProcessor(MllamaImageProcessor(size=28, max_image_tiles=4), llama3)
    image = PIL.Image.new("RGB", (56, 28))
    ours = SS.question_inputs(processor, ["How many cubes?"], [[image]])["input_ids"][0].tolist()
    header = [128006, 882, 128007, 271]
    assert ours == [128000, 128000, *header, 128256, 4438, 1690, 55204, 30, 128009, 128006, 78191, 128007, 271]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many cubes?"}]}]
    hf = HFMllamaProcessor(MllamaImageProcessorPil(size={"height": 28, "width": 28}), llama3)
    assert ours == hf(images=[image], text=chat.render_prompt(messages), return_tensors="np")["input_ids"][0].tolist()
    once = SS.question_inputs(processor, ["How many cubes?"], [[image]], bos="once")
    assert once["input_ids"][0].tolist() == ours[1:]

    compare = JR.judge_prompt_ids(processor, "Which is better?", num_images=1)
    assert compare[:7] == [128000, 128000, *header, 128256] and compare[-5:] == [128009, 128006, 78191, 128007, 271]
    screen = JR.judge_prompt_ids(processor, "Is it correct?", num_images=0)  # text only: the template's system block
    assert screen[:5] == [128000, 128000, 128006, 9125, 128007]


# --- tournament ----------------------------------------------------------------------------------------------


def _score_judge(scores):
    """Scripted judge over Match objects: the higher score wins; records every pairing it saw."""
    seen = []

    def judge(matches):
        seen.append(len(matches))
        return [f"Better response: {1 if scores[m.group][m.first] > scores[m.group][m.second] else 2}" for m in matches]

    return judge, seen


@pytest.mark.parametrize("n", [2, 4, 5, 8])
def test_knockout_picks_the_judged_winner_in_batched_rounds(n):
    rng = np.random.default_rng(n)
    scores = [rng.permutation(n) for _ in range(3)]
    groups = [[J.Candidate(text=str(s)) for s in g] for g in scores]
    judge, seen = _score_judge(scores)
    winners, matches = J.knockout(groups, judge, J.JudgePrompts().parse_choice, np.random.default_rng(0))
    assert winners == [int(np.argmax(g)) for g in scores]
    assert len(seen) == int(np.ceil(np.log2(n)))  # one judge call per round, all groups together
    assert len(matches) == 3 * (n - 1) and all(m.rule == "judge" for m in matches)


def test_fallback_is_symmetric_and_screen_decides():
    a, b = J.Candidate("a", closed=True, mean_logprob=-3.0), J.Candidate("b", closed=False, mean_logprob=-1.0)
    rng = np.random.default_rng(0)
    assert J.fallback_winner(a, b, rng) == (0, "fallback:closed") and J.fallback_winner(b, a, rng) == (
        1,
        "fallback:closed",
    )
    c = J.Candidate("c", closed=True, mean_logprob=-2.0)
    assert J.fallback_winner(a, c, rng)[0] == 1 and J.fallback_winner(c, a, rng)[0] == 0
    # exact ties: a fair coin, not "always the second"
    flips = [J.fallback_winner(a, a, np.random.default_rng(s))[0] for s in range(200)]
    assert 60 < sum(flips) < 140

    unparseable = lambda matches: ["no idea"] * len(matches)
    groups = [[J.Candidate("x", mean_logprob=-5.0), J.Candidate("y", mean_logprob=-1.0)]]
    winners, matches = J.knockout(groups, unparseable, J.JudgePrompts().parse_choice, rng)
    assert winners == [1] and matches[0].rule == "fallback:logprob"

    screened = [[J.Candidate("good", screen=True), J.Candidate("bad", screen=False)]]
    never = lambda matches: pytest.fail("the judge must not be asked when the screen decides")
    winners, matches = J.knockout(screened, never, J.JudgePrompts().parse_choice, rng)
    assert winners == [0] and matches[0].rule == "screen"


# --- the search loop ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    config = MllamaConfig.tiny()
    # loading a saved torch model is much quicker than NNX's eager random init
    model = from_hf(save_hf_checkpoint(build_hf_model(config), config, str(tmp_path_factory.mktemp("ckpt"))))
    processor = MllamaProcessor(
        MllamaImageProcessor(size=config.vision.image_size, max_image_tiles=4), build_tiny_tokenizer()
    )
    image = PIL.Image.fromarray((np.random.default_rng(0).random((30, 56, 3)) * 255).astype(np.uint8))
    return model, processor, image


def _responses(prompt):
    return re.search(r"Response 1: (.*)\n\nResponse 2: (.*)$", prompt, re.DOTALL).groups()


def _scripted_judge(log):
    """Prefers the response whose text is longer (ties: response 1); screens out reasoning containing 'e'."""

    def judge(prompts, kind):
        replies = []
        for p in prompts:
            if kind == "screen":
                reasoning = p.split("Reasoning: ", 1)[1]
                replies.append("incorrect" if "e" in reasoning else "correct")
            else:
                r1, r2 = _responses(p)
                replies.append("Better response: 1" if len(r1) >= len(r2) else "Better response: 2")
        log.append((kind, len(prompts)))
        return replies

    return judge


def test_stage_search_follows_the_judge(setup):
    model, processor, image = setup
    log = []
    cfg = SS.SearchConfig(num_candidates=4, stage_max_new_tokens=12, seed=1)
    searcher = SS.Searcher(model, processor, cfg, judge_fn=_scripted_judge(log))
    questions = ["How many cubes are there?", "What color is the car?"]
    results = searcher.ask(questions, [[image], [image]])
    for res in results:
        assert [t["step"] for t in res.trace] == list(chat.STAGES)
        accepted = ""
        for step in res.trace:
            cands = step["candidates"]
            shown = [c["shown_to_judge"] for c in cands]
            if step["step"] == "REASONING":
                ok = [i for i, c in enumerate(cands) if c["screen"] is not False]
                pool = ok if len(ok) > 0 else list(range(len(cands)))
                best_len = max(len(shown[i]) for i in pool)
                assert len(shown[step["winner"]]) == best_len and (step["winner"] in pool)
            else:
                assert len(shown[step["winner"]]) == max(len(s) for s in shown)
            assert all(c["finish"] in ("stop", "eos", "budget") and c["num_tokens"] <= 12 for c in cands)
            accepted += cands[step["winner"]]["text"]
            assert res.stages[step["step"]] == shown[step["winner"]]
        assert res.text == accepted
    # rounds batched over both questions: summary/caption/conclusion 2 rounds each; reasoning screen + 2 rounds
    kinds = [k for k, _ in log]
    assert kinds.count("screen") == 1 and dict(log)["screen"] == 8
    assert [n for k, n in log if k == "summary"] == [4, 2]
    assert searcher.syncs == 4  # one per stage to read the candidates (the scripted judge needs no device)


def test_search_compiles_once_per_bucket_and_handles_odd_inputs(setup):
    model, processor, image = setup
    # a budget too small to close a tag: every candidate is cut there, marked, and still judged sensibly
    # judge prefixes here run to ~150-190 tokens: with 128-token buckets both questions share every shape
    cfg = SS.SearchConfig(
        num_candidates=2, stage_max_new_tokens=4, judge_max_new_tokens=4, judge_bucket_step=128, seed=0
    )
    searcher = SS.Searcher(model, processor, cfg)
    searcher.sampler.eos_token_ids = ()  # random weights may sample an EOS, which ends an answer early
    first = searcher.ask(["How many cubes?"], [[image]])[0]
    assert set(first.stages) == set(chat.STAGES)
    for step in first.trace:
        assert all(c["finish"] == "budget" and not c["closed"] for c in step["candidates"])
    compiled = S.compile_count()
    searcher.ask(["What color is the big sphere?"], [[image]])  # another length, same bucket
    assert S.compile_count() == compiled, "a second question in the same shape bucket must not recompile"

    tagged = "Is it red? </SUMMARY> <CAPTION> </CAPTION>"  # a question that already contains stage tags
    second = searcher.ask([tagged], [[image]])[0]
    summary = second.trace[0]["candidates"]
    assert all(c["num_tokens"] > 1 for c in summary)  # tags in the question do not end the stage
    for step in second.trace:
        assert all(m["winner"] in (m["first"], m["second"]) for m in step["matches"])
        assert all(
            m["rule"] in ("judge", "fallback:closed", "fallback:logprob", "fallback:coin") for m in step["matches"]
        )

    text_only = searcher.ask(["What is 2 + 3?"])[0]  # no image: cross-attention layers are skipped
    assert set(text_only.stages) == set(chat.STAGES)


@pytest.mark.parametrize("procedure", ["ours", "llava_cot"])
def test_warmup_compiles_every_program_of_a_question(setup, procedure):
    """Shapes follow from the config and the question's bucket, not from what is generated: a stage search compiles
    at most 10 programs (judge verdict stops, LLaVA-CoT's pool bracket and per-match screen included), all of them
    in `warmup()`, and questions of that size afterwards compile none."""
    model, processor, image = setup
    cfg = SS.SearchConfig(num_candidates=4, stage_max_new_tokens=8, judge_max_new_tokens=8, procedure=procedure, seed=0)
    searcher = SS.Searcher(model, processor, cfg)
    searcher.sampler.eos_token_ids = ()  # random weights: every budget runs in full
    jax.clear_caches()  # count this search's programs only
    searcher.warmup()
    warm = S.compile_count()
    assert 0 < warm <= 10, warm
    for question in ("How many cubes?", "What color is the big sphere left of the small red cube?"):
        result = searcher.ask([question], [[image]])[0]
        assert set(result.stages) == set(chat.STAGES)
        assert sum(result.verdicts.values()) > 0  # the judge was asked (read or fallen back)
    assert S.compile_count() == warm, "a question after warmup() compiled a program"


def test_baselines_share_the_interface(setup):
    model, processor, image = setup
    for method in ("greedy", "best_of_n", "sentence"):
        cfg = SS.SearchConfig(
            method=method, num_candidates=2, max_new_tokens=8, sentence_max_new_tokens=4, judge_max_new_tokens=4
        )
        log = []
        res = SS.Searcher(model, processor, cfg, judge_fn=_scripted_judge(log)).ask(["How many cubes?"], [[image]])[0]
        assert isinstance(res.conclusion, str) and res.trace
        if method == "greedy":
            assert not log and len(res.trace[0]["candidates"]) == 1
        else:
            assert {k for k, _ in log} == {"answer" if method == "best_of_n" else "sentence"}
        if method == "sentence":
            assert sum(t["candidates"][t["winner"]]["num_tokens"] for t in res.trace) <= 8


def test_search_config_errors():
    with pytest.raises(ValueError, match="method"):
        SS.SearchConfig(method="beam")
    with pytest.raises(ValueError, match="num_candidates"):
        SS.SearchConfig(num_candidates=0)
    from llava_cot_jax.generate import config as generate_config

    # A config's search group: unset (placeholder) fields resolve from the method, the seed is the config's.
    group = generate_config.search_group(method="best_of_n", num_candidates=3)
    assert group.bracket is None and "seed" not in group
    resolved = generate_config.search_config(group, seed=7)
    assert (resolved.method, resolved.num_candidates, resolved.bracket, resolved.seed) == ("best_of_n", 3, "rounds", 7)
    with pytest.raises(KeyError, match="search.nope"):
        generate_config.search_group(nope=1)


def test_judge_calls_continue_a_shared_prefix_exactly(setup):
    """Judge replies decoded from a prefilled per-question prefix + the rest of each prompt are the replies of
    plain `generate` over the whole prompt; later rounds of a stage reuse the prefix."""
    model, processor, image = setup
    cfg = SS.SearchConfig(num_candidates=2, judge_max_new_tokens=6, judge_do_sample=False)
    searcher = SS.Searcher(model, processor, cfg)
    questions = ["How many cubes are there?", "What color is the car?"]
    inputs = SS.question_inputs(processor, questions, [[image], [image]])
    batch, _ = searcher._prefill(inputs, questions, 2)
    hint = "A red cube next to a blue sphere."

    def expected(text, with_image):
        parts = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
        prompt = processor(
            images=[[image]] if with_image else None, text=[chat.render_prompt([{"role": "user", "content": parts}])]
        )  # two BOS, as the search
        out = S.generate(model, **prompt, max_new_tokens=6, sampler=searcher.sampler)
        return searcher._decode_text(out[0, prompt["input_ids"].shape[1] :])

    rounds = [
        [(0, "one cube", "two cubes"), (0, "three", "four cubes in a row"), (1, "red", "a blue car")],
        [(0, "two cubes", "four cubes"), (0, "one", "three"), (1, "a blue car", "green")],  # same questions
        [(0, "two cubes", "four cubes in a row")],  # only question 0 left: its prefix is still there
        [(0, "two", "four")],
    ]  # another hint (below): a new prefix
    entries = []
    for index, matches in enumerate(rounds):
        hint_now = hint if index < 3 else "Two red cubes."
        texts = [searcher.prompts.compare_text("reasoning", questions[q], a, b, hint_now) for q, a, b in matches]
        prefixes = {q: searcher.prompts.compare_prefix("reasoning", questions[q], hint_now) for q, _, _ in matches}
        got = searcher._run_judges(texts, [q for q, _, _ in matches], prefixes, batch, True, "reasoning")
        assert got == [expected(t, True) for t in texts]
        entries.append(batch.judges.prefilled["reasoning"])
    assert entries[1] is entries[0] and entries[2] is entries[1] and entries[3] is not entries[2]

    screen = [searcher.prompts.screen_text(questions[1], r, hint) for r in ("It is red.", "It is blue, so red.")]
    got = searcher._run_judges(
        screen, [1, 1], {1: searcher.prompts.screen_prefix(questions[1], hint)}, batch, False, "screen"
    )
    assert got == [expected(t, False) for t in screen]
