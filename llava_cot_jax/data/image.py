"""Mllama image preprocessing in numpy + PIL: pick a tile canvas, resize, pad, normalise, cut into tiles.

Matches transformers' MllamaImageProcessor (PIL backend, which is also transformers 4.45's behaviour):

1. Convert to RGB; transparency is composited onto white.
2. Choose the canvas (rows x cols tiles, rows*cols <= max_image_tiles) that needs the smallest upscale, or,
   if every canvas needs a downscale, the largest one; ties go to the smaller canvas.
3. Resize with PIL (bilinear by default) keeping the aspect ratio, to at least one tile and at most the canvas.
4. Pad bottom/right with zeros to the canvas.
5. Rescale (x * 1/255) and normalise ((x - mean) / std) in float32.
6. Split into row-major tiles and pack to [batch, images, max_image_tiles, 3, H, W]; missing tiles and images
   stay 0.

Steps 1-4 run on uint8 pixels (PIL resizes the 8-bit image), so rescaling and normalising can move to the
accelerator: `return_uint8=True` returns the padded tiles as uint8 (4x fewer bytes to ship) and
`normalize_on_device` finishes the job there, equal to the float path within float32 rounding.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import PIL.Image

# Llama-3.2-Vision's preprocessor_config.json values (OpenAI CLIP mean/std, 560-px tiles, bilinear).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_TILE_SIZE = 560
DEFAULT_MAX_IMAGE_TILES = 4
DEFAULT_RESCALE_FACTOR = 1 / 255
# The largest image (width x height) decoded, checked from its header before any pixel is: PIL's own
# decompression-bomb limit (about 89 megapixels), a 9500 x 9500 photo, far above the 4 tiles of 560 the model sees.
# PIL is set to the same value, so its own check (which warns below twice the limit) agrees.
MAX_IMAGE_PIXELS = 89_478_485
PIL.Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


@lru_cache(maxsize=16)
def supported_aspect_ratios(max_image_tiles: int) -> tuple[tuple[int, int], ...]:
    """Tile grids (rows, cols) with rows * cols <= max_image_tiles, in the order Mllama numbers them.

    `aspect_ratio_id = supported_aspect_ratios(n).index((rows, cols)) + 1` (0 marks a padding image).
    """
    return tuple(
        (rows, cols)
        for rows in range(1, max_image_tiles + 1)
        for cols in range(1, max_image_tiles + 1)
        if rows * cols <= max_image_tiles
    )


def choose_canvas(height: int, width: int, max_image_tiles: int, tile_size: int) -> tuple[int, int]:
    """The (rows, cols) tile grid an image of `height` x `width` pixels is fitted into."""
    grids = np.array(supported_aspect_ratios(max_image_tiles))
    # The scale that fits the image in each canvas is limited by the tighter side.
    scales = np.minimum(grids[:, 0] * tile_size / height, grids[:, 1] * tile_size / width)
    upscales = scales[scales >= 1]
    best = upscales.min() if upscales.size else scales.max()
    candidates = grids[scales == best]
    rows, cols = candidates[np.argmin(candidates[:, 0] * candidates[:, 1])]
    return int(rows), int(cols)


def fit_size(height: int, width: int, canvas_height: int, canvas_width: int, tile_size: int) -> tuple[int, int]:
    """Size (h, w) to resize to: aspect ratio kept, each side clamped to [tile_size, canvas side] first."""
    target_height = min(max(height, tile_size), canvas_height)
    target_width = min(max(width, tile_size), canvas_width)
    scale_height, scale_width = target_height / height, target_width / width
    if scale_width < scale_height:  # width is the binding side
        return min(int(height * scale_width) or 1, target_height), target_width
    return target_height, min(int(width * scale_height) or 1, target_width)


class ImageTooLarge(ValueError):
    """An image over the pixel budget: refused before it is decoded."""


def load_image(source, max_pixels: int = MAX_IMAGE_PIXELS) -> PIL.Image.Image:
    """Open a path, raw bytes or file object as a decoded PIL image (errors name the file); an image of more than
    `max_pixels` pixels raises ImageTooLarge before it is decoded."""
    if isinstance(source, PIL.Image.Image):
        return source
    if isinstance(source, (bytes, bytearray)):
        name, opener = "<image bytes>", lambda: io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        name, opener = os.fspath(source), lambda: open(source, "rb")
    elif hasattr(source, "read"):
        name, opener = getattr(source, "name", "<image file object>"), lambda: source
    else:
        raise TypeError(f"cannot read an image from {type(source).__name__}")
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        raise IsADirectoryError(f"image {name} is a directory: pass an image file")
    try:
        with PIL.Image.open(opener()) as image:
            width, height = image.size
            if width * height > max_pixels:  # known from the header: nothing is decoded yet
                raise ImageTooLarge(
                    f"image {name} is {width} x {height} = {width * height:,} pixels, over the pixel budget of "
                    f"{max_pixels:,}: downscale it"
                )
            image.load()  # decode now, so a truncated file fails here and names itself
            return image
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {name}") from None
    except ImageTooLarge:
        raise
    except PIL.Image.DecompressionBombError as e:
        raise ImageTooLarge(f"image {name} is over the pixel budget of {MAX_IMAGE_PIXELS:,} ({e}): downscale it") from e
    except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot decode image {name}: {e}; pass a PNG, JPEG, GIF, BMP or WebP file") from e


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """RGB version of `image`; transparent pixels are composited onto white (not black, as convert() would)."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _as_pil(image, where: str) -> PIL.Image.Image:
    if isinstance(image, PIL.Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"{where}: numpy images must be uint8 (H, W[, C]), got {image.dtype}")
        if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
            image = np.moveaxis(image, 0, -1)  # channels-first input
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
            raise ValueError(f"{where}: expected an (H, W), (H, W, 3) or (H, W, 4) array, got shape {image.shape}")
        return PIL.Image.fromarray(image)
    try:
        return load_image(image)
    except TypeError:
        raise TypeError(f"{where}: unsupported image type {type(image).__name__}") from None


