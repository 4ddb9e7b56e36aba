"""MllamaImageProcessor against transformers' (PIL backend, same config), uint8 path, errors."""

import io
import json
import warnings

import numpy as np
import PIL.Image
import pytest
from transformers import MllamaImageProcessorPil
from transformers.models.mllama.image_processing_pil_mllama import (
    get_image_size_fit_to_canvas,
    get_optimal_tiled_canvas,
)

from llava_cot_jax.data.image import (
    CLIP_MEAN,
    CLIP_STD,
    MllamaImageProcessor,
    choose_canvas,
    fit_size,
    load_image,
    normalize_on_device,
    supported_aspect_ratios,
)

TILE = 56  # small tiles keep the tests fast; one case runs the real 560-px configuration
TOLERANCE = 1e-5


def _reference(tile_size=TILE, max_image_tiles=4):
    return MllamaImageProcessorPil(
        size={"height": tile_size, "width": tile_size},
        max_image_tiles=max_image_tiles,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        resample=2,
        rescale_factor=1 / 255,
    )


def _noise(height, width, channels=3, seed=0, dtype=np.uint8, high=256):
    shape = (height, width) if channels == 1 else (height, width, channels)
    return np.random.default_rng(seed).integers(0, high, shape, dtype=dtype)


def _palette_with_transparency():
    image = PIL.Image.fromarray(_noise(40, 50, seed=3)).convert("P")
    image.info["transparency"] = 0
    return image


CASES = {
    "landscape": lambda: PIL.Image.fromarray(_noise(40, 100)),
    "portrait": lambda: PIL.Image.fromarray(_noise(130, 45)),
    "exact_2x2_tiles": lambda: PIL.Image.fromarray(_noise(2 * TILE, 2 * TILE)),
    "exact_1x1_tile": lambda: PIL.Image.fromarray(_noise(TILE, TILE)),
    "one_pixel": lambda: PIL.Image.fromarray(_noise(1, 1)),
    "extreme_8000x100": lambda: PIL.Image.fromarray(_noise(100, 8000)),
    "extreme_100x8000": lambda: PIL.Image.fromarray(_noise(8000, 100)),
    "grayscale_L": lambda: PIL.Image.fromarray(_noise(50, 70, channels=1)),
    "rgba": lambda: PIL.Image.fromarray(_noise(50, 70, channels=4)),
    "la": lambda: PIL.Image.fromarray(_noise(50, 70, channels=4)).convert("LA"),
    "palette_P": lambda: PIL.Image.fromarray(_noise(60, 60)).convert("P"),
    "palette_transparency": _palette_with_transparency,
    "cmyk": lambda: PIL.Image.fromarray(_noise(60, 90)).convert("CMYK"),
    "16bit_I;16": lambda: PIL.Image.fromarray(_noise(60, 80, channels=1, dtype=np.uint16, high=65536)),
    "16bit_I;16_low_values": lambda: PIL.Image.fromarray(_noise(60, 80, channels=1, dtype=np.uint16, high=300)),
}


