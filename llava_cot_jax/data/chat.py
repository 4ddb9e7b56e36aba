"""The Llama-3.2-Vision chat template and the LLaVA-CoT stage tags: the one home of both.

Training (labels), generation (prompts, stop tags) and the judge all render conversations through this
module, so the strings a model is trained on and prompted with cannot drift apart.

Rendering follows the official Llama-3.2-Vision Jinja template:

    <|begin_of_text|>[system block, only without images]
    <|start_header_id|>ROLE<|end_header_id|>\\n\\nCONTENT<|eot_id|>   (per message; images render as <|image|>)
    <|start_header_id|>assistant<|end_header_id|>\\n\\n               (add_generation_prompt)

The template puts a "Cutting Knowledge Date / Today Date" system block in front of text-only conversations
and refuses a system message next to an image; both rules are kept. The official template stamps today's
date; we default to its fallback date so that renders (and token ids) are reproducible.

BOS. transformers' MllamaProcessor prepends `<|begin_of_text|>` to a text lacking one, and a Llama-3 tokenizer
adds another one on `add_special_tokens=True`, so a templated prompt run through it starts with two BOS tokens.
LLaVA-CoT did exactly that in training (`train/datasets/cot_dataset.py`: `apply_chat_template`, then the processor
with its defaults) and in inference, judge prompts included (`inference/demo/simple_inference.py`,
`inference/VLMEvalKit/inference_demo.py`): the released weights saw two BOS everywhere. The modes (`BOS_MODES`):
  "transformers"  what transformers' MllamaProcessor gives for the rendered text: two BOS with a tokenizer that
                  adds BOS itself (the Llama-3.2-Vision one does), one otherwise. The default everywhere.
  "once"          one BOS at the start,
  "none"          no BOS at all.
`apply_bos` is the one place that turns a mode into the text and tokenizer flag that produce it.

Labels (`encode_training_example`) follow the same file: everything up to and including each assistant header
`<|start_header_id|>assistant<|end_header_id|>` is masked; the `\n\n` after the header, the answer and its
`<|eot_id|>` are supervised; LLaVA records have their question and answer `.strip()`ped first.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

# --- Special tokens (Llama 3 names; ids 128000.. in the real vocabulary) ---------------------------------
BOS = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
PAD = "<|finetune_right_pad_id|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOM = "<|eom_id|>"
EOT = "<|eot_id|>"
PYTHON_TAG = "<|python_tag|>"
IMAGE = "<|image|>"

# An instruct model's turn ends at any of these (ids 128009, 128008, 128001 in the real vocabulary).
GENERATION_STOP_TOKENS = (EOT, EOM, END_OF_TEXT)

IGNORE_INDEX = -100
# The official template's fallback when no strftime is available; the real one stamps today's date.
DEFAULT_DATE_STRING = "26 Jul 2024"
# LLaVA-style data marks the image with this placeholder inside the human turn.
LLAVA_IMAGE_PLACEHOLDER = "<image>"

BOS_MODES = ("transformers", "once", "none")
DEFAULT_BOS = "transformers"  # what LLaVA-CoT's training and inference gave the model (module docstring)

# --- LLaVA-CoT stages --------------------------------------------------------------------------------------
STAGES = ("SUMMARY", "CAPTION", "REASONING", "CONCLUSION")

_STAGE_RE = re.compile(r"<(/?)(SUMMARY|CAPTION|REASONING|CONCLUSION)>")


def _check_stage(stage: str) -> str:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    return stage


def open_tag(stage: str) -> str:
    """`open_tag("SUMMARY") == "<SUMMARY>"`."""
    return f"<{_check_stage(stage)}>"


def close_tag(stage: str) -> str:
    """`close_tag("SUMMARY") == "</SUMMARY>"`."""
    return f"</{_check_stage(stage)}>"


def split_stages(text: str) -> dict[str, str]:
    """Return {stage: stripped content} for every stage whose open and close tags both appear in `text`.

    The first complete occurrence of each stage wins; stages that are missing or unclosed are left out.
    """
    stages = {}
    for stage in STAGES:
        match = re.search(re.escape(open_tag(stage)) + r"(.*?)" + re.escape(close_tag(stage)), text, re.DOTALL)
        if match is not None:
            stages[stage] = match.group(1).strip()
    return stages


def validate_stages(text: str) -> list[str]:
    """Problems with the four-stage structure of an answer; an empty list means the answer is well formed.

    Well formed: each of SUMMARY, CAPTION, REASONING, CONCLUSION appears exactly once, opened and closed, in
    that order, not nested, each with non-empty content.
    """
    problems = []
    tags = [(m.group(1) == "/", m.group(2), m.start()) for m in _STAGE_RE.finditer(text)]
    for stage in STAGES:
        opens = sum(1 for closing, name, _ in tags if name == stage and not closing)
        closes = sum(1 for closing, name, _ in tags if name == stage and closing)
        if opens == 0 and closes == 0:
            problems.append(f"missing stage {stage}")
        elif opens != 1 or closes != 1:
            problems.append(f"stage {stage} has {opens} opening and {closes} closing tags; expected one of each")
    if problems:
        return problems

    expected = [(closing, stage) for stage in STAGES for closing in (False, True)]
    found = [(closing, name) for closing, name, _ in tags]
    if found != expected:
        order = " ".join(f"<{'/' if closing else ''}{name}>" for closing, name in found)
        problems.append(f"stage tags out of order: {order}")
        return problems

    for stage, content in split_stages(text).items():
        if not content:
            problems.append(f"stage {stage} is empty")
    return problems


def extract_conclusion(text: str) -> str:
    """The user-visible answer: the text inside <CONCLUSION>...</CONCLUSION>.

    A generation cut off before `</CONCLUSION>` yields the text after `<CONCLUSION>`; text without the tag is
    returned whole (stripped), so an untagged model answer can still be scored.
    """
    start = text.find(open_tag("CONCLUSION"))
    if start < 0:
        return text.strip()
    start += len(open_tag("CONCLUSION"))
    end = text.find(close_tag("CONCLUSION"), start)
    return (text[start:] if end < 0 else text[start:end]).strip()


# --- Conversations -----------------------------------------------------------------------------------------
_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _content_parts(content, where: str) -> list[dict]:
    """Normalise message content to a list of {"type": "text"|"image", ...} parts."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, Sequence):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") not in ("text", "image"):
                raise ValueError(f"{where}: content part {i} must be {{'type': 'text'|'image', ...}}, got {part!r}")
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise ValueError(f"{where}: text part {i} has no string 'text'")
            parts.append(dict(part))
        return parts
    raise ValueError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")


