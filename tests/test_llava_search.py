"""Search and evaluation on the llava family (LLaVA-1.5): the Searcher, the judge runner and the eval harness run a
tiny random-weight LLaVA through the same code as Mllama, with prompts in the Vicuna v1 template."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
from flax import nnx

from llava_cot_jax import checkpoint, config_file, families
from llava_cot_jax.data import chat, vicuna
from llava_cot_jax.eval import mcq
from llava_cot_jax.generate import judge_runner as JR
from llava_cot_jax.generate import sampler as S
from llava_cot_jax.generate import stage_search as SS
from llava_cot_jax.generate import stop as stop_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = ["How many cubes are there?", "What color is the car?"]
# Budgets small enough for CPU; the same across tests, so the programs compile once for the module.
SEARCH = dict(
    num_candidates=2,
    stage_max_new_tokens=6,
    max_new_tokens=12,
    sentence_max_new_tokens=4,
    judge_max_new_tokens=4,
    seed=3,
)


@pytest.fixture(scope="module")
def llava():
    family = families.get("llava")
    config = family.preset(family.tiny_preset)
    return family.model_class(config, rngs=nnx.Rngs(0)), family.built_in_processor(config)


def _image(seed: int = 0) -> PIL.Image.Image:
    return PIL.Image.fromarray((np.random.default_rng(seed).random((30, 40, 3)) * 255).astype(np.uint8))


def _searcher(model, processor, **settings) -> SS.Searcher:
    searcher = SS.Searcher(model, processor, SS.SearchConfig(**{**SEARCH, **settings}))
    searcher.sampler.eos_token_ids = ()  # random weights: an early EOS would end an answer after any token
    return searcher


def _record_prefills(searcher: SS.Searcher) -> list[dict]:
    """Records every prefill the searcher's sampler runs (its rows, whether it read images, its ids), then runs it."""
    calls, prefill = [], searcher.sampler.prefill

    def recording(input_ids, attention_mask, cross_kv=None, cross_attention_mask=None, *, cache_len, rows=None):
        calls.append({"ids": np.asarray(input_ids), "rows": rows, "images": cross_kv is not None})
        return prefill(input_ids, attention_mask, cross_kv, cross_attention_mask, cache_len=cache_len, rows=rows)

    searcher.sampler.prefill = recording
    return calls


def test_prompts_are_vicuna_v1_with_the_image_widened(llava):
    _, processor = llava
    image_id, width = processor.image_token_id, processor.image_tokens
    assert processor.render_prompt(chat.user_turn("How many?", 1)) == "USER: <image>\nHow many? ASSISTANT:"
    inputs = SS.question_inputs(processor, ["How many?"], [[_image()]])
    ids = inputs["input_ids"][0].tolist()
    assert ids[0] == processor.tokenizer.bos_token_id and ids.count(image_id) == width
    assert ids == processor.encode_prompt("USER: <image>\nHow many? ASSISTANT:")
    assert SS.question_inputs(processor, ["How many?"], [[_image()]], bos="none")["input_ids"][0].tolist() == ids[1:]
    # Judge prompts: the same template, with or without the image; the prefix ids start the full prompt's.
    judge = JR.judge_prompt_ids(processor, "Which response is better? 1 or 2", num_images=1)
    assert judge.count(image_id) == width and processor.decode(judge).endswith("1 or 2 ASSISTANT:")
    head = JR.judge_prompt_ids(processor, "Which response is better? 1 or 2", 1, upto="Which response")
    assert judge[: len(head) - 1] == head[:-1]
    assert image_id not in JR.judge_prompt_ids(processor, "Is it correct?", num_images=0)


def test_stage_tags_are_plain_text_that_stop_strings_catch(llava):
    """The tags are no special tokens of the Llama-2 vocabulary: a stop string finds them in the decoded bytes."""
    model, processor = llava
    sampler = S.Sampler(model, tokenizer=processor.tokenizer)
    close = chat.close_tag("SUMMARY")
    ids = processor.tokenizer("a cube.</SUMMARY> then", add_special_tokens=False)["input_ids"]
    assert len(processor.tokenizer(close, add_special_tokens=False)["input_ids"]) > 1
    table = sampler.stop_table((close, "."))
    window, filled = stop_lib.init_window(1, table)
    hits = []
    for token in ids:
        window, filled, hit = stop_lib.step(table, window, filled, np.asarray([token]))
        hits.append(np.asarray(hit)[0, :2].tolist())
    text = lambda n: processor.tokenizer.decode(ids[:n])
    first_period = next(n for n in range(1, len(ids) + 1) if "." in text(n))
    first_close = next(n for n in range(1, len(ids) + 1) if close in text(n))
    assert [h[1] for h in hits].index(True) == first_period - 1
    assert [h[0] for h in hits].index(True) == first_close - 1 and sum(h[0] for h in hits) == 1


