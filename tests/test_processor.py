"""MllamaProcessor against transformers' MllamaProcessor built in-process from the same tokenizer and config."""

import warnings

import numpy as np
import PIL.Image
import pytest
from transformers import MllamaImageProcessorPil
from transformers import MllamaProcessor as HFMllamaProcessor

from llava_cot_jax.data import chat
from llava_cot_jax.data.image import CLIP_MEAN, CLIP_STD, MllamaImageProcessor
from llava_cot_jax.data.processor import MllamaProcessor
from llava_cot_jax.data.tokenizer import build_tiny_tokenizer

TILE = 28
KEYS = ["aspect_ratio_ids", "aspect_ratio_mask", "attention_mask", "cross_attention_mask", "input_ids", "pixel_values"]


def _image(height, width, seed=0):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def processors(tiny_tokenizer):
    ours = MllamaProcessor(MllamaImageProcessor(size=TILE), tiny_tokenizer)
    reference_images = MllamaImageProcessorPil(
        size={"height": TILE, "width": TILE}, max_image_tiles=4, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)
    )
    return ours, HFMllamaProcessor(reference_images, tiny_tokenizer)


def _assert_same(ours, reference, keys=KEYS):
    assert sorted(ours) == sorted(keys)
    for key in keys:
        expected = np.asarray(reference[key])
        assert ours[key].shape == expected.shape, key
        if key == "pixel_values":
            assert np.abs(ours[key] - expected).max() <= 1e-5
        else:
            np.testing.assert_array_equal(ours[key], expected, err_msg=key)


BATCH_TEXTS = [
    "<|image|>How many cubes?",
    "Compare <|image|> with <|image|><|image|> please",
    "no leading image <|image|>",
]
BATCH_IMAGES = [
    [_image(30, 60, 1)],
    [_image(60, 30, 2), _image(20, 20, 3), _image(90, 30, 4)],
    [_image(50, 50, 5)],
]


@pytest.mark.parametrize(
    "kwargs", [{"padding": True}, {"padding": True, "add_special_tokens": False}, {"padding": "longest"}]
)
def test_batch_matches_transformers(processors, kwargs):
    ours, reference = processors
    out = ours(images=BATCH_IMAGES, text=BATCH_TEXTS, **kwargs)
    _assert_same(out, reference(images=BATCH_IMAGES, text=BATCH_TEXTS, return_tensors="np", **kwargs))
    assert out["cross_attention_mask"].shape[2:] == (3, 4)


def test_left_padding_matches_transformers(tiny_tokenizer):
    left = build_tiny_tokenizer()
    left.padding_side = "left"
    ours = MllamaProcessor(MllamaImageProcessor(size=TILE), left)
    reference = HFMllamaProcessor(
        MllamaImageProcessorPil(
            size={"height": TILE, "width": TILE}, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)
        ),
        left,
    )
    out = ours(images=BATCH_IMAGES, text=BATCH_TEXTS, padding=True)
    _assert_same(out, reference(images=BATCH_IMAGES, text=BATCH_TEXTS, padding=True, return_tensors="np"))
    assert out["input_ids"][0, 0] == left.pad_token_id


