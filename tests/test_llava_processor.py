"""The llava family's inputs: Vicuna v1 / plain rendering and labels, and LlavaProcessor against transformers'."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import transformers

from llava_cot_jax.data import vicuna
from llava_cot_jax.data.chat import IGNORE_INDEX
from llava_cot_jax.data.llava_image import LlavaImageProcessor
from llava_cot_jax.data.llava_processor import LlavaProcessor
from llava_cot_jax.data.tokenizer import build_tiny_vicuna_tokenizer

RECORD = [
    {"from": "human", "value": "<image>\nHow many cubes are there?"},
    {"from": "gpt", "value": "There are 4 cubes."},
    {"from": "human", "value": "Which color is the sphere?"},
    {"from": "gpt", "value": "It is blue."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_vicuna_tokenizer()


def test_vicuna_v1_rendering():
    text = vicuna.render_prompt(RECORD, has_image=True)
    assert text == (
        "USER: <image>\nHow many cubes are there? ASSISTANT: There are 4 cubes.</s>"
        "USER: Which color is the sphere? ASSISTANT: It is blue.</s>"
    )
    asking = vicuna.render_prompt(RECORD[:3], has_image=True, system="Be brief.", add_generation_prompt=True)
    assert asking.startswith("Be brief. USER: <image>\nHow many") and asking.endswith("sphere? ASSISTANT:")


def test_labels_cover_the_answers_and_their_eos_only(tokenizer):
    example = vicuna.encode_training_example(tokenizer, RECORD, has_image=True, image_tokens=4)
    ids, labels = example["input_ids"], example["labels"]
    assert ids[0] == tokenizer.bos_token_id and (ids == tokenizer.convert_tokens_to_ids("<image>")).sum() == 4
    trained = labels != IGNORE_INDEX
    np.testing.assert_array_equal(labels[trained], ids[trained])
    assert tokenizer.decode(ids[trained]).replace(" ", "") == "Thereare4cubes.</s>Itisblue.</s>"
    runs = np.flatnonzero(np.diff(trained.astype(int)) == 1)
    assert len(runs) == 2  # two answers, each one contiguous run


def test_plain_template_trains_on_the_caption(tokenizer):
    record = [{"from": "human", "value": "<image>\nignored"}, {"from": "gpt", "value": "a red cube"}]
    assert vicuna.render_prompt(record, has_image=True, template="plain") == "<image>a red cube\n"
    example = vicuna.encode_training_example(tokenizer, record, True, image_tokens=3, template="plain")
    trained = example["labels"] != IGNORE_INDEX
    assert tokenizer.decode(example["input_ids"][trained]) == "a red cube\n"


@pytest.mark.parametrize(
    "turns, message",
    [
        ([{"from": "gpt", "value": "hi"}, {"from": "human", "value": "q"}], "must alternate"),
        ([{"from": "human", "value": "q"}, {"from": "human", "value": "q"}], "must alternate"),
        ([{"from": "human", "value": "q"}], "must end with an assistant turn"),
    ],
)
def test_bad_turn_orders_are_named(turns, message):
    with pytest.raises(ValueError, match=message):
        vicuna.render_prompt(turns, has_image=False)


def _transformers_processor(tokenizer, size):
    # 5.x names the PIL-backed processor so; in 4.45 it is the only one.
    pil_processor = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    image = pil_processor(
        **{
            k: v
            for k, v in LlavaImageProcessor(size=size, mode="crop").to_dict().items()
            if k != "image_processor_type"
        }
    )
    return transformers.LlavaProcessor(
        image_processor=image,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )


def test_processor_matches_transformers_llava_processor(tokenizer):
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 30), (28, 60))]
    texts = ["USER: <image>\nWhat is it? ASSISTANT:", "USER: <image>\nAnd this one, left of the cube? ASSISTANT:"]
    ours = LlavaProcessor(LlavaImageProcessor(size=28, mode="crop"), tokenizer)
    got = ours(images=[[images[0]], [images[1]]], text=texts, padding=True)
    tokenizer.padding_side = "right"
    want = _transformers_processor(tokenizer, 28)(images=images, text=texts, padding=True, return_tensors="np")
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    np.testing.assert_array_equal(got["attention_mask"], want["attention_mask"])
    np.testing.assert_allclose(got["pixel_values"].reshape(want["pixel_values"].shape), want["pixel_values"], atol=1e-6)


def test_processor_checks_markers_against_images(tokenizer):
    ours = LlavaProcessor(LlavaImageProcessor(size=28), tokenizer)
    image = PIL.Image.new("RGB", (30, 30))
    with pytest.raises(ValueError, match=r"found \[2\] markers and \[1\] images"):
        ours(images=image, text="<image><image> two?")
    with pytest.raises(ValueError, match=r"found \[1\] markers and \[0\] images"):
        ours(text="<image> where is the image?")