def test_stop_strings_read_sentencepiece_spaces():
    """Llama-2's own vocabulary is SentencePiece: a `▁word` piece decoded alone loses its space, so the stop table
    reads `▁` as a space (and `<0xNN>` as its byte) and a verdict phrase with spaces still stops a judge reply."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spm = Tokenizer(models.BPE(unk_token="<unk>"))
    spm.pre_tokenizer, spm.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    words = "the cube is red better response one two a summary caption reasoning conclusion : 1 2 . < / >".split()
    corpus = [" ".join(np.random.default_rng(i).choice(words, 12)) for i in range(200)]
    spm.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    spm.add_tokens(["<0x0A>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=spm, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    text = "the cube is red. better response: 1"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert "\u2581response" in tokenizer.convert_ids_to_tokens(ids) and tokenizer.decode(ids[-3:-2]) == "response"
    table_bytes = stop_lib.token_bytes(tokenizer)
    assert b"".join(table_bytes[i] for i in ids) == b" " + text.encode()
    assert table_bytes[tokenizer.convert_tokens_to_ids("<0x0A>")] == b"\n"
    table = stop_lib.build_stop_table(table_bytes, ("better response: 1",))
    window, filled = stop_lib.init_window(1, table)
    fired = []
    for token in ids:
        window, filled, hit = stop_lib.step(table, window, filled, np.asarray([token]))
        fired.append(bool(np.asarray(hit)[0, 0]))
    assert fired == [False] * (len(ids) - 1) + [True]


def test_greedy_search_equals_generate(llava):
    model, processor = llava
    searcher = _searcher(model, processor, method="greedy")
    result = searcher.ask(QUESTIONS[:1], [[_image()]])[0]
    inputs = SS.question_inputs(processor, QUESTIONS[:1], [[_image()]])
    sequences = S.generate(model, **inputs, max_new_tokens=SEARCH["max_new_tokens"], eos_token_id=None)
    new = sequences[0, inputs["input_ids"].shape[1] :]
    (candidate,) = result.trace[0]["candidates"]
    assert candidate["num_tokens"] == len(new) == SEARCH["max_new_tokens"]
    assert result.text == JR.decode_text(processor.tokenizer, new) != ""


@pytest.mark.parametrize("method", ["best_of_n", "sentence", "stage"])
def test_searches_run_end_to_end_sharing_one_prefill(llava, method):
    model, processor = llava
    searcher = _searcher(model, processor, method=method)
    prefills = _record_prefills(searcher)
    results = searcher.ask(QUESTIONS, [[_image(1)], [_image(2)]])
    n = SEARCH["num_candidates"]

    # The candidates of a question continue one prefill of its prompt (rows copied from it, nothing re-run).
    (question,) = [c for c in prefills if c["rows"] is not None]
    assert question["ids"].shape[0] == len(QUESTIONS) and question["images"]
    np.testing.assert_array_equal(question["rows"], np.repeat(np.arange(len(QUESTIONS)), n))
    # Judge prefixes: one row per question, prefilled once per kind; comparisons show the image, in its tokens.
    judges = [c for c in prefills if c["rows"] is None]
    assert judges and all(c["ids"].shape[0] == len(QUESTIONS) for c in judges)
    shown = [c for c in judges if c["images"]]
    assert shown and all((c["ids"] == processor.image_token_id).sum(1).tolist() == [4, 4] for c in shown)

    for result in results:
        assert all(len(step["candidates"]) == n for step in result.trace)
        assert all(step["matches"] for step in result.trace)  # the model judged its own candidates
        if method == "stage":
            assert [step["step"] for step in result.trace] == list(chat.STAGES)
            assert set(result.stages) == set(chat.STAGES) and result.conclusion == result.stages["CONCLUSION"]
            assert result.text == "".join(step["candidates"][step["winner"]]["text"] for step in result.trace)
        else:
            assert {step["step"] for step in result.trace} == {"answer" if method == "best_of_n" else "sentence"}
            assert result.text.strip() and result.conclusion == chat.extract_conclusion(result.text)
    again = _searcher(model, processor, method=method).ask(QUESTIONS, [[_image(1)], [_image(2)]])
    assert [r.as_dict() for r in again] == [r.as_dict() for r in results]  # fixed seeds: the same search


MESH_SCRIPT = textwrap.dedent("""
    import json, os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, numpy as np, PIL.Image
    from flax import nnx
    from llava_cot_jax import families, sharding
    from llava_cot_jax.generate import stage_search as SS

    family = families.get("llava")
    config = family.preset(family.tiny_preset)
    model, processor = family.model_class(config, rngs=nnx.Rngs(0)), family.built_in_processor(config)
    images = [[PIL.Image.fromarray((np.random.default_rng(s).random((30, 40, 3)) * 255).astype(np.uint8))]
              for s in (1, 2)]
    # Tensor parallel: the kv heads split over 2 devices, the rows of every program replicated.
    mesh = sharding.make_mesh(data=1, fsdp=1, tensor=2, devices=jax.devices()[:2])
    searcher = SS.Searcher(model, processor, SS.SearchConfig(**{search}), mesh=mesh)
    searcher.sampler.eos_token_ids = ()
    print(json.dumps([r.as_dict() for r in searcher.ask({questions}, images)]))