def test_single_prompt_and_chat_template(processors, tiny_tokenizer):
    ours, reference = processors
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many cubes?"}]}]
    prompt = ours.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == chat.render_prompt(messages)
    image = _image(100, 40, 7)
    out = ours(images=image, text=prompt)
    _assert_same(out, reference(images=image, text=prompt, return_tensors="np"))
    # transformers' default (ours too) gives a templated prompt two BOS, as LLaVA-CoT trained and ran; "once" one.
    bos = tiny_tokenizer.bos_token_id
    assert out["input_ids"][0, :2].tolist() == [bos, bos]
    once = ours(images=image, text=prompt, bos="once")
    assert once["input_ids"][0].tolist() == [bos] + out["input_ids"][0, 2:].tolist()
    np.testing.assert_array_equal(once["cross_attention_mask"][0], out["cross_attention_mask"][0, 1:])
    same_as_hf_without_specials = reference(images=image, text=prompt, add_special_tokens=False, return_tensors="np")
    np.testing.assert_array_equal(once["input_ids"], same_as_hf_without_specials["input_ids"])
    # Raw text without BOS: "once" puts BOS first, transformers after the leading image tokens.
    raw = ours(images=image, text="<|image|>Describe.", bos="once")["input_ids"][0]
    assert raw[:2].tolist() == [bos, ours.image_token_id]
    none = ours(images=image, text=prompt, bos="none")["input_ids"][0]
    assert none.tolist() == out["input_ids"][0, 2:].tolist()
    assert (
        ours.apply_chat_template(messages, tokenize=True)
        == tiny_tokenizer(chat.render_prompt(messages, add_generation_prompt=False), add_special_tokens=False)[
            "input_ids"
        ]
    )


def test_text_only_and_images_only(processors):
    ours, reference = processors
    texts = ["hello there", "a longer text without images"]
    _assert_same(
        ours(text=texts, padding=True),
        reference(text=texts, padding=True, return_tensors="np"),
        keys=["attention_mask", "input_ids"],
    )
    images = [_image(40, 90, 8)]
    _assert_same(
        ours(images=images),
        reference(images=images, return_tensors="np"),
        keys=["aspect_ratio_ids", "aspect_ratio_mask", "pixel_values"],
    )


def test_uint8_output_keeps_the_other_keys(processors):
    ours, _ = processors
    floats = ours(images=BATCH_IMAGES, text=BATCH_TEXTS, padding=True)
    raw = ours(images=BATCH_IMAGES, text=BATCH_TEXTS, padding=True, return_uint8=True)
    assert raw["pixel_values"].dtype == np.uint8
    for key in KEYS:
        if key != "pixel_values":
            np.testing.assert_array_equal(raw[key], floats[key])


def test_input_errors(processors):
    ours, _ = processors
    with pytest.raises(ValueError, match=r"found \[1, 1\] markers and \[1, 2\] images"):
        ours(images=[[_image(20, 20)], [_image(20, 20), _image(20, 20)]], text=["<|image|>a", "<|image|>b"])
    with pytest.raises(ValueError, match="padding=True"):
        ours(text=["short", "a much longer text than the first"])
    with pytest.raises(ValueError, match="bos must be"):
        ours(text="x", bos="twice")
    with pytest.raises(ValueError, match="give text, images or both"):
        ours()


def test_from_pretrained_round_trip(processors, tmp_path):
    ours, _ = processors
    ours.save_pretrained(tmp_path)
    loaded = MllamaProcessor.from_pretrained(tmp_path)
    assert loaded.image_token_id == ours.image_token_id == 1024
    a = loaded(images=BATCH_IMAGES, text=BATCH_TEXTS, padding=True)
    b = ours(images=BATCH_IMAGES, text=BATCH_TEXTS, padding=True)
    for key in KEYS:
        np.testing.assert_array_equal(a[key], b[key])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = HFMllamaProcessor(
            MllamaImageProcessorPil.from_pretrained(tmp_path), loaded.tokenizer
        )  # transformers reads the same files
    _assert_same(a, reference(images=BATCH_IMAGES, text=BATCH_TEXTS, padding=True, return_tensors="np"))
    with pytest.raises(FileNotFoundError, match="not found"):
        MllamaProcessor.from_pretrained(tmp_path / "nowhere")


def test_decode(processors, tiny_tokenizer):
    ours, _ = processors
    ids = ours(text=["<|image|>How many cubes?", "<|image|>Two spheres."], padding=True)["input_ids"]
    assert ours.batch_decode(ids, skip_special_tokens=True) == ["How many cubes?", "Two spheres."]
    assert ours.decode(ids[0]) == tiny_tokenizer.decode(ids[0].tolist())
