"""LLaVA-1.5 image preprocessing in numpy + PIL: one square image of `size` pixels per image.

Two ways to make an image square, both ending in CLIP's resize (shortest edge, bicubic), centre crop, rescale and
normalise:
- "pad" (LLaVA-1.5's `image_aspect_ratio = pad`, what the released models trained with): the image is first
  centred on a square canvas of its longer side filled with the mean colour (the mean in 8-bit, truncated), so
  nothing is cut off;
- "crop" (the llava-hf processor on the Hub, transformers' CLIPImageProcessor): resize the shortest edge, then
  cut the centre square.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import PIL.Image

from llava_cot_jax.data.image import CLIP_MEAN, CLIP_STD, DEFAULT_RESCALE_FACTOR, _as_pil, nest_images, to_rgb

MODES = ("pad", "crop")


class LlavaImageProcessor:
    """Square CLIP inputs for LLaVA-1.5; `__call__` returns {"pixel_values": [batch, images, 3, size, size]}
    float32 (missing images of a shorter row stay 0)."""

    def __init__(
        self,
        size: int = 336,
        mode: str = "pad",
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        rescale_factor: float = DEFAULT_RESCALE_FACTOR,
        resample: int = PIL.Image.Resampling.BICUBIC,
        patch_size: int = 14,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if len(image_mean) != 3 or len(image_std) != 3:
            raise ValueError("image_mean and image_std need one value per RGB channel")
        self.size, self.mode = int(size), mode
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)
        self.rescale_factor = float(rescale_factor)
        self.resample = PIL.Image.Resampling(resample)
        self.patch_size = int(patch_size)

    @property
    def image_size(self) -> int:
        """The side of the squares the vision tower takes."""
        return self.size

    @property
    def image_tokens(self) -> int:
        """Image tokens per image in the prompt: one per patch of the vision tower (its class token dropped)."""
        return (self.size // self.patch_size) ** 2

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, mode: str = "pad") -> LlavaImageProcessor:
        """From a CLIPImageProcessor `preprocessor_config.json` (llava-hf's, or the CLIP checkpoint's)."""
        path = os.path.join(directory, "preprocessor_config.json")
        with open(path) as f:
            d = json.load(f)
        crop, shortest = d.get("crop_size", {}), d.get("size", {})
        crop = crop if isinstance(crop, dict) else {"height": crop, "width": crop}
        shortest = shortest.get("shortest_edge") if isinstance(shortest, dict) else shortest
        if crop.get("height") != crop.get("width") or (shortest and shortest != crop.get("height")):
            raise ValueError(f"{path}: expected a square crop equal to the shortest edge, got {d}")
        return cls(
            size=crop["height"],
            mode=mode,
            image_mean=d.get("image_mean", CLIP_MEAN),
            image_std=d.get("image_std", CLIP_STD),
            rescale_factor=d.get("rescale_factor", DEFAULT_RESCALE_FACTOR),
            resample=d.get("resample", PIL.Image.Resampling.BICUBIC),
        )

    def to_dict(self) -> dict:
        return {
            "image_processor_type": "CLIPImageProcessor",
            "size": {"shortest_edge": self.size},
            "crop_size": {"height": self.size, "width": self.size},
            "do_resize": True,
            "do_center_crop": True,
            "do_rescale": True,
            "do_normalize": True,
            "do_convert_rgb": True,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "rescale_factor": self.rescale_factor,
            "resample": int(self.resample),
        }

    def pad_to_square(self, image: PIL.Image.Image) -> PIL.Image.Image:
        """`image` centred on a square of its longer side, the rest in the mean colour."""
        width, height = image.size
        if width == height:
            return image
        side = max(width, height)
        fill = tuple(int(m * 255) for m in self.image_mean)
        canvas = PIL.Image.new(image.mode, (side, side), fill)
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))
        return canvas

    def square(self, image, where: str = "image") -> np.ndarray:
        """One image -> its [size, size, 3] uint8 pixels (before rescaling and normalising)."""
        image = to_rgb(_as_pil(image, where))
        if self.mode == "pad":
            image = self.pad_to_square(image)
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_long = int(self.size * long / short)
        new_size = (self.size, new_long) if width <= height else (new_long, self.size)
        image = image.resize(new_size, resample=self.resample)
        top, left = (image.size[1] - self.size) // 2, (image.size[0] - self.size) // 2
        return np.asarray(image.crop((left, top, left + self.size, top + self.size)), np.uint8)

    def normalize(self, uint8_pixels: np.ndarray) -> np.ndarray:
        """[..., H, W, 3] uint8 -> [..., 3, H, W] float32, rescaled and normalised."""
        x = uint8_pixels.astype(np.float32) * np.float32(self.rescale_factor)
        x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return np.moveaxis(x, -1, -3)

    def __call__(self, images) -> dict:
        nested = nest_images(images)
        most = max((len(row) for row in nested), default=0)
        out = np.zeros((len(nested), most, 3, self.size, self.size), np.float32)
        for b, row in enumerate(nested):
            for i, image in enumerate(row):
                out[b, i] = self.normalize(self.square(image, where=f"image {i} of sample {b}"))
        return {"pixel_values": out}