def user_turn(text: str, num_images: int = 0) -> list[dict]:
    """The chat messages of one question as LLaVA-CoT asks it: a user turn of its images, then its text. Each
    family's processor renders them (`render_prompt`)."""
    return [{"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text}]}]


def to_messages(conversations: Sequence[Mapping], has_image: bool = False) -> list[dict]:
    """Normalise a conversation to chat messages [{"role", "content": [parts]}].

    Accepts LLaVA records ({"from": "human"|"gpt"|"system", "value": str}) and chat messages
    ({"role", "content": str | parts}). LLaVA records are stripped of surrounding whitespace; with `has_image`
    their `<image>` placeholders are dropped and one image part leads the first user turn, as LLaVA-CoT's
    training dialogs had it. Chat messages are taken as they are (their own image parts; `has_image` then
    only checks that they have one).
    """
    if not conversations:
        raise ValueError("empty conversation")
    messages = []
    llava_style = False
    for i, turn in enumerate(conversations):
        if not isinstance(turn, Mapping):
            raise ValueError(f"turn {i}: expected a mapping, got {type(turn).__name__}")
        if "from" in turn and "value" in turn:
            llava_style = True
            role = _LLAVA_ROLES.get(turn["from"])
            if role is None:
                raise ValueError(f"turn {i}: unknown speaker {turn['from']!r}; expected one of {sorted(_LLAVA_ROLES)}")
            if not isinstance(turn["value"], str):
                raise ValueError(f"turn {i}: 'value' must be a string")
            text = turn["value"]
            if has_image:
                text = re.sub(re.escape(LLAVA_IMAGE_PLACEHOLDER) + r"\n?", "", text)
            # LLaVA-CoT's loader strips each question and answer (train/datasets/cot_dataset.py).
            messages.append({"role": role, "content": [{"type": "text", "text": text.strip()}]})
        elif "role" in turn and "content" in turn:
            messages.append({"role": turn["role"], "content": _content_parts(turn["content"], f"turn {i}")})
        else:
            raise ValueError(f"turn {i}: expected keys from/value (LLaVA) or role/content (chat), got {sorted(turn)}")

    n_images = sum(part["type"] == "image" for m in messages for part in m["content"])
    if llava_style and has_image:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise ValueError("has_image=True but the conversation has no user turn to attach the image to")
        first_user["content"].insert(0, {"type": "image"})
    elif has_image and n_images == 0:
        raise ValueError("has_image=True but no message has an image part")
    elif not has_image and n_images:
        raise ValueError(f"has_image=False but the messages hold {n_images} image part(s)")
    return messages


def _render_segments(messages, add_generation_prompt, add_bos, date_string):
    """Render messages as (text, role) segments; role is None for template text outside any message."""
    messages = [dict(m, content=_content_parts(m["content"], f"message {i}")) for i, m in enumerate(messages)]
    system_message = ""
    if messages and messages[0]["role"] == "system":
        system_message = "".join(p["text"] for p in messages[0]["content"] if p["type"] == "text").strip()
        messages = messages[1:]
    has_images = any(p["type"] == "image" for m in messages for p in m["content"])
    if has_images and system_message:
        raise ValueError("Llama-3.2-Vision's template does not allow a system message together with an image")

    segments = [(BOS, None)] if add_bos else []
    if not has_images:
        header = f"{START_HEADER}system{END_HEADER}\n\n"
        body = f"Cutting Knowledge Date: December 2023\nToday Date: {date_string}\n\n{system_message}"
        segments.append((header + body + EOT, "system"))
    for message in messages:
        role = message["role"]
        if role not in ("user", "assistant"):
            raise ValueError(f"role {role!r} is not supported here (only a leading 'system', then user/assistant)")
        # The "\n\n" after a header belongs to the message: LLaVA-CoT supervises it in assistant turns.
        segments.append((f"{START_HEADER}{role}{END_HEADER}", None))
        body = "".join(IMAGE if p["type"] == "image" else p["text"] for p in message["content"])
        segments.append(("\n\n" + body + EOT, role))
    if add_generation_prompt:
        segments.append((f"{START_HEADER}assistant{END_HEADER}\n\n", None))
    return segments


def render_prompt(
    messages: Sequence[Mapping],
    add_generation_prompt: bool = True,
    add_bos: bool = True,
    date_string: str = DEFAULT_DATE_STRING,
) -> str:
    """Render chat messages ({"role", "content": str | [{"type": "image"} | {"type": "text", "text"}]}) to
    the Llama-3.2-Vision prompt string, e.g. for one user turn with an image:

        <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n<|image|>QUESTION<|eot_id|>
        <|start_header_id|>assistant<|end_header_id|>\\n\\n
    """
    segments = _render_segments(messages, add_generation_prompt, add_bos, date_string)
    return "".join(text for text, _ in segments)


# --- Token-level encoding for training ------------------------------------------------------------------------
def cross_attention_token_ranges(input_ids: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """[start, end) token range that attends to each image, in image order.

    Each image is seen from its own `<|image|>` token up to the next image token; the last image up to the
    end of the sequence; a run of adjacent image tokens all see what the run's last image sees (so a prompt
    `<|image|><|image|>text` lets text attend to both). Mirrors transformers' get_cross_attention_token_mask.
    """
    ids = np.asarray(input_ids)
    locations = np.flatnonzero(ids == image_token_id).tolist()
    ends = locations[1:] + [len(ids)]
    ranges = [[start, end] for start, end in zip(locations, ends)]
    for i in range(len(ranges) - 2, -1, -1):
        if ranges[i][1] == ranges[i][0] + 1:  # the next image token follows immediately
            ranges[i][1] = ranges[i + 1][1]
    return [tuple(r) for r in ranges]


def cross_attention_mask(
    input_ids: Sequence[int],
    image_token_id: int,
    num_tiles: Sequence[int],
    max_images: int | None = None,
    max_tiles: int = 4,
) -> np.ndarray:
    """Dense per-token mask [seq, max_images, max_tiles] (int64): 1 where a token may attend to a tile.

    `num_tiles[i]` is the number of real tiles of image i (MllamaImageProcessor's `num_tiles`).
    """
    ranges = cross_attention_token_ranges(input_ids, image_token_id)
    if len(ranges) != len(num_tiles):
        raise ValueError(f"{len(ranges)} image tokens in the text but num_tiles describes {len(num_tiles)} images")
    max_images = max(1, len(ranges)) if max_images is None else max_images
    if len(ranges) > max_images:
        raise ValueError(f"{len(ranges)} images exceed max_images={max_images}")
    mask = np.zeros((len(input_ids), max_images, max_tiles), dtype=np.int64)
    for image_index, ((start, end), tiles) in enumerate(zip(ranges, num_tiles)):
        if not 0 < tiles <= max_tiles:
            raise ValueError(f"image {image_index}: num_tiles={tiles} outside 1..{max_tiles}")
        mask[start:end, image_index, :tiles] = 1
    return mask


def transformers_bos(text: str) -> str:
    """transformers' MllamaProcessor rule: keep a text that contains BOS; else put BOS after its leading images."""
    if BOS in text:
        return text
    body = text
    while body.startswith(IMAGE):
        body = body[len(IMAGE) :]
    leading_images = (len(text) - len(body)) // len(IMAGE)
    return IMAGE * leading_images + BOS + body


def apply_bos(text: str, bos: str = DEFAULT_BOS) -> tuple[str, bool]:
    """(text, add_special_tokens) that, tokenised, give `text` the BOS tokens of mode `bos` (module docstring).

    Only "transformers" leaves BOS to the tokenizer as well; a rendered prompt (which starts with BOS) keeps its
    text in every mode but "none"."""
    if bos == "transformers":
        return transformers_bos(text), True
    if bos == "once":
        return (text if text.startswith(BOS) else BOS + text), False
    if bos == "none":
        return (text[len(BOS) :] if text.startswith(BOS) else text), False
    raise ValueError(f"bos must be one of {BOS_MODES}, got {bos!r}")


def encode_prompt(tokenizer, text: str, bos: str = DEFAULT_BOS) -> list[int]:
    """Token ids of one prompt string (e.g. from `render_prompt`) with the BOS tokens of mode `bos`."""
    text, add_special_tokens = apply_bos(text, bos)
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def encode_training_example(
    tokenizer,
    conversations: Sequence[Mapping],
    has_image: bool,
    *,
    num_tiles: Sequence[int] | None = None,
    max_images: int | None = None,
    max_tiles: int = 4,
    bos: str = DEFAULT_BOS,
    date_string: str = DEFAULT_DATE_STRING,
) -> dict[str, np.ndarray]:
    """Tokenise one conversation for supervised fine-tuning.

    Args:
      tokenizer: a Llama-3-style fast tokenizer (real or `build_tiny_tokenizer()`); offsets are needed.
      conversations: LLaVA records or chat messages (see `to_messages`); any number of turns.
      has_image: whether the sample has an image (LLaVA records get `<|image|>` at the start of the first user
        turn).
      num_tiles: tiles of each image (from `MllamaImageProcessor(...)["num_tiles"][i]`); required with images.
      max_images, max_tiles: shape of the cross-attention mask; `max_images` defaults to max(1, #images).
      bos: "transformers" (default: two BOS with a Llama-3 tokenizer, as LLaVA-CoT trained) | "once" | "none"
        (module docstring).

    Returns numpy arrays:
      input_ids [seq] int32: the tokens of `render_prompt(messages, add_generation_prompt=False)` with the BOS
        tokens of `bos`;
      labels [seq] int32: the token id on each assistant turn's tokens after its header (the "\\n\\n", the
        answer and its `<|eot_id|>`), IGNORE_INDEX (-100) elsewhere (BOS, system and user turns, headers, image
        and pad tokens) — LLaVA-CoT's rule (train/datasets/cot_dataset.py);
      cross_attention_mask [seq, max_images, max_tiles] int32: which tiles each token attends to.
    """
    messages = to_messages(conversations, has_image)
    segments = _render_segments(messages, add_generation_prompt=False, add_bos=bos != "none", date_string=date_string)
    rendered = "".join(segment for segment, _ in segments)
    text, add_special_tokens = apply_bos(rendered, bos)
    if text != rendered:  # the label spans below are positions in `rendered`
        raise AssertionError(f"apply_bos({bos!r}) changed a rendered conversation")

    # A BOS the tokenizer adds has an empty offset span and is never labelled.
    encoding = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    offsets = list(encoding["offset_mapping"])

    # Character spans of assistant turns ("\n\n", content, <|eot_id|>): tokens overlapping them are trained on.
    answer_spans, position = [], 0
    for segment, role in segments:
        if role == "assistant":
            answer_spans.append((position, position + len(segment)))
        position += len(segment)
    labels = [IGNORE_INDEX] * len(input_ids)
    for i, (start, end) in enumerate(offsets):
        if end > start and any(start < span_end and end > span_start for span_start, span_end in answer_spans):
            labels[i] = input_ids[i]

    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    ignored = {image_id, tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids(BOS)}
    labels = [IGNORE_INDEX if token in ignored else label for token, label in zip(input_ids, labels)]

    n_images = input_ids.count(image_id)
    if n_images and num_tiles is None:
        raise ValueError("num_tiles is required for a sample with images (MllamaImageProcessor's 'num_tiles')")
    mask = cross_attention_mask(
        input_ids, image_id, [] if num_tiles is None else [int(t) for t in num_tiles], max_images, max_tiles
    )
    return {
        "input_ids": np.asarray(input_ids, dtype=np.int32),
        "labels": np.asarray(labels, dtype=np.int32),
        "cross_attention_mask": mask.astype(np.int32),
    }
