"""LlavaImageProcessor: the crop path against transformers' CLIPImageProcessor (PIL backend), the pad path's
geometry, and config round trips."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import transformers

from llava_cot_jax.data.llava_image import LlavaImageProcessor

# transformers 5.x names the PIL-backed processor so; in 4.45 it is the only one, CLIPImageProcessor.
CLIPImageProcessorPil = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)


def _image(rng, width, height, mode="RGB"):
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return PIL.Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


@pytest.mark.parametrize("size", [(48, 30), (30, 48), (40, 40), (17, 60), (400, 301)])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_crop_path_matches_clip_image_processor(size, mode):
    rng = np.random.default_rng(sum(size))
    image = _image(rng, *size, mode)
    ours = LlavaImageProcessor(size=28, mode="crop")
    reference = CLIPImageProcessorPil(**{k: v for k, v in ours.to_dict().items() if k != "image_processor_type"})
    want = reference(images=image, return_tensors="np")["pixel_values"]
    got = ours(image)["pixel_values"]
    assert got.shape == (1, 1, 3, 28, 28)
    np.testing.assert_allclose(got[0], want, atol=1e-6, rtol=0)


def test_pad_path_keeps_the_whole_image_on_a_mean_colour_square():
    processor = LlavaImageProcessor(size=30, mode="pad")
    wide = PIL.Image.new("RGB", (60, 20), (255, 0, 0))  # a red band across the middle third
    pixels = processor.square(wide)
    assert pixels.shape == (30, 30, 3)
    fill = [int(m * 255) for m in processor.image_mean]
    np.testing.assert_array_equal(pixels[:8, :, :], np.broadcast_to(fill, (8, 30, 3)))  # top border: mean colour
    np.testing.assert_array_equal(pixels[-8:, :, :], np.broadcast_to(fill, (8, 30, 3)))
    assert (pixels[12:18, :, 0] == 255).all()  # the band spans the full width: nothing was cropped
    cropped = LlavaImageProcessor(size=30, mode="crop").square(wide)
    assert (cropped[..., 0] == 255).all()  # the crop path fills the square with the band instead


def test_square_images_are_the_same_in_both_modes():
    image = _image(np.random.default_rng(0), 50, 50)
    pad, crop = LlavaImageProcessor(size=28, mode="pad"), LlavaImageProcessor(size=28, mode="crop")
    np.testing.assert_array_equal(pad(image)["pixel_values"], crop(image)["pixel_values"])


def test_batch_rows_with_different_numbers_of_images():
    rng = np.random.default_rng(1)
    out = LlavaImageProcessor(size=28)([[_image(rng, 30, 40)], [_image(rng, 28, 28), _image(rng, 50, 20)]])
    pixels = out["pixel_values"]
    assert pixels.shape == (2, 2, 3, 28, 28)
    assert not pixels[0, 1].any() and pixels[1, 1].any()


def test_preprocessor_config_round_trip(tmp_path):
    ours = LlavaImageProcessor(size=336, mode="crop")
    CLIPImageProcessorPil(**{k: v for k, v in ours.to_dict().items() if k != "image_processor_type"}).save_pretrained(
        tmp_path
    )
    loaded = LlavaImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == ours.to_dict() and loaded.mode == "pad"


def test_bad_mode_and_bad_image_are_named():
    with pytest.raises(ValueError, match="mode must be one of"):
        LlavaImageProcessor(mode="stretch")
    with pytest.raises(ValueError, match="cannot decode image"):
        LlavaImageProcessor()(b"not an image")
