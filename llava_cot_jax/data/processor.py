"""`MllamaProcessor`: text + images → the numpy inputs the model takes, under transformers' names.

With default arguments the output equals transformers' `MllamaProcessor` on the same inputs: the same BOS
rule (prepend `<|begin_of_text|>` unless the text contains one, after any leading `<|image|>` tokens, and let
the tokenizer add its own), the same tiles and the same cross-attention mask. A chat prompt rendered with
`apply_chat_template` therefore gets two BOS tokens, as LLaVA-CoT's training and inference gave it; `bos="once"`
or `bos="none"` give one or none — see `chat` (`chat.apply_bos` holds the rule).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from llava_cot_jax.data import chat
from llava_cot_jax.data.image import MllamaImageProcessor, nest_images


class MllamaProcessor:
    """Pairs a Llama-3 tokenizer (a transformers fast tokenizer) with `MllamaImageProcessor`."""

    def __init__(self, image_processor: MllamaImageProcessor, tokenizer):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_token = chat.IMAGE
        self.image_token_id = tokenizer.convert_tokens_to_ids(chat.IMAGE)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {chat.IMAGE} token")
        self.bos_token = chat.BOS
        self.bos_token_id = tokenizer.convert_tokens_to_ids(chat.BOS)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> MllamaProcessor:
        """Load tokenizer files and preprocessor_config.json from a local checkpoint directory."""
        from transformers import AutoTokenizer

        if not os.path.isdir(directory):
            raise FileNotFoundError(f"checkpoint directory not found: {directory}")
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(directory), local_files_only=True)
        return cls(MllamaImageProcessor.from_pretrained(directory), tokenizer)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)

    def __call__(
        self,
        images=None,
        text: str | Sequence[str] | None = None,
        *,
        padding: bool | str = False,
        truncation: bool | None = None,
        max_length: int | None = None,
        add_special_tokens: bool = True,
        bos: str = chat.DEFAULT_BOS,
        return_uint8: bool = False,
    ) -> dict:
        """Tokenise `text` (one string or a batch) with `<|image|>` markers and tile `images`.

        `images`: one image, a list (the images of ONE sample) or a list of lists (per sample), in the order
        their `<|image|>` markers appear. `bos`: "transformers" (default, as above), "once" (exactly one
        leading BOS; the tokenizer adds none) or "none"; `add_special_tokens` applies in the "transformers" mode
        only. `return_uint8` returns uint8 pixel values for `image.normalize_on_device`.

        Returns numpy arrays: input_ids, attention_mask [B, L] int64; pixel_values [B, I, T, 3, H, W];
        aspect_ratio_ids [B, I]; aspect_ratio_mask [B, I, T]; cross_attention_mask [B, L, I, T] int64 (when both
        text and images are given).
        """
        if text is None and images is None:
            raise ValueError("give text, images or both")
        outputs = {}
        batch_images = nest_images(images) if images is not None else None

        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not texts or not all(isinstance(t, str) for t in texts):
                raise ValueError("text must be a string or a non-empty list of strings")
            with_bos = [chat.apply_bos(t, bos) for t in texts]
            texts = [t for t, _ in with_bos]
            add_special_tokens = add_special_tokens and with_bos[0][1]  # only "transformers" lets the tokenizer add BOS
            if batch_images is not None:
                in_text = [t.count(chat.IMAGE) for t in texts]
                given = [len(sample) for sample in batch_images]
                if in_text != given:
                    raise ValueError(
                        f"each text needs one {chat.IMAGE} per image of its sample: found {in_text} markers "
                        f"and {given} images per sample"
                    )
            encoding = self.tokenizer(
                texts,
                padding=padding,
                truncation=truncation,
                max_length=max_length,
                add_special_tokens=add_special_tokens,
            )
            lengths = {len(ids) for ids in encoding["input_ids"]}
            if len(lengths) > 1:
                raise ValueError(f"texts tokenise to different lengths {sorted(lengths)}; pass padding=True")
            outputs["input_ids"] = np.asarray(encoding["input_ids"], dtype=np.int64)
            outputs["attention_mask"] = np.asarray(encoding["attention_mask"], dtype=np.int64)

        if batch_images is not None:
            image_outputs = self.image_processor(batch_images, return_uint8=return_uint8)
            num_tiles = image_outputs.pop("num_tiles")
            outputs.update(image_outputs)
            if text is not None:
                max_images = outputs["pixel_values"].shape[1]
                outputs["cross_attention_mask"] = np.stack(
                    [
                        chat.cross_attention_mask(
                            ids, self.image_token_id, tiles, max_images, self.image_processor.max_image_tiles
                        )
                        for ids, tiles in zip(outputs["input_ids"], num_tiles)
                    ]
                )
        return outputs

    def apply_chat_template(
        self,
        messages: Sequence[dict],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        **render_kwargs,
    ):
        """`chat.render_prompt` (the Llama-3.2-Vision template); `tokenize=True` returns its token ids."""
        prompt = chat.render_prompt(messages, add_generation_prompt=add_generation_prompt, **render_kwargs)
        if tokenize:
            return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return prompt

    # The family prompt hook: every prompt the package builds (questions, judge prompts, eval rows, served chats)
    # is rendered and tokenised by the processor of the model's family, since the processor already owns the
    # tokenizer, the image marker and the BOS rule. LlavaProcessor answers the same three names.
    mcq_instruction = None  # the eval harness keeps VLMEvalKit's multiple-choice line (data/mcq_prompt.py)

    def render_prompt(self, messages: Sequence[dict]) -> str:
        """The prompt text asking for the assistant's reply to chat `messages` (images as `<|image|>`)."""
        return chat.render_prompt(messages)

    def encode_prompt(self, text: str, bos: str = chat.DEFAULT_BOS) -> list[int]:
        """Token ids of a rendered prompt as the model reads it, with the BOS tokens of `bos`."""
        return chat.encode_prompt(self.tokenizer, text, bos)

    def decode(self, token_ids, **kwargs) -> str:
        return self.tokenizer.decode(np.asarray(token_ids).tolist(), **kwargs)

    def batch_decode(self, sequences, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(np.asarray(sequences).tolist(), **kwargs)