def nest_images(images) -> list[list]:
    """Images as a list (batch) of lists (images of one sample).

    A single image is one sample with one image; a flat list is ONE sample with several images (as in
    transformers); a list of lists is a batch.
    """
    if isinstance(images, (list, tuple)):
        if images and all(isinstance(sample, (list, tuple)) for sample in images):
            return [list(sample) for sample in images]
        if any(isinstance(sample, (list, tuple)) for sample in images):
            raise ValueError("mix of images and lists of images: pass one image, a list, or a list of lists")
        return [list(images)]
    return [[images]]


class MllamaImageProcessor:
    """Tiles images for Mllama; `__call__` returns numpy arrays under transformers' keys.

    Defaults are Llama-3.2-Vision's preprocessor config (560-px tiles, at most 4, CLIP mean/std, bilinear).
    """

    def __init__(
        self,
        size: int | dict = DEFAULT_TILE_SIZE,
        max_image_tiles: int = DEFAULT_MAX_IMAGE_TILES,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        rescale_factor: float = DEFAULT_RESCALE_FACTOR,
        resample: int = PIL.Image.Resampling.BILINEAR,
        do_convert_rgb: bool = True,
        do_rescale: bool = True,
        do_normalize: bool = True,
    ):
        if isinstance(size, dict):
            if size.get("height") != size.get("width") or not size.get("height"):
                raise ValueError(f"size must be square {{'height': n, 'width': n}}, got {size}")
            size = size["height"]
        if not isinstance(max_image_tiles, int) or max_image_tiles <= 0:
            raise ValueError(f"max_image_tiles must be a positive int, got {max_image_tiles!r}")
        if len(image_mean) != 3 or len(image_std) != 3:
            raise ValueError("image_mean and image_std need one value per RGB channel")
        self.tile_size = int(size)
        self.max_image_tiles = max_image_tiles
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)
        self.rescale_factor = float(rescale_factor)
        self.resample = PIL.Image.Resampling(resample)
        self.do_convert_rgb = do_convert_rgb
        self.do_rescale = do_rescale
        self.do_normalize = do_normalize

    @property
    def image_size(self) -> int:
        """The side of the squares the vision tower takes (one tile)."""
        return self.tile_size

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> MllamaImageProcessor:
        """Read `preprocessor_config.json` (Hugging Face format) from a checkpoint directory."""
        path = os.path.join(directory, "preprocessor_config.json")
        try:
            with open(path) as f:
                config = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"no preprocessor_config.json in {directory}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON: {e}") from e
        for flag in ("do_resize", "do_pad"):
            if config.get(flag) is False:
                raise ValueError(f"{path}: Mllama needs {flag}=true")
        keys = ("size", "max_image_tiles", "image_mean", "image_std", "rescale_factor", "resample")
        keys += ("do_convert_rgb", "do_rescale", "do_normalize")
        return cls(**{key: config[key] for key in keys if key in config})

    def to_dict(self) -> dict:
        """The preprocessor_config.json content transformers reads."""
        return {
            "image_processor_type": "MllamaImageProcessor",
            "size": {"height": self.tile_size, "width": self.tile_size},
            "max_image_tiles": self.max_image_tiles,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "rescale_factor": self.rescale_factor,
            "resample": int(self.resample),
            "do_convert_rgb": self.do_convert_rgb,
            "do_rescale": self.do_rescale,
            "do_normalize": self.do_normalize,
            "do_resize": True,
            "do_pad": True,
        }

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    def tile_image(self, image, where: str = "image") -> tuple[np.ndarray, tuple[int, int]]:
        """One image → (uint8 tiles [rows*cols, 3, tile, tile], (rows, cols))."""
        image = _as_pil(image, where)
        if self.do_convert_rgb:
            image = to_rgb(image)
        elif image.mode != "RGB":
            raise ValueError(f"{where}: mode {image.mode} is not RGB and do_convert_rgb is False")
        width, height = image.size
        rows, cols = choose_canvas(height, width, self.max_image_tiles, self.tile_size)
        new_height, new_width = fit_size(height, width, rows * self.tile_size, cols * self.tile_size, self.tile_size)
        resized = np.asarray(image.resize((new_width, new_height), resample=self.resample))
        canvas = np.zeros((rows * self.tile_size, cols * self.tile_size, 3), dtype=np.uint8)
        canvas[:new_height, :new_width] = resized
        tiles = canvas.reshape(rows, self.tile_size, cols, self.tile_size, 3).transpose(0, 2, 4, 1, 3)
        return np.ascontiguousarray(tiles.reshape(rows * cols, 3, self.tile_size, self.tile_size)), (rows, cols)

    def normalize(self, uint8_pixels: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rescale and normalise uint8 pixels [..., 3, H, W] to float32 (numpy twin of normalize_on_device).

        Works in place on one float32 array (`out` if given, e.g. a slot of the batch array, else a new one), so a
        4-tile sample makes no full-size temporaries. Same float32 operations in the same order as
        `(x * rescale - mean) / std`, so the result is bit-identical to that expression.
        """
        if out is None:
            pixels = uint8_pixels.astype(np.float32)
        else:
            pixels = out
            pixels[...] = uint8_pixels
        if self.do_rescale:
            pixels *= np.float32(self.rescale_factor)
        if self.do_normalize:
            pixels -= np.asarray(self.image_mean, np.float32)[:, None, None]
            pixels /= np.asarray(self.image_std, np.float32)[:, None, None]
        return pixels

    def __call__(self, images, return_uint8: bool = False) -> dict:
        """Process one image, a list of images (one sample) or a list of lists (a batch).

        Returns {"pixel_values" [B, I, T, 3, H, W] float32 (uint8 with `return_uint8`),
        "aspect_ratio_ids" [B, I] int64, "aspect_ratio_mask" [B, I, T] int64, "num_tiles" list[list[int]]}
        where I is the most images in any sample and T = max_image_tiles.
        """
        batch = nest_images(images)
        if not any(batch):
            raise ValueError("no images given")
        max_images = max(len(sample) for sample in batch)
        shape = (len(batch), max_images, self.max_image_tiles, 3, self.tile_size, self.tile_size)
        pixel_values = np.zeros(shape, dtype=np.uint8 if return_uint8 else np.float32)
        aspect_ratio_ids = np.zeros((len(batch), max_images), dtype=np.int64)
        aspect_ratio_mask = np.zeros((len(batch), max_images, self.max_image_tiles), dtype=np.int64)
        # Mllama marks the first tile of every image slot, padding images included.
        aspect_ratio_mask[:, :, 0] = 1
        grids = supported_aspect_ratios(self.max_image_tiles)
        num_tiles = []
        for b, sample in enumerate(batch):
            sample_tiles = []
            for i, image in enumerate(sample):
                tiles, grid = self.tile_image(image, where=f"image {i} of sample {b}")
                if return_uint8:
                    pixel_values[b, i, : len(tiles)] = tiles
                else:
                    self.normalize(tiles, out=pixel_values[b, i, : len(tiles)])
                aspect_ratio_ids[b, i] = grids.index(grid) + 1
                aspect_ratio_mask[b, i, : len(tiles)] = 1
                sample_tiles.append(len(tiles))
            num_tiles.append(sample_tiles)
        return {
            "pixel_values": pixel_values,
            "aspect_ratio_ids": aspect_ratio_ids,
            "aspect_ratio_mask": aspect_ratio_mask,
            "num_tiles": num_tiles,
        }

    preprocess = __call__


def normalize_on_device(
    uint8_tiles,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    rescale_factor: float = DEFAULT_RESCALE_FACTOR,
    *,
    aspect_ratio_ids=None,
    aspect_ratio_mask=None,
    dtype=None,
):
    """Finish preprocessing on the accelerator: uint8 [..., 3, H, W] → (x * rescale_factor - mean) / std.

    Resizing and padding already happened on uint8 pixels on the host, so this equals the float path of
    `MllamaImageProcessor` to float32 rounding (~1e-6). Padding tiles hold zeros there; pass the batch's
    `aspect_ratio_ids` and `aspect_ratio_mask` (the [B, I, T] layout) to zero them here too, otherwise they come
    out as -mean/std (which the model masks out anyway). `dtype` casts the result (e.g. jnp.bfloat16).
    """
    import jax.numpy as jnp  # the host-side pipeline does not need jax

    pixels = jnp.asarray(uint8_tiles).astype(jnp.float32) * jnp.float32(rescale_factor)
    pixels = (pixels - jnp.asarray(mean, jnp.float32)[:, None, None]) / jnp.asarray(std, jnp.float32)[:, None, None]
    if (aspect_ratio_ids is None) != (aspect_ratio_mask is None):
        raise ValueError("pass both aspect_ratio_ids and aspect_ratio_mask, or neither")
    if aspect_ratio_ids is not None:
        real_tiles = (jnp.asarray(aspect_ratio_mask) > 0) & (jnp.asarray(aspect_ratio_ids) > 0)[..., None]
        pixels = jnp.where(real_tiles[..., None, None, None], pixels, 0.0)
    return pixels if dtype is None else pixels.astype(dtype)
