"""Runs judge prompts on the model: the token ids and shapes of judge calls, and the calls themselves.

What a judge is asked and how its replies decide matches is in `judge.py`; the search that asks is in
`stage_search.py`. A judge call is one batched generate over judge prompts (comparisons of two candidates, or
screens of one) about the questions of one search batch. The prompts are text built on the host from candidate
text, so they are tokenised here between device calls.

Each question's prompts in a stage share a prefix (chat header, image, instructions, question, hint): it is
prefilled once per question and kind, kept, and every tournament round only runs the rest of its prompts (the
responses and the chat template's closing tokens) on top of it, reading the image's K/V computed once per
question. A reply ends at EOS, at its budget, or at the first stop string it writes (the verdict phrases of a
comparison). Lengths are padded to multiples of a bucket step and bounded ahead of time (`JudgeShapes`) so that
one question compiles a handful of programs and the next one of a similar length none.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from llava_cot_jax.data import chat
from llava_cot_jax.generate import judge as judge_lib
from llava_cot_jax.generate import sampler as sampler_lib


def judge_prompt_ids(
    processor, text: str, num_images: int, bos: str = chat.DEFAULT_BOS, upto: str | None = None
) -> list[int]:
    """Token ids of a judge prompt: one user turn (`num_images` images, then `text`) in the template of the
    processor's family, ready for the reply, with the BOS tokens of `bos` (Mllama: two by default, as LLaVA-CoT's
    judge prompts). With `upto` (a prefix of `text`), the ids of the rendered prompt up to the end of that prefix."""
    rendered = processor.render_prompt(chat.user_turn(text, num_images))
    if upto is not None:
        if not text.startswith(upto):
            raise AssertionError("judge prefix is not a prefix of its prompt")
        rendered = rendered[: rendered.index(text) + len(upto)]
    return processor.encode_prompt(rendered, bos)


def judge_tokens(processor, text: str, prefix: str | None, num_images: int, bos: str = chat.DEFAULT_BOS):
    """Token ids of a judge prompt showing `num_images` images, and of its rendered prefix (the chat header,
    images, `prefix`; None when `prefix` is None), with the BOS tokens of `bos`."""
    ids = judge_prompt_ids(processor, text, num_images, bos)
    if prefix is None:
        return ids, None
    return ids, judge_prompt_ids(processor, text, num_images, bos, upto=prefix)


def decode_text(tokenizer, tokens: np.ndarray) -> str:
    """The text of generated token ids (ids outside the tokenizer's vocabulary, e.g. padding, left out)."""
    vocab = len(tokenizer)
    return tokenizer.decode([int(t) for t in tokens if 0 <= t < vocab], skip_special_tokens=True)


@dataclasses.dataclass(frozen=True)
class JudgeShapes:
    """Bounds on the array shapes of a search's judge calls, per judge group ("compare": comparisons, with the image
    when the prompts show it; "screen": screens, text only).

    cache_len: KV-cache slots of a judge state; prefix / rest: token lengths of a prompt's prefilled prefix and of
    the rest of it; rows: rows per question of a call (a question's matches or screens). A prompt longer than its
    bound (rare: re-tokenised text can outgrow what was generated) gets a larger bucket, and so a new program."""

    cache_len: int
    prefix: dict
    rest: dict
    rows: dict


def judge_shapes(
    prompts: judge_lib.JudgePrompts,
    processor,
    compared: dict[str, tuple[int, int]],
    screened: tuple[int, int] | None,
    *,
    question_tokens: int,
    num_candidates: int,
    max_images: int,
    bucket_step: int,
    max_new_tokens: int,
    cache_step: int,
    bos: str = chat.DEFAULT_BOS,
) -> JudgeShapes:
    """The judge shapes of a search that compares the kinds `compared` (kind -> longest hint and longest response,
    in tokens) and, when `screened` is given, screens candidates (longest hint, longest response). The templates'
    overhead is measured by tokenising the prompts with empty fields; the question's length is rounded up to a
    bucket step; replies take up to `max_new_tokens`; caches are sized in multiples of `cache_step`."""
    round_up = lambda x: sampler_lib.bucket_length(x, minimum=bucket_step, step=bucket_step)
    tokens = lambda text, images: len(judge_prompt_ids(processor, text, images, bos))
    question = round_up(question_tokens)
    compare_images = max_images if prompts.compare_with_image else 0
    prefix, rest = {}, {}
    for kind, (hint, response) in compared.items():
        head = tokens(prompts.compare_prefix(kind, "", ""), compare_images)
        full = tokens(prompts.compare_text(kind, "", "", "", ""), compare_images)
        prefix["compare"] = max(prefix.get("compare", 0), round_up(head + question + hint))
        rest["compare"] = max(rest.get("compare", 0), round_up(full - head + 1 + 2 * response))
    if screened is not None:
        hint, response = screened
        head, full = tokens(prompts.screen_prefix("", ""), 0), tokens(prompts.screen_text("", "", ""), 0)
        prefix["screen"], rest["screen"] = round_up(head + question + hint), round_up(full - head + 1 + response)
    longest = max([prefix[g] + rest[g] + max_new_tokens for g in prefix], default=0)
    return JudgeShapes(
        sampler_lib.bucket_length(longest, step=cache_step),
        prefix,
        rest,
        {"compare": -(-num_candidates // 2), "screen": num_candidates},
    )


class JudgeRunner:
    """Runs judge prompts about the questions of one search batch on the model, one batched call per `run`.

    `num_tiles` holds the tiles of each question's images (None without images), `max_images` the image axis of
    their pixel values and `cross_kv` their K/V ([.., questions, ..]; None without images). Replies are decoded with
    `sampling`, up to `max_new_tokens` each. The prefilled prefixes are kept for the life of the runner (one
    search call)."""

    def __init__(
        self,
        sampler: sampler_lib.Sampler,
        processor,
        shapes: JudgeShapes,
        *,
        num_questions: int,
        num_tiles: list[list[int]] | None,
        max_images: int,
        cross_kv: Any,
        sampling: sampler_lib.Sampling,
        max_new_tokens: int,
        bucket_step: int,
        cache_step: int,
        bos: str = chat.DEFAULT_BOS,
    ):
        self.sampler = sampler
        self.processor = processor  # renders and tokenises judge prompts in the family's template
        self.tokenizer = processor.tokenizer
        self.shapes = shapes
        self.num_questions = num_questions
        self.num_tiles = num_tiles
        self.max_images = max_images
        self.cross_kv = cross_kv
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        self.bucket_step = bucket_step
        self.cache_step = cache_step
        self.bos = bos
        self.image_token_id = sampler.model.config.image_token_id
        # Mllama's text reads the image through a cross-attention mask per token; LLaVA's image is in the prefix's
        # tokens (prefilled with the image features), so its prompts need no mask.
        self.cross_attends = sampler.model.cross_attends_images
        self.max_tiles = sampler.model.config.vision.max_num_tiles if self.cross_attends else 1
        self.prefilled: dict = {}  # judge kind -> (with image, prefix ids per question, prefilled state)

    def run(
        self,
        texts: Sequence[str],
        owners: Sequence[int],
        prefixes: dict,
        *,
        with_image: bool,
        kind: str,
        key: jax.Array,
        budget: int,
        stops: Sequence[str] = (),
    ) -> list[str]:
        """Replies to judge prompts `texts` (prompt i about question `owners[i]`, whose prompts all start with the
        text `prefixes[owners[i]]`), at most `budget` tokens each, sampled with `key`; one host sync.

        Question q's prompts take rows [q * k, q * k + k) of a call with k rows per question (`JudgeShapes.rows`;
        unused rows do nothing): a question's rows share its image K/V and continue its prefix."""
        group = "screen" if kind == "screen" else "compare"
        with_image = with_image and self.cross_kv is not None
        count = {q: owners.count(q) for q in owners}
        per_question = max(self.shapes.rows[group], *count.values())  # more only when called outside a tournament
        slot_of, used = [], {}
        for q in owners:
            slot_of.append(q * per_question + used.get(q, 0))
            used[q] = used.get(q, 0) + 1

        prompts, heads = [], {}
        for text, q in zip(texts, owners):
            images = len(self.num_tiles[q]) if with_image else 0
            ids, head = judge_tokens(self.processor, text, None if q in heads else prefixes[q], images, self.bos)
            prompts.append(ids)
            heads.setdefault(q, head)  # one head per question: the same for all its prompts
        shared, state, rest = self._prefix(kind, group, heads, list(zip(owners, prompts)), with_image)
        rows = self.num_questions * per_question
        chunks = [None] * rows  # what follows each prefix, by row
        for i, q in enumerate(owners):
            chunks[slot_of[i]] = (prompts[i], len(shared[q]), q)
        ids, mask, xmask = self._left_pad(chunks, with_image, rest)
        cross_kv = self.cross_kv if with_image else None
        rows_state = self.sampler.extend(state, ids, mask, cross_kv, xmask, rows=np.arange(rows) // per_question)
        active = np.zeros(rows, bool)
        active[slot_of] = True
        _, out = self.sampler.decode(
            rows_state,
            max_new=self.max_new_tokens,
            budget=budget,
            sampling=self.sampling,
            seed=key,
            stop_strings=tuple(stops),
            eos_ids=self.sampler.eos_token_ids,
            cross_kv=cross_kv,
            active=active,
        )
        tokens = np.asarray(out.tokens)  # host sync: judge replies
        num = np.asarray(out.num_tokens)
        return [decode_text(self.tokenizer, tokens[r, : num[r]]) for r in slot_of]

    def _left_pad(self, chunks, with_image: bool, length: int):
        """Left-pads token chunks `(prompt ids, start, question)` = prompt[start:] into [rows, length] ids and mask
        (a longer chunk takes the next bucket), with the chunks' rows of their prompt's cross-attention mask
        when the judge sees the image. A row whose chunk is None stays empty."""
        step = self.bucket_step
        longest = max([len(c[0]) - c[1] for c in chunks if c is not None], default=0)
        length = max(length, sampler_lib.bucket_length(longest, minimum=step, step=step))
        ids = np.full((len(chunks), length), self.sampler.pad_token_id, np.int32)
        mask = np.zeros((len(chunks), length), np.int32)
        xmask = None
        with_mask = with_image and self.cross_attends
        if with_mask:
            xmask = np.zeros((len(chunks), length, self.max_images, self.max_tiles), np.int32)
        for r, chunk in enumerate(chunks):
            if chunk is None:
                continue
            prompt, start, q = chunk
            n = len(prompt) - start
            ids[r, length - n :] = prompt[start:]
            mask[r, length - n :] = 1
            if with_mask:
                seen = chat.cross_attention_mask(
                    prompt,
                    self.image_token_id,
                    self.num_tiles[q],
                    max_images=self.max_images,
                    max_tiles=self.max_tiles,
                )
                xmask[r, length - n :] = seen[start:]
        return ids, mask, xmask

    def _prefix(self, kind: str, group: str, heads: dict, prompts: list, with_image: bool):
        """Every question's judge prefix, prefilled (one row per question of the batch; questions without a prompt
        in this call get an empty row) or reused from the previous call of this kind while it still starts every
        prompt of its question (every round of a stage's tournament). Returns (prefix token ids per question,
        state, length of the rest of the prompts).

        Reuse is exact: a prompt continues a prefix only where their token ids agree. The rendered head's last
        token is left out (BPE may merge it with the response that follows), and the common token prefix of the
        head and the question's prompts is what gets prefilled."""
        shapes, step = self.shapes, self.bucket_step
        starts = lambda prefix, ids: len(ids) > len(prefix) and list(ids[: len(prefix)]) == list(prefix)
        rest_of = lambda shared: max(
            shapes.rest[group],
            sampler_lib.bucket_length(max(len(ids) - len(shared[q]) for q, ids in prompts), minimum=step, step=step),
        )
        room = lambda state, rest: int(state.cursor) + rest + self.max_new_tokens <= state.cache_len
        cached = self.prefilled.get(kind)
        if cached is not None:
            key, shared, state = cached
            reusable = key == with_image and all(q in shared and starts(shared[q], ids) for q, ids in prompts)
            if reusable and room(state, rest_of(shared)):
                return shared, state, rest_of(shared)
        shared = {q: head[:-1] for q, head in heads.items()}
        for q, ids in prompts:
            shared[q] = shared[q][: _common_prefix_length(shared[q], ids[:-1])]
        chunks = [(shared[q], 0, q) if q in shared else None for q in range(self.num_questions)]
        ids, mask, xmask = self._left_pad(chunks, with_image, shapes.prefix[group])
        rest = rest_of(shared)
        needed = ids.shape[1] + rest + self.max_new_tokens  # > cache_len only past the bounds
        cache_len = max(shapes.cache_len, sampler_lib.bucket_length(needed, step=self.cache_step))
        state = self.sampler.prefill(ids, mask, self.cross_kv if with_image else None, xmask, cache_len=cache_len)
        self.prefilled[kind] = (with_image, shared, state)
        return shared, state, rest


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    mismatch = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(mismatch[0]) if len(mismatch) else n
