"""Chat template, stage tags, training labels, BOS modes and cross-attention masks."""

import numpy as np
import PIL.Image
import pytest
from transformers import MllamaImageProcessorPil
from transformers import MllamaProcessor as HFMllamaProcessor
from transformers.models.mllama.processing_mllama import (
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

from llava_cot_jax.data import chat
from llava_cot_jax.data.tokenizer import build_tiny_tokenizer

ANSWER = (
    "<SUMMARY>Count the cubes.</SUMMARY><CAPTION>Three cubes and a sphere.</CAPTION>"
    "<REASONING>There are 3 cubes.</REASONING><CONCLUSION>3</CONCLUSION>"
)
IMAGE_TURN = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many cubes?"}]}]
HEADER = "<|start_header_id|>{}<|end_header_id|>\n\n"


# --- stage tags --------------------------------------------------------------------------------------------
def test_tags():
    assert chat.STAGES == ("SUMMARY", "CAPTION", "REASONING", "CONCLUSION")
    assert chat.open_tag("REASONING") == "<REASONING>"
    assert chat.close_tag("CONCLUSION") == "</CONCLUSION>"
    with pytest.raises(ValueError, match="unknown stage"):
        chat.open_tag("summary")


def test_split_and_validate_well_formed_answer():
    assert chat.split_stages(ANSWER) == {
        "SUMMARY": "Count the cubes.",
        "CAPTION": "Three cubes and a sphere.",
        "REASONING": "There are 3 cubes.",
        "CONCLUSION": "3",
    }
    assert chat.validate_stages(ANSWER) == []
    assert chat.validate_stages(ANSWER.replace("><", ">\n\n<")) == []


@pytest.mark.parametrize(
    "text, problem",
    [
        (ANSWER.replace("<CAPTION>Three cubes and a sphere.</CAPTION>", ""), "missing stage CAPTION"),
        (ANSWER.replace("</REASONING>", ""), "stage REASONING has 1 opening and 0 closing"),
        (ANSWER + "<CONCLUSION>4</CONCLUSION>", "stage CONCLUSION has 2 opening and 2 closing"),
        (
            "<CAPTION>c</CAPTION><SUMMARY>s</SUMMARY><REASONING>r</REASONING><CONCLUSION>x</CONCLUSION>",
            "out of order",
        ),
        ("<SUMMARY>s<CAPTION>c</SUMMARY></CAPTION><REASONING>r</REASONING><CONCLUSION>x</CONCLUSION>", "out of order"),
        (ANSWER.replace("There are 3 cubes.", "  \n"), "stage REASONING is empty"),
    ],
)
def test_validate_stages_reports_problems(text, problem):
    problems = chat.validate_stages(text)
    assert any(problem in p for p in problems), problems


def test_extract_conclusion():
    assert chat.extract_conclusion(ANSWER) == "3"
    assert chat.extract_conclusion("<SUMMARY>x</SUMMARY><CONCLUSION> B. cat") == "B. cat"  # cut off
    assert chat.extract_conclusion("  plain answer \n") == "plain answer"


# --- rendering ---------------------------------------------------------------------------------------------
def test_render_prompt_image_user_turn():
    expected = (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>How many cubes?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert chat.render_prompt(IMAGE_TURN) == expected
    assert chat.render_prompt(IMAGE_TURN, add_bos=False) == expected[len(chat.BOS) :]
    assert chat.render_prompt(IMAGE_TURN, add_generation_prompt=False) == expected[: -len(HEADER.format("assistant"))]


def test_render_prompt_multi_turn_and_string_content():
    messages = IMAGE_TURN + [
        {"role": "assistant", "content": "Three."},
        {"role": "user", "content": [{"type": "text", "text": "And spheres?"}]},
    ]
    assert chat.render_prompt(messages) == (
        "<|begin_of_text|>" + HEADER.format("user") + "<|image|>How many cubes?<|eot_id|>"
        + HEADER.format("assistant") + "Three.<|eot_id|>"
        + HEADER.format("user") + "And spheres?<|eot_id|>"
        + HEADER.format("assistant")
    )  # fmt: skip


def test_render_prompt_text_only_gets_the_system_block():
    messages = [{"role": "system", "content": "  Be brief. "}, {"role": "user", "content": "Hi"}]
    assert chat.render_prompt(messages, add_generation_prompt=False) == (
        "<|begin_of_text|>" + HEADER.format("system")
        + "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|>"
        + HEADER.format("user") + "Hi<|eot_id|>"
    )  # fmt: skip
    assert "Today Date: 01 Jan 2025\n" in chat.render_prompt(messages[1:], date_string="01 Jan 2025")


def test_render_prompt_rejects_system_with_image_and_bad_input():
    with pytest.raises(ValueError, match="system message together with an image"):
        chat.render_prompt([{"role": "system", "content": "x"}] + IMAGE_TURN)
    with pytest.raises(ValueError, match="content part 0"):
        chat.render_prompt([{"role": "user", "content": [{"type": "video"}]}])
    with pytest.raises(ValueError, match="role 'tool'"):
        chat.render_prompt([{"role": "tool", "content": "x"}])


# --- training encoding -------------------------------------------------------------------------------------
def _labelled_text(tokenizer, encoded):
    """Decode the labelled tokens run by run (the unlabelled gaps split the runs)."""
    labels = encoded["labels"]
    runs, current = [], []
    for token, label in zip(encoded["input_ids"], labels):
        if label == chat.IGNORE_INDEX:
            if current:
                runs.append(tokenizer.decode(current))
            current = []
        else:
            assert label == token
            current.append(int(token))
    if current:
        runs.append(tokenizer.decode(current))
    return runs


LLAVA_SAMPLE = [{"from": "human", "value": "<image>\nHow many cubes?"}, {"from": "gpt", "value": ANSWER}]


def test_single_turn_real_llama3_ids_and_labels(llama3_tokenizer):
    """The default encoding is LLaVA-CoT's: two BOS, labels from the "\\n\\n" after the assistant header through
    the answer's <|eot_id|>, question and answer stripped."""
    padded = [{"from": "human", "value": "<image>\n How many cubes?  "}, {"from": "gpt", "value": "\n" + ANSWER + " "}]
    encoded = chat.encode_training_example(llama3_tokenizer, padded, has_image=True, num_tiles=[4])
    ids = encoded["input_ids"].tolist()
    prompt = [128000, 128000, 128006, 882, 128007, 271, 128256, 4438, 1690, 55204, 30, 128009, 128006, 78191, 128007]
    assert ids[: len(prompt)] == prompt and ids[len(prompt)] == 271
    assert ids[-1] == 128009 and ids.count(128000) == 2
    labels = encoded["labels"]
    assert (labels[: len(prompt)] == chat.IGNORE_INDEX).all()
    assert (labels[len(prompt) :] == encoded["input_ids"][len(prompt) :]).all()
    assert labels[len(prompt)] == 271 and labels[-1] == 128009
    assert _labelled_text(llama3_tokenizer, encoded) == ["\n\n" + ANSWER + chat.EOT]
    assert labels.tolist() == llava_cot_labels(ids)
    mask = encoded["cross_attention_mask"]
    assert mask.shape == (len(ids), 1, 4)
    assert (mask[:6] == 0).all() and (mask[6:] == 1).all()


def llava_cot_labels(ids):
    """LLaVA-CoT's label rule (train/datasets/cot_dataset.py), restated independently: cut the ids after every
    <|eot_id|>; a piece holding a system or user header (start, role, end ids) is masked whole; then every
    assistant header and every pad and image token are masked."""
    labels, piece = [], []
    for token in ids:
        piece.append(token)
        if token == 128009 or len(labels) + len(piece) == len(ids):
            headers = {tuple(piece[i : i + 3]) for i in range(len(piece) - 2)}
            prompt_turn = headers & {(128006, 9125, 128007), (128006, 882, 128007)}
            labels += [chat.IGNORE_INDEX] * len(piece) if prompt_turn else piece
            piece = []
    for i in range(len(ids) - 2):
        if ids[i : i + 3] == [128006, 78191, 128007]:
            labels[i : i + 3] = [chat.IGNORE_INDEX] * 3
    return [chat.IGNORE_INDEX if token in (128004, 128256) else label for token, label in zip(ids, labels)]


def test_llava_and_chat_formats_encode_alike(tiny_tokenizer):
    messages = IMAGE_TURN + [{"role": "assistant", "content": [{"type": "text", "text": ANSWER}]}]
    from_llava = chat.encode_training_example(tiny_tokenizer, LLAVA_SAMPLE, has_image=True, num_tiles=[2])
    from_chat = chat.encode_training_example(tiny_tokenizer, messages, has_image=True, num_tiles=[2])
    for key in from_llava:
        np.testing.assert_array_equal(from_llava[key], from_chat[key])
    rendered = chat.render_prompt(messages, add_generation_prompt=False)
    assert from_chat["input_ids"].tolist() == tiny_tokenizer(rendered)["input_ids"]  # the tokenizer adds the second BOS


def test_multi_turn_labels_only_assistant_turns(llama3_tokenizer):
    conversation = LLAVA_SAMPLE + [
        {"from": "human", "value": "Are you sure?"},
        {"from": "gpt", "value": "\nYes, three. "},  # stripped, as LLaVA-CoT's loader does
    ]
    encoded = chat.encode_training_example(llama3_tokenizer, conversation, has_image=True, num_tiles=[1], max_images=2)
    runs = _labelled_text(llama3_tokenizer, encoded)
    assert runs == ["\n\n" + ANSWER + chat.EOT, "\n\nYes, three." + chat.EOT]
    assert encoded["labels"].tolist() == llava_cot_labels(encoded["input_ids"].tolist())
    assert encoded["cross_attention_mask"].shape[1:] == (2, 4)
    assert (encoded["cross_attention_mask"][:, 1] == 0).all()
    assert (encoded["cross_attention_mask"][6:, 0, 0] == 1).all()
    assert (encoded["cross_attention_mask"][:, 0, 1:] == 0).all()


def test_text_only_sample_masks_the_system_block(llama3_tokenizer):
    conversation = [
        {"from": "system", "value": "Answer in stages."},
        {"from": "human", "value": "What is 2+2?"},
        {"from": "gpt", "value": "<CONCLUSION>4</CONCLUSION>"},
    ]
    encoded = chat.encode_training_example(llama3_tokenizer, conversation, has_image=False)
    assert _labelled_text(llama3_tokenizer, encoded) == ["\n\n<CONCLUSION>4</CONCLUSION>" + chat.EOT]
    assert encoded["labels"].tolist() == llava_cot_labels(encoded["input_ids"].tolist())
    assert 9125 in encoded["input_ids"].tolist()  # "system" header is present but ignored
    assert encoded["cross_attention_mask"].shape == (len(encoded["input_ids"]), 1, 4)
    assert not encoded["cross_attention_mask"].any()


def test_image_and_pad_tokens_never_labelled(tiny_tokenizer):
    answer = f"odd {chat.IMAGE} and {chat.PAD} inside"
    conversation = [{"from": "human", "value": "q"}, {"from": "gpt", "value": answer}]
    encoded = chat.encode_training_example(tiny_tokenizer, conversation, has_image=True, num_tiles=[1, 1])
    ids, labels = encoded["input_ids"], encoded["labels"]
    for token in (tiny_tokenizer.convert_tokens_to_ids(chat.IMAGE), tiny_tokenizer.pad_token_id):
        assert token in ids.tolist()
        assert (labels[ids == token] == chat.IGNORE_INDEX).all()


def _hf_processor(tokenizer, tile_size=28):
    image_processor = MllamaImageProcessorPil(size={"height": tile_size, "width": tile_size}, max_image_tiles=4)
    return HFMllamaProcessor(image_processor, tokenizer)


@pytest.mark.parametrize("tokenizer_name", ["llama3_tokenizer", "tiny_tokenizer"])
def test_bos_modes(tokenizer_name, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    bos_id = tokenizer.bos_token_id
    default = chat.encode_training_example(tokenizer, LLAVA_SAMPLE, has_image=True, num_tiles=[3])
    once = chat.encode_training_example(tokenizer, LLAVA_SAMPLE, has_image=True, num_tiles=[3], bos="once")
    none = chat.encode_training_example(tokenizer, LLAVA_SAMPLE, has_image=True, num_tiles=[3], bos="none")
    assert default["input_ids"][:2].tolist() == [bos_id, bos_id]  # tokenizer BOS + template BOS
    assert once["input_ids"][0] == bos_id and once["input_ids"].tolist().count(bos_id) == 1
    assert bos_id not in none["input_ids"].tolist()
    for key in ("input_ids", "labels"):
        np.testing.assert_array_equal(default[key][1:], once[key])
        np.testing.assert_array_equal(once[key][1:], none[key])

    # The default reproduces transformers' MllamaProcessor on the rendered conversation (what LLaVA-CoT ran).
    messages = chat.to_messages(LLAVA_SAMPLE, has_image=True)
    rendered = chat.render_prompt(messages, add_generation_prompt=False)
    image = PIL.Image.new("RGB", (84, 30))  # 1 x 3 tiles of 28 px
    hf = _hf_processor(tokenizer)(images=[image], text=rendered, return_tensors="np")
    assert default["input_ids"].tolist() == hf["input_ids"][0].tolist()
    np.testing.assert_array_equal(default["cross_attention_mask"], hf["cross_attention_mask"][0])
    assert chat.encode_prompt(tokenizer, rendered) == default["input_ids"].tolist()
    assert chat.encode_prompt(tokenizer, rendered, bos="once") == once["input_ids"].tolist()
    with pytest.raises(ValueError, match="bos must be one of"):
        chat.encode_training_example(tokenizer, LLAVA_SAMPLE, has_image=True, num_tiles=[3], bos="twice")


def test_bos_transformers_without_tokenizer_bos():
    tokenizer = build_tiny_tokenizer(add_bos_token=False)
    encoded = chat.encode_training_example(tokenizer, LLAVA_SAMPLE, has_image=True, num_tiles=[1], bos="transformers")
    assert encoded["input_ids"].tolist().count(tokenizer.bos_token_id) == 1


def test_encode_errors(tiny_tokenizer):
    with pytest.raises(ValueError, match="num_tiles is required"):
        chat.encode_training_example(tiny_tokenizer, LLAVA_SAMPLE, has_image=True)
    with pytest.raises(ValueError, match="no message has an image part"):
        chat.encode_training_example(tiny_tokenizer, [{"role": "user", "content": "q"}], has_image=True, num_tiles=[1])
    with pytest.raises(ValueError, match="turn 1: unknown speaker"):
        chat.encode_training_example(tiny_tokenizer, [LLAVA_SAMPLE[0], {"from": "bot", "value": "x"}], has_image=False)
    with pytest.raises(ValueError, match="exceed max_images"):
        chat.encode_training_example(tiny_tokenizer, LLAVA_SAMPLE, has_image=True, num_tiles=[1], max_images=0)


# --- cross-attention mask vs transformers ------------------------------------------------------------------
@pytest.mark.parametrize(
    "image_positions, length, num_tiles",
    [
        ([0], 6, [4]),
        ([3], 9, [2]),
        ([1, 5], 9, [1, 3]),
        ([0, 1, 6], 10, [4, 2, 1]),  # two adjacent images share their span
        ([2, 3, 4], 8, [1, 1, 2]),
        ([], 5, []),
    ],
)
def test_cross_attention_mask_matches_transformers(image_positions, length, num_tiles):
    image_id = 99
    ids = [7] * length
    for position in image_positions:
        ids[position] = image_id
    ours = chat.cross_attention_mask(ids, image_id, num_tiles, max_images=max(1, len(num_tiles)), max_tiles=4)
    if not image_positions:
        assert ours.shape == (length, 1, 4) and not ours.any()
        return
    sparse = [get_cross_attention_token_mask(ids, image_id)]
    reference = convert_sparse_cross_attention_mask_to_dense(sparse, [num_tiles], max_num_tiles=4, length=length)
    np.testing.assert_array_equal(ours, reference[0])
