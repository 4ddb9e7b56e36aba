"""LLaVA-1.5's conversation formats, with training labels: Vicuna v1 for instruction tuning, `plain` for stage-1
captioning. The one home of both, for prompts and labels alike.

Vicuna v1 (LLaVA's `conv_vicuna_v1`, separator style TWO), a conversation of n rounds:

    [SYSTEM ]USER: QUESTION ASSISTANT: ANSWER</s>USER: QUESTION ASSISTANT: ANSWER</s>...
    ...USER: QUESTION ASSISTANT:                                   (add_generation_prompt)

The image is `<image>\\n` at the start of the first question (the processor widens `<image>` to one token per
image feature). Labels: each ANSWER and its `</s>` are trained on; the system sentence, the USER/ASSISTANT
markers, the questions and the image are not (LLaVA's `preprocess_v1`). LLaVA-1.5 trained with Vicuna's system
sentence in front; it is the `system` argument here, empty by default as llava-hf's chat template renders it, and
configs that reproduce the original training pass it (docs/llava.md).

plain (LLaVA's `conv_llava_plain`, stage 1): `<image>` then the caption and a newline; only the caption and newline
are trained on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from llava_cot_jax.data.chat import IGNORE_INDEX, to_messages

IMAGE = "<image>"
EOS = "</s>"
TEMPLATES = ("vicuna_v1", "plain")
# LLaVA-1.5's instruction for short answers on VQA data (its paper, section 3.2, "response format prompting").
SHORT_ANSWER = "Answer the question using a single word or phrase."
# LLaVA-1.5's instruction for multiple-choice questions (its evaluation scripts for MMBench, ScienceQA, SEED).
MCQ_ANSWER = "Answer with the option's letter from the given choices directly."


def _text(message: Mapping) -> str:
    return "".join(IMAGE + "\n" if p["type"] == "image" else p["text"] for p in message["content"])


def render_segments(
    conversations: Sequence[Mapping],
    has_image: bool,
    *,
    template: str = "vicuna_v1",
    system: str = "",
    add_generation_prompt: bool = False,
) -> list[tuple[str, bool]]:
    """The conversation as (text, trained-on) segments in order; their concatenation is the prompt."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, not {template!r}")
    messages = to_messages(conversations, has_image)
    if messages[0]["role"] == "system":
        system = _text(messages[0]).strip() or system
        messages = messages[1:]
    roles = [m["role"] for m in messages]
    expected = ["user", "assistant"] * (len(messages) // 2) + ["user"] * (len(messages) % 2)
    if roles != expected:
        raise ValueError(f"turns must alternate user/assistant starting with the user, got {roles}")
    if add_generation_prompt and roles[-1] != "user":
        raise ValueError("add_generation_prompt needs a conversation that ends with a user turn")

    if template == "plain":
        if len(messages) != 2 or not has_image:
            raise ValueError("the plain template takes one image, one (ignored) question and its caption")
        return [(IMAGE, False), (_text(messages[1]) + "\n", True)]

    segments = [(system + " ", False)] if system else []
    for message in messages:
        if message["role"] == "user":
            segments.append((f"USER: {_text(message)} ASSISTANT:", False))
        else:
            segments.append((" ", False))
            segments.append((_text(message) + EOS, True))
    if not add_generation_prompt and roles[-1] == "user":
        raise ValueError("a training conversation must end with an assistant turn")
    return segments


def render_prompt(conversations: Sequence[Mapping], has_image: bool, **kwargs) -> str:
    """The prompt text (`render_segments` joined); add `add_generation_prompt=True` to ask for an answer."""
    return "".join(text for text, _ in render_segments(conversations, has_image, **kwargs))


def encode_training_example(
    tokenizer,
    conversations: Sequence[Mapping],
    has_image: bool,
    *,
    image_tokens: int,
    template: str = "vicuna_v1",
    system: str = "",
) -> dict[str, np.ndarray]:
    """input_ids and labels [seq] int32 of one conversation, `<image>` widened to `image_tokens` tokens; the
    tokenizer adds its BOS. Tokens overlapping a trained-on segment are labelled with themselves, the rest
    IGNORE_INDEX, image tokens always IGNORE_INDEX."""
    segments = render_segments(conversations, has_image, template=template, system=system)
    segments = [(text.replace(IMAGE, IMAGE * image_tokens), trained) for text, trained in segments]
    text = "".join(t for t, _ in segments)
    encoding = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    spans, position = [], 0
    for segment, trained in segments:
        if trained:
            spans.append((position, position + len(segment)))
        position += len(segment)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    labels = [
        token if end > start and token != image_id and any(start < e and end > s for s, e in spans) else IGNORE_INDEX
        for token, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"])
    ]
    return {
        "input_ids": np.asarray(encoding["input_ids"], np.int32),
        "labels": np.asarray(labels, np.int32),
    }
