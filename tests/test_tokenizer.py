"""Tiny and real Llama-3 tokenizers: id layout, determinism, BOS option, real Llama-3 ids."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from llava_cot_jax.data import chat
from llava_cot_jax.data.tokenizer import (
    build_tiny_tokenizer,
    llama3_special_tokens,
    save_tiny_tokenizer,
)

PROMPT = f"{chat.BOS}{chat.START_HEADER}user{chat.END_HEADER}\n\n{chat.IMAGE}How many cubes?{chat.EOT}"


def test_special_tokens_follow_llama3_order():
    specials = llama3_special_tokens()
    assert len(specials) == 256 and len(set(specials)) == 256
    assert specials[:11] == [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|reserved_special_token_2|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ]
    assert specials[11] == "<|reserved_special_token_3|>"
    assert specials[255] == "<|reserved_special_token_247|>"


@pytest.mark.parametrize("num_base_tokens", [512, 768])
def test_tiny_tokenizer_id_layout(num_base_tokens):
    tok = build_tiny_tokenizer(num_base_tokens)
    assert len(tok) == num_base_tokens + 257
    for offset, token in enumerate(llama3_special_tokens()):
        assert tok.convert_tokens_to_ids(token) == num_base_tokens + offset
    # Mllama: the image token is the first id past the text vocabulary.
    assert tok.convert_tokens_to_ids(chat.IMAGE) == num_base_tokens + 256
    assert tok.bos_token_id == num_base_tokens
    assert tok.pad_token_id == num_base_tokens + 4
    assert tok.eos_token_id == num_base_tokens + 9


def test_tiny_tokenizer_is_deterministic_and_round_trips(tmp_path):
    first, second = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert first.get_vocab() == second.get_vocab()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    text = "The red cube is left of 3 small spheres.\n\n<SUMMARY> ok </SUMMARY> Ünïcode ✓"
    ids = first(text, add_special_tokens=False)["input_ids"]
    assert ids == second(text, add_special_tokens=False)["input_ids"]
    assert first.decode(ids) == text
    assert max(ids) < 768  # plain text never produces special ids

    save_tiny_tokenizer(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert reloaded(PROMPT)["input_ids"] == first(PROMPT)["input_ids"]
    assert reloaded.convert_tokens_to_ids(chat.IMAGE) == 1024


def test_tiny_tokenizer_keeps_template_pieces_whole():
    tok = build_tiny_tokenizer()
    tokens = tok.convert_ids_to_tokens(tok(PROMPT, add_special_tokens=False)["input_ids"])
    assert tokens[:6] == [chat.BOS, chat.START_HEADER, "user", chat.END_HEADER, "ĊĊ", chat.IMAGE]
    assert tokens[-1] == chat.EOT


def test_add_bos_token_option():
    with_bos, without_bos = build_tiny_tokenizer(), build_tiny_tokenizer(add_bos_token=False)
    assert with_bos("hello")["input_ids"][0] == with_bos.bos_token_id
    assert without_bos("hello")["input_ids"] == with_bos("hello", add_special_tokens=False)["input_ids"]


def test_tiny_tokenizer_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="num_base_tokens"):
        build_tiny_tokenizer(100)
    with pytest.raises(ValueError, match="embedded corpus yields"):
        build_tiny_tokenizer(50000)


def test_llama3_tokenizer_matches_real_ids(llama3_tokenizer):
    ids = llama3_tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert ids == [128000, 128006, 882, 128007, 271, 128256, 4438, 1690, 55204, 30, 128009]
    # The real tokenizer adds BOS itself on add_special_tokens=True, so a templated prompt gets two.
    assert llama3_tokenizer(PROMPT)["input_ids"][:2] == [128000, 128000]
    known = {"user": 882, "assistant": 78191, "system": 9125, "\n\n": 271, " the": 279}
    for text, token_id in known.items():
        assert llama3_tokenizer(text, add_special_tokens=False)["input_ids"] == [token_id]
    assert len(llama3_tokenizer) == 128257
    assert (llama3_tokenizer.bos_token_id, llama3_tokenizer.pad_token_id, llama3_tokenizer.eos_token_id) == (
        128000,
        128004,
        128009,
    )
    assert llama3_tokenizer.convert_tokens_to_ids(["<|eom_id|>", "<|end_of_text|>"]) == [128008, 128001]


def test_llama3_tokenizer_decodes_multibyte_text(llama3_tokenizer):
    text = "Größe: 3 × 4 = 12 — 猫 🐱"
    ids = np.asarray(llama3_tokenizer(text, add_special_tokens=False)["input_ids"])
    assert (ids < 128000).all()
    assert llama3_tokenizer.decode(ids.tolist()) == text
