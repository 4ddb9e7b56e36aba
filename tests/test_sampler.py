"""Sampler: greedy parity with transformers' generate, sampling distribution, stop strings, EOS."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch

from llava_cot_jax.data.tokenizer import build_tiny_tokenizer
from llava_cot_jax.generate import generate
from llava_cot_jax.generate import sampler as S
from llava_cot_jax.generate import stop as stop_lib
from llava_cot_jax.models.mllama.config import MllamaConfig
from llava_cot_jax.models.mllama.hf_reference import build_hf_model, random_inputs, save_hf_checkpoint
from llava_cot_jax.models.mllama.params import from_hf


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.set_num_threads(1)
    config = MllamaConfig.tiny()
    hf = build_hf_model(config, seed=0)
    hf.generation_config.pad_token_id = config.text.pad_token_id
    path = save_hf_checkpoint(hf, config, str(tmp_path_factory.mktemp("ckpt")))
    return config, hf, from_hf(path)


def _left_pad(inputs):
    """random_inputs pads on the right; generation wants left padding (transformers warns otherwise)."""
    mask = inputs["attention_mask"].copy()
    for key in ("input_ids", "attention_mask", "cross_attention_mask"):
        if key in inputs:
            rows = [np.roll(row, int(len(m) - m.sum()), axis=0) for row, m in zip(inputs[key], mask)]
            inputs[key] = np.stack(rows)
    return inputs


def _hf_generate(hf, inputs, **kwargs):
    with torch.no_grad():
        return hf.generate(**{k: torch.as_tensor(v) for k, v in inputs.items()}, **kwargs).numpy()


def test_greedy_matches_transformers_with_images(models):
    config, hf, model = models
    rng = np.random.default_rng(1)
    # batch of 2 with different lengths; row 0 two images (2 and 4 tiles), row 1 one image of 3 tiles
    inputs = _left_pad(random_inputs(config, rng, 2, 24, [2, 1], [[2, 4], [3]], pad_right=[0, 5]))
    hf.generation_config.eos_token_id = None
    ref = _hf_generate(hf, inputs, max_new_tokens=64, do_sample=False)
    ours = S.generate(model, **inputs, max_new_tokens=64, eos_token_id=None)
    assert ours.shape == ref.shape == (2, 24 + 64)
    np.testing.assert_array_equal(ours, ref)


def test_greedy_matches_transformers_text_only_and_eos(models):
    config, hf, model = models
    rng = np.random.default_rng(2)
    ids = rng.integers(0, config.text.vocab_size - 256, (2, 19))
    mask = np.ones_like(ids)
    mask[1, :6] = 0  # left padding
    ids[1, :6] = config.text.pad_token_id
    inputs = dict(input_ids=ids, attention_mask=mask)
    hf.generation_config.eos_token_id = None
    ref = _hf_generate(hf, inputs, max_new_tokens=64, do_sample=False)
    ours = generate(model, **inputs, max_new_tokens=64, eos_token_id=None)  # the package's HF-shaped entry point
    np.testing.assert_array_equal(ours, ref)

    # EOS: declare a token row 0 produces (first at step i >= 5) the EOS id. Row 0 stops there and is padded;
    # the output ends when row 1 does (its own first occurrence of that id, or the budget), as in transformers.
    new = ref[0, 19:]
    i = next(i for i in range(5, 64) if new[i] not in new[:i])
    eos = int(new[i])
    ref_eos = _hf_generate(hf, inputs, max_new_tokens=64, do_sample=False, eos_token_id=eos)
    ours_eos = S.generate(model, **inputs, max_new_tokens=64, eos_token_id=eos)
    np.testing.assert_array_equal(ours_eos, ref_eos)
    assert ours_eos[0, 19 + i] == eos and (ours_eos[0, 19 + i + 1 :] == config.text.pad_token_id).all()


def test_sampling_matches_next_token_distribution(models):
    """Chi-square goodness of fit of 4000 temperature-1 samples to softmax(logits), at false-alarm rate 1e-3.

    The same test must reject samples drawn at temperature 0.4 (power check), so it can fail."""
    config, _, model = models
    prompt = np.asarray([[config.text.bos_token_id, 17, 250, 9, 31]])
    probs = np.asarray(jax.nn.softmax(model(prompt).logits[0, -1]))
    n = 4000
    batch = np.repeat(prompt, n, axis=0)

    def p_value(temperature, seed):
        out = S.generate(
            model,
            batch,
            max_new_tokens=1,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            eos_token_id=None,
            seed=seed,
        )
        counts = np.bincount(out[:, -1], minlength=probs.size)
        expected = probs * n
        # pool rare tokens into one bin so every expected count is >= 5
        keep = expected >= 5
        obs = np.append(counts[keep], counts[~keep].sum())
        exp = np.append(expected[keep], expected[~keep].sum())
        return scipy.stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue

    assert p_value(1.0, seed=0) > 1e-3
    assert p_value(0.4, seed=0) < 1e-3  # a wrong distribution is caught


def test_top_k_top_p_and_seeds(models):
    config, _, model = models
    prompt = np.asarray([[config.text.bos_token_id, 5, 6, 7]])
    logits = np.asarray(model(prompt).logits[0, -1])
    batch = np.repeat(prompt, 256, axis=0)
    top5 = set(np.argsort(-logits)[:5].tolist())
    out = S.generate(model, batch, max_new_tokens=1, do_sample=True, top_k=5, eos_token_id=None, seed=3)
    assert set(out[:, -1].tolist()) <= top5 and len(set(out[:, -1].tolist())) > 1
    # top_p so small that only the most likely token survives
    out = S.generate(model, batch, max_new_tokens=1, do_sample=True, top_k=0, top_p=1e-6, eos_token_id=None, seed=3)
    assert (out[:, -1] == logits.argmax()).all()
    a = S.generate(model, batch[:4], max_new_tokens=8, do_sample=True, eos_token_id=None, seed=11)
    b = S.generate(model, batch[:4], max_new_tokens=8, do_sample=True, eos_token_id=None, seed=11)
    c = S.generate(model, batch[:4], max_new_tokens=8, do_sample=True, eos_token_id=None, seed=12)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# --- stop strings ----------------------------------------------------------------------------------------------


def _run_matcher(table, token_seq):
    window, filled = stop_lib.init_window(1, table)
    hits = []
    for t in token_seq:
        window, filled, hit = stop_lib.step(table, window, filled, jnp.asarray([t]))
        hits.append(bool(hit[0].any()))
    return hits


def test_stop_string_fires_on_the_completing_token_however_tokenised():
    tokenizer = build_tiny_tokenizer()
    vocab_bytes = stop_lib.token_bytes(tokenizer)
    table = stop_lib.build_stop_table(vocab_bytes, ["</CAPTION>"], window=32, num_slots=4)
    ids_of = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    tag = "</CAPTION>"
    byte_token = {b: i for i, b in enumerate(vocab_bytes) if len(b) == 1}
    splits = [
        ids_of("the red cube " + tag),  # the tokenizer's own spelling
        ids_of("the red cube") + [byte_token[bytes([c])] for c in tag.encode()],  # one byte per token
        ids_of("the red cube </CAP") + ids_of("TION>"),
        ids_of("the red cube </") + ids_of("CAPTION") + ids_of(">"),
    ]
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    splits.append(ids_of("cube </CAP") + [eot] + ids_of("TION>"))  # special tokens add no bytes
    for seq in splits:
        hits = _run_matcher(table, seq)
        assert hits.index(True) == len(seq) - 1, (seq, hits)
    assert not any(_run_matcher(table, ids_of("CAPTION </CAPTIO N> <CAPTION>")))

    # a (synthetic) long token holding the tag, and a tag ending inside the head of a long token
    vocab = [b"x", b"</", b"CAPTION>", b"y" * 50 + b"</CAPTION>" + b"z" * 60, b"ION>" + b"w" * 80, b"</CAPT"]
    long_table = stop_lib.build_stop_table(vocab, ["</CAPTION>"], window=16, num_slots=2)
    assert _run_matcher(long_table, [0, 3]) == [False, True]
    assert _run_matcher(long_table, [0, 5, 4]) == [False, False, True]
    assert _run_matcher(long_table, [1, 2]) == [False, True]
    assert _run_matcher(long_table, [4, 1, 0, 2]) == [False, False, False, False]


def test_text_end_stop_fires_only_where_the_text_ends_with_it():
    """TextEnd(".") (LLaVA-CoT's sentence end) against a brute-force check on random token streams, next to a plain
    stop string in the same table."""
    tokenizer = build_tiny_tokenizer()
    vocab_bytes = stop_lib.token_bytes(tokenizer)
    stops = [stop_lib.TextEnd("."), "</CAPTION>"]
    table = stop_lib.build_stop_table(vocab_bytes, stops, window=32, num_slots=4)
    assert stop_lib.TextEnd(".") != "." and len({(".",), (stop_lib.TextEnd("."),)}) == 2  # distinct stop sets
    dotted = [i for i, b in enumerate(vocab_bytes) if b"." in b]
    ids_of = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any(not vocab_bytes[i].endswith(b".") for i in dotted)  # e.g. ".\n": holds a period, does not end with one
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    chunks = [[i] for i in dotted] + [ids_of(" the red cube"), ids_of(" </CAPTION>")]
    chunks += [ids_of(" </CAP") + ids_of("TION>")]
    chunks += [[eot], ids_of(" </CAP") + [eot] + ids_of("TION>")]
    rng = np.random.default_rng(0)
    fired = {0: 0, 1: 0}
    step = jax.jit(stop_lib.step)
    for _ in range(12):
        window, filled = stop_lib.init_window(1, table)
        text = b""
        for token in [t for k in rng.integers(len(chunks), size=15) for t in chunks[k]]:
            before, piece = text, vocab_bytes[token]
            text += piece
            window, filled, hit = step(table, window, filled, jnp.asarray([token]))
            expected_end = bool(piece) and text.endswith(b".")
            expected_tag = b"</CAPTION>" in text[max(0, len(before) - 9) :]  # an occurrence ends inside `piece`
            assert bool(hit[0, 0]) == expected_end, (before, piece)
            assert bool(hit[0, 1]) == expected_tag, (before, piece)
            fired[0] += expected_end
            fired[1] += expected_tag
    assert fired[0] > 10 and fired[1] > 5  # both kinds were exercised


def test_decode_loop_stops_at_the_token_completing_a_stop_string(models):
    """Pick a stop string that straddles a token boundary of a greedy run; the rerun must end on that token."""
    config, _, model = models
    tokenizer = build_tiny_tokenizer()
    vocab_bytes = stop_lib.token_bytes(tokenizer)
    prompt = np.asarray([[config.text.bos_token_id, 300, 301, 302, 303]])
    full = S.generate(model, prompt, max_new_tokens=24, eos_token_id=None)[0, 5:]
    pieces = [vocab_bytes[t] for t in full]
    k = next(i for i in range(6, 20) if len(pieces[i]) >= 1 and len(pieces[i + 1]) >= 1)
    stop = (pieces[k][-1:] + pieces[k + 1][:2]).decode("utf-8", errors="ignore")
    if not stop:
        pytest.skip("non-UTF-8 boundary")
    text_so_far = b""
    expected = None
    for i, p in enumerate(pieces):  # the first token whose bytes complete the stop string
        text_so_far += p
        if stop.encode() in text_so_far:
            expected = i
            break
    streamed = []
    out = S.generate(
        model,
        prompt,
        max_new_tokens=24,
        eos_token_id=None,
        stop_strings=[stop],
        tokenizer=tokenizer,
        return_dict=True,
        streamer=lambda tokens, active: streamed.extend(tokens[active].tolist()),
    )
    assert out["finish"][0] == S.FINISH_STOP
    assert out["num_tokens"][0] == expected + 1
    np.testing.assert_array_equal(out["sequences"][0, 5:], full[: expected + 1])
    assert streamed == full[: expected + 1].tolist()  # the host saw every token as it was produced


def test_bad_inputs_raise(models):
    _, _, model = models
    with pytest.raises(ValueError, match="max_new_tokens"):
        S.generate(model, np.ones((1, 3), int), max_new_tokens=0)
    with pytest.raises(ValueError, match="cross_attention_mask"):
        S.generate(model, np.ones((1, 3), int), pixel_values=np.zeros((1, 1, 4, 3, 28, 28)), aspect_ratio_ids=[[1]])
    with pytest.raises(ValueError, match="temperature"):
        S.Sampling(do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        S.generate(model, np.ones((1, 3), int), max_new_tokens=2, stop_strings=["x"])
