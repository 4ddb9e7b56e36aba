"""`LlavaProcessor`: text + images -> the numpy inputs of the llava family, under transformers' names.

As transformers' LlavaProcessor does, each `<image>` in the text becomes one `<image>` token per image feature
(576 for CLIP-L/14 at 336 px), so the model splices the features in place. Pixel values are per prompt row,
[batch, images, 3, H, W] (transformers flattens them to [images, 3, H, W]; the model takes either).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from llava_cot_jax.data import chat, vicuna
from llava_cot_jax.data.image import nest_images
from llava_cot_jax.data.llava_image import LlavaImageProcessor


class LlavaProcessor:
    """A Llama-2 tokenizer (transformers fast tokenizer with `<image>`) and `LlavaImageProcessor`."""

    def __init__(self, image_processor: LlavaImageProcessor, tokenizer, system: str = ""):
        self.image_processor, self.tokenizer, self.system = image_processor, tokenizer, system
        self.image_tokens = image_processor.image_tokens
        self.image_token = vicuna.IMAGE
        self.image_token_id = tokenizer.convert_tokens_to_ids(vicuna.IMAGE)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {vicuna.IMAGE} token")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, image_mode: str = "pad") -> LlavaProcessor:
        """Tokenizer files and preprocessor_config.json of a local llava-hf directory."""
        from transformers import AutoTokenizer

        if not os.path.isdir(directory):
            raise FileNotFoundError(f"checkpoint directory not found: {directory}")
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(directory), local_files_only=True)
        return cls(LlavaImageProcessor.from_pretrained(directory, mode=image_mode), tokenizer)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        import json

        self.tokenizer.save_pretrained(directory)
        with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
            json.dump(self.image_processor.to_dict(), f, indent=2)

    def __call__(
        self,
        images=None,
        text: str | Sequence[str] | None = None,
        *,
        padding: bool | str = False,
        bos: str = chat.DEFAULT_BOS,
    ) -> dict:
        """Tokenise `text` (one string or a batch; `<image>` where each image goes) and preprocess `images` (one
        image, the images of one sample, or a list per sample). `bos`: "transformers" and "once" both give the one
        `<s>` a Llama-2 tokenizer adds (as transformers' LlavaProcessor does), "none" none. Returns input_ids,
        attention_mask [B, L] int64 and pixel_values [B, I, 3, H, W] float32."""
        if text is None and images is None:
            raise ValueError("give text, images or both")
        if bos not in chat.BOS_MODES:
            raise ValueError(f"bos must be one of {chat.BOS_MODES}, got {bos!r}")
        outputs = {}
        batch_images = nest_images(images) if images is not None else None
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not texts or not all(isinstance(t, str) for t in texts):
                raise ValueError("text must be a string or a non-empty list of strings")
            in_text = [t.count(vicuna.IMAGE) for t in texts]
            given = [len(sample) for sample in batch_images] if batch_images is not None else [0] * len(texts)
            if in_text != given:
                raise ValueError(
                    f"each text needs one {vicuna.IMAGE} per image of its sample: found {in_text} markers and "
                    f"{given} images per sample"
                )
            wide = [t.replace(vicuna.IMAGE, vicuna.IMAGE * self.image_tokens) for t in texts]
            encoding = self.tokenizer(wide, padding=padding, add_special_tokens=bos != "none")
            lengths = {len(ids) for ids in encoding["input_ids"]}
            if len(lengths) > 1:
                raise ValueError(f"texts tokenise to different lengths {sorted(lengths)}; pass padding=True")
            outputs["input_ids"] = np.asarray(encoding["input_ids"], np.int64)
            outputs["attention_mask"] = np.asarray(encoding["attention_mask"], np.int64)
        if batch_images is not None:
            outputs.update(self.image_processor(batch_images))
        return outputs

    def apply_chat_template(self, conversations: Sequence[Mapping], add_generation_prompt: bool = True, **kwargs):
        """`vicuna.render_prompt` with this processor's system sentence; LLaVA records or chat messages."""
        has_image = kwargs.pop("has_image", None)
        if has_image is None:
            has_image = any(
                isinstance(m.get("content"), list) and any(p.get("type") == "image" for p in m["content"])
                for m in conversations
            )
        kwargs.setdefault("system", self.system)
        return vicuna.render_prompt(conversations, has_image, add_generation_prompt=add_generation_prompt, **kwargs)

    # The family prompt hook (see MllamaProcessor.render_prompt): Vicuna v1, `<image>\n` leading the user turn.
    mcq_instruction = vicuna.MCQ_ANSWER  # LLaVA-1.5's multiple-choice line, which the eval harness asks with

    def render_prompt(self, messages: Sequence[Mapping]) -> str:
        """The prompt text asking for the assistant's reply to chat `messages`: `apply_chat_template`."""
        return self.apply_chat_template(messages, add_generation_prompt=True)

    def encode_prompt(self, text: str, bos: str = chat.DEFAULT_BOS) -> list[int]:
        """Token ids of a rendered prompt as the model reads it: each `<image>` widened to its feature count, the
        BOS of `bos` (see `__call__`)."""
        if bos not in chat.BOS_MODES:
            raise ValueError(f"bos must be one of {chat.BOS_MODES}, got {bos!r}")
        wide = text.replace(vicuna.IMAGE, vicuna.IMAGE * self.image_tokens)
        return list(self.tokenizer(wide, add_special_tokens=bos != "none")["input_ids"])

    def decode(self, token_ids, **kwargs) -> str:
        return self.tokenizer.decode(np.asarray(token_ids).tolist(), **kwargs)

    def batch_decode(self, sequences, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(np.asarray(sequences).tolist(), **kwargs)