def _assert_same(ours, reference):
    assert ours["pixel_values"].dtype == np.float32
    assert ours["pixel_values"].shape == np.asarray(reference["pixel_values"]).shape
    assert np.abs(ours["pixel_values"] - np.asarray(reference["pixel_values"])).max() <= TOLERANCE
    np.testing.assert_array_equal(ours["aspect_ratio_ids"], np.asarray(reference["aspect_ratio_ids"]))
    np.testing.assert_array_equal(ours["aspect_ratio_mask"], np.asarray(reference["aspect_ratio_mask"]))
    assert ours["num_tiles"] == reference["num_tiles"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_transformers(case):
    image = CASES[case]()
    ours = MllamaImageProcessor(size=TILE)(image)
    _assert_same(ours, _reference()(image))
    # The uint8 path normalised on the device gives the same floats.
    raw = MllamaImageProcessor(size=TILE)(image, return_uint8=True)
    assert raw["pixel_values"].dtype == np.uint8
    on_device = normalize_on_device(
        raw["pixel_values"],
        CLIP_MEAN,
        CLIP_STD,
        1 / 255,
        aspect_ratio_ids=raw["aspect_ratio_ids"],
        aspect_ratio_mask=raw["aspect_ratio_mask"],
    )
    assert np.abs(np.asarray(on_device) - ours["pixel_values"]).max() <= TOLERANCE


def test_matches_transformers_at_llama_defaults():
    image = PIL.Image.fromarray(_noise(700, 900, seed=5))  # → 2 x 2 tiles of 560
    ours = MllamaImageProcessor()(image)
    assert ours["pixel_values"].shape == (1, 1, 4, 3, 560, 560) and ours["num_tiles"] == [[4]]
    _assert_same(ours, _reference(tile_size=560)(image))


def test_batch_with_different_image_counts():
    batch = [
        [PIL.Image.fromarray(_noise(40, 100, seed=1)), PIL.Image.fromarray(_noise(100, 40, seed=2))],
        [PIL.Image.fromarray(_noise(60, 60, seed=3))],
        [PIL.Image.fromarray(_noise(20, 170, seed=4)), _noise(33, 44, seed=5)],  # numpy input too
    ]
    ours = MllamaImageProcessor(size=TILE)(batch)
    _assert_same(ours, _reference()(batch))
    assert ours["pixel_values"].shape[:3] == (3, 2, 4)
    assert ours["aspect_ratio_ids"][1, 1] == 0  # padding image
    assert not ours["pixel_values"][1, 1].any()

    raw = MllamaImageProcessor(size=TILE)(batch, return_uint8=True)
    masked = normalize_on_device(
        raw["pixel_values"], aspect_ratio_ids=raw["aspect_ratio_ids"], aspect_ratio_mask=raw["aspect_ratio_mask"]
    )
    assert np.abs(np.asarray(masked) - ours["pixel_values"]).max() <= TOLERANCE
    # Without the masks, padding tiles come out as the normalised black pixel, -mean / std.
    unmasked = np.asarray(normalize_on_device(raw["pixel_values"]))
    black = -np.asarray(CLIP_MEAN) / np.asarray(CLIP_STD)
    assert np.abs(unmasked[1, 1] - black[:, None, None]).max() < 1e-5


def test_flat_list_is_one_sample():
    images = [PIL.Image.fromarray(_noise(30, 30, seed=i)) for i in range(3)]
    out = MllamaImageProcessor(size=TILE)(images)
    assert out["pixel_values"].shape[:2] == (1, 3) and out["num_tiles"] == [[1, 1, 1]]


@pytest.mark.parametrize("max_image_tiles", [1, 2, 4, 6])
def test_canvas_and_fit_match_transformers(max_image_tiles):
    sizes = [1, 7, 28, 55, 56, 57, 100, 111, 112, 113, 150, 168, 224, 300, 1000]
    for height in sizes:
        for width in sizes:
            rows, cols = choose_canvas(height, width, max_image_tiles, TILE)
            canvas = tuple(int(v) for v in get_optimal_tiled_canvas(height, width, max_image_tiles, TILE))
            assert (rows * TILE, cols * TILE) == canvas, (height, width)
            reference = get_image_size_fit_to_canvas(height, width, canvas[0], canvas[1], TILE)
            assert fit_size(height, width, *canvas, TILE) == tuple(int(v) for v in reference), (height, width)


def test_supported_aspect_ratios_order():
    assert supported_aspect_ratios(4) == ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))


def test_tiles_are_row_major():
    # A 2 x 2 canvas of constant quadrants: tile k must be quadrant k in reading order.
    quadrants = np.zeros((2 * TILE, 2 * TILE, 3), np.uint8)
    for k, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        quadrants[r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE] = 10 * (k + 1)
    out = MllamaImageProcessor(size=TILE)(quadrants, return_uint8=True)
    assert out["aspect_ratio_ids"][0, 0] == supported_aspect_ratios(4).index((2, 2)) + 1
    for k in range(4):
        assert (out["pixel_values"][0, 0, k] == 10 * (k + 1)).all()


def test_from_pretrained_reads_the_config(tmp_path):
    config = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_pad": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.4, 0.3],
        "image_std": [0.2, 0.25, 0.3],
        "image_processor_type": "MllamaImageProcessor",
        "max_image_tiles": 2,
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"height": 28, "width": 28},
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    ours = MllamaImageProcessor.from_pretrained(tmp_path)
    assert (ours.tile_size, ours.max_image_tiles, ours.resample) == (28, 2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = MllamaImageProcessorPil.from_pretrained(tmp_path)
    image = PIL.Image.fromarray(_noise(45, 70, seed=9))
    _assert_same(ours(image), reference(image))
    ours.save_pretrained(tmp_path / "copy")
    assert MllamaImageProcessor.from_pretrained(tmp_path / "copy").to_dict() == ours.to_dict()


def test_unreadable_images_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"definitely not a jpeg")
    with pytest.raises(ValueError, match="corrupt.jpg"):
        MllamaImageProcessor(size=TILE)(str(corrupt))
    buffer = io.BytesIO()
    PIL.Image.fromarray(_noise(64, 64)).save(buffer, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[:200])
    with pytest.raises(ValueError, match="truncated.png"):
        load_image(truncated)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="<image bytes>"):
        load_image(b"\x89PNG nonsense")
    # Readable files work through the same path.
    good = tmp_path / "good.png"
    PIL.Image.fromarray(_noise(20, 30)).save(good)
    assert MllamaImageProcessor(size=TILE)(str(good))["num_tiles"] == [[1]]


def test_bad_arrays_and_config_rejected():
    with pytest.raises(ValueError, match="image 0 of sample 0: numpy images must be uint8"):
        MllamaImageProcessor(size=TILE)(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        MllamaImageProcessor(size=TILE)(np.zeros((10, 10, 5), np.uint8))
    with pytest.raises(ValueError, match="square"):
        MllamaImageProcessor(size={"height": 10, "width": 20})
    with pytest.raises(ValueError, match="mode L is not RGB"):
        MllamaImageProcessor(size=TILE, do_convert_rgb=False)(PIL.Image.new("L", (5, 5)))