""")


def _rounded(tree):
    """Tensor-parallel sums round differently: log-probabilities agree to ~1e-6, not bit for bit."""
    if isinstance(tree, dict):
        return {k: _rounded(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_rounded(v) for v in tree]
    return float(f"{tree:.5g}") if isinstance(tree, float) else tree


def test_stage_search_on_a_mesh_equals_one_device(llava):
    """The mesh runs in a subprocess (the device count is fixed when XLA starts); one device here."""
    search = dict(SEARCH, method="stage")
    script = MESH_SCRIPT.format(search=repr(search), questions=repr(QUESTIONS))
    env = dict(os.environ, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-5000:]
    on_mesh = json.loads(out.stdout.strip().splitlines()[-1])
    one = _searcher(*llava, **search).ask(QUESTIONS, [[_image(1)], [_image(2)]])
    assert _rounded(on_mesh) == _rounded([r.as_dict() for r in one])
    assert {step["step"] for r in on_mesh for step in r["trace"]} == set(chat.STAGES)


def test_eval_harness_asks_llava_with_its_mcq_line(llava, tmp_path, monkeypatch):
    from test_eval_mcq import MCQ_COLUMNS, MCQ_ROWS, read_tsv_rows, write_tsv

    from llava_cot_jax.eval import run as eval_run

    model, processor = llava
    ckpt = checkpoint.save_model(str(tmp_path / "ckpt"), model)
    processor.save_pretrained(ckpt)
    tsv = write_tsv(tmp_path / "bench.tsv", MCQ_COLUMNS, MCQ_ROWS[:3])
    asked, ask = [], SS.Searcher.ask

    def recording_ask(self, questions, images=None):
        asked.extend(questions)
        return ask(self, questions, images)

    monkeypatch.setattr(SS.Searcher, "ask", recording_ask)
    config = config_file.load(os.path.join(REPO, "configs", "eval_mcq.py"), "runlocal")
    config.model.weights, config.model.family, config.tsv = ckpt, "llava", tsv
    config.batch_size, config.compilation_cache, config.search.max_new_tokens = 2, "", 6
    workdir = tmp_path / "run"
    assert eval_run.run(config, str(workdir)) == 0

    items, _ = mcq.parse_rows(mcq.read_tsv(tsv), "mcq", vicuna.MCQ_ANSWER)
    assert asked[:3] == [item.prompt for item in items] and len(asked) == 4  # the last batch padded with a copy
    assert all(
        prompt.endswith("\nAnswer with the option's letter from the given choices directly.") for prompt in asked
    )
    assert mcq.parse_rows(mcq.read_tsv(tsv), "mcq")[0][0].prompt.endswith("from the options above. \n")  # Mllama's
    assert json.loads((workdir / "eval_run.json").read_text())["mcq_instruction"] == vicuna.MCQ_ANSWER
    predictions = read_tsv_rows(workdir / "predictions.tsv")
    assert [p["index"] for p in predictions] == ["1", "2", "3"]
    assert all(p["prediction"] == chat.extract_conclusion(p["raw_output"]) for p in predictions)
    assert json.loads((workdir / "accuracy.json").read_text())["num_evaluated"] == 3
