"""The OpenAI chat-completions format: a request body checked and turned into a `Job` the engine runs, and the
response and stream-chunk bodies built from its results. No web framework here: `app.py` does the HTTP.

A bad request raises `APIError`, which `app.py` answers with OpenAI's error body
`{"error": {"message", "type", "param", "code"}}` and its status (400 unless said otherwise).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from llava_cot_jax.data import chat
from llava_cot_jax.data import image as image_lib
from llava_cot_jax.generate import config as generate_config
from llava_cot_jax.generate import stage_search

# Methods a request may ask for in its `search` extension (swires needs a reward model the server is not given).
REQUEST_METHODS = ("stage", "best_of_n", "sentence", "greedy", "sample")
SEARCH_KEYS = ("method", "num_candidates")
MAX_CANDIDATES = 16
MAX_STOPS = 4
# OpenAI parameters this server reads; any other key is refused by name, so a client learns what is not applied.
KNOWN_KEYS = {
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "user",
    "search",
}


class APIError(Exception):
    """A request the server refuses: HTTP `status` with OpenAI's error fields."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status
        self.type = {
            400: "invalid_request_error",
            404: "not_found_error",
            429: "rate_limit_error",
            503: "service_unavailable",
        }.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class Job:
    """One request as the engine runs it: `n` rows of the same prompt under `settings` (its seed included when the
    request gave one; `explicit_seed` False lets the engine draw one per batch)."""

    prompt: str  # the rendered chat prompt (the processor's render_prompt)
    question: str  # the last user turn's text: what the judge is shown
    images: list  # PIL images, in the order of their <|image|> markers
    settings: stage_search.SearchConfig
    n: int
    explicit_seed: bool
    stops: tuple[str, ...] = ()
    stream: bool = False
    # Set by the server when streaming: called from the engine's thread with (choice index, the choice's text so far).
    on_text: Callable[[int, str], None] | None = None
    created: float = dataclasses.field(default_factory=time.time)

    def batch_key(self) -> tuple:
        """Jobs with equal keys can run as one `Searcher` call."""
        seed = self.settings.seed if self.explicit_seed else None
        return (dataclasses.replace(self.settings, seed=0), seed, len(self.images))


def _number(body: dict, name: str, kind, low=None, high=None, low_open=False):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        raise APIError(f"'{name}' must be a {'integer' if kind is int else 'number'}, got {value!r}", name)
    if low is not None and (value < low or (low_open and value == low)):
        raise APIError(f"'{name}' must be {'>' if low_open else '>='} {low}, got {value}", name)
    if high is not None and value > high:
        raise APIError(f"'{name}' must be <= {high}, got {value}", name)
    return value


def load_image_url(url: str, param: str, serve_cfg) -> Any:
    """The RGB image of an `image_url`: a `data:` URL (base64), or a local path or `file://` URL under
    `serve.image_dir` (off when empty). Remote URLs are refused: the server fetches nothing."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise APIError("data: image URLs must be base64 (data:image/png;base64,...)", param, "invalid_image")
        if len(payload) * 3 // 4 > serve_cfg.max_image_bytes:
            raise APIError(f"image is over {serve_cfg.max_image_bytes:,} bytes", param, "invalid_image")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as err:
            raise APIError(f"image data is not valid base64: {err}", param, "invalid_image") from None
        source = raw
    elif url.startswith(("http://", "https://")):
        raise APIError("remote image URLs are not fetched: send a data: URL", param, "invalid_image")
    else:
        path = url.removeprefix("file://")
        root = serve_cfg.image_dir
        if not root:
            raise APIError("local image paths are off (serve.image_dir is empty): send a data: URL", param)
        real, real_root = os.path.realpath(path), os.path.realpath(root)
        if os.path.commonpath([real, real_root]) != real_root:
            raise APIError(f"image path is outside the allowed directory {root}", param, "invalid_image")
        if not os.path.isfile(real):
            raise APIError(f"image file not found: {path}", param, "invalid_image")
        if os.path.getsize(real) > serve_cfg.max_image_bytes:
            raise APIError(f"image is over {serve_cfg.max_image_bytes:,} bytes", param, "invalid_image")
        source = real
    try:
        return image_lib.to_rgb(image_lib.load_image(source))
    except (ValueError, OSError) as err:  # ImageTooLarge is a ValueError
        raise APIError(str(err), param, "invalid_image") from None


def parse_messages(messages, serve_cfg) -> tuple[list[dict], list, str]:
    """OpenAI messages -> (chat messages for the processor's render_prompt, images, the last user turn's text)."""
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty list", "messages")
    out, images, question = [], [], ""
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant"):
            raise APIError(f"{where}: role must be system, user or assistant", f"{where}.role")
        role = "system" if message["role"] == "developer" else message["role"]
        content = message.get("content")
        parts, text = [], []
        if isinstance(content, str):
            parts, text = [{"type": "text", "text": content}], [content]
        elif isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                    text.append(part["text"])
                elif kind == "image_url" and role == "user":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if not isinstance(url, str):
                        raise APIError(f"{where}.content[{j}]: image_url needs a url", f"{where}.content[{j}]")
                    images.append(load_image_url(url, f"{where}.content[{j}].image_url", serve_cfg))
                    parts.append({"type": "image"})
                else:
                    raise APIError(
                        f"{where}.content[{j}]: expected a text part or (in a user turn) an image_url part",
                        f"{where}.content[{j}]",
                    )
        else:
            raise APIError(f"{where}: content must be a string or a list of parts", f"{where}.content")
        if role == "system" and i != 0:
            raise APIError(f"{where}: a system message may only come first", f"{where}.role")
        out.append({"role": role, "content": parts})
        if role == "user":
            question = "".join(text)
    if out[-1]["role"] != "user":
        raise APIError("the last message must be the user's", "messages")
    if images and out[0]["role"] == "system":
        raise APIError("Llama-3.2-Vision's template does not allow a system message together with an image", "messages")
    return out, images, question


def parse_request(body: Any, config, processor, context: int) -> Job:
    """A request body -> a Job under the server's `config` (its `search` defaults and limits, the `serve` group);
    the prompt is rendered by `processor` (the model family's template), whose tokenizer and `context` (the
    model's max positions) bound its length."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN_KEYS)
    if unknown:
        raise APIError(f"unsupported parameter '{unknown[0]}'", unknown[0], "unsupported_parameter")
    serve_cfg, search = config.serve, config.search
    model = body.get("model")
    if model is not None and model != serve_cfg.model_name:
        raise APIError(
            f"the model '{model}' does not exist: this server serves '{serve_cfg.model_name}'",
            "model",
            "model_not_found",
            404,
        )
    messages, images, question = parse_messages(body.get("messages"), serve_cfg)

    n = _number(body, "n", int, 1, serve_cfg.max_batch) or 1
    temperature = _number(body, "temperature", (int, float), 0, 2)
    top_p = _number(body, "top_p", (int, float), 0, 1, low_open=True)
    seed = _number(body, "seed", int, 0, 2**31 - 1)
    limit = search.max_new_tokens
    max_tokens = _number(body, "max_completion_tokens", int, 1, limit)
    max_tokens = _number(body, "max_tokens", int, 1, limit) if max_tokens is None else max_tokens
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise APIError("'stream' must be a boolean", "stream")
    stops = body.get("stop")
    stops = [stops] if isinstance(stops, str) else (stops or [])
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise APIError(f"'stop' must be a string or a list of at most {MAX_STOPS} non-empty strings", "stop")

    extension = body.get("search")
    if extension is None:
        method = serve_cfg.plain_method
        if method == "sample" and temperature == 0:
            method = "greedy"
        candidates = None
    else:
        if not isinstance(extension, dict):
            raise APIError('\'search\' must be an object such as {"method": "stage", "num_candidates": 4}', "search")
        bad = sorted(set(extension) - set(SEARCH_KEYS))
        if bad:
            raise APIError(f"unknown search setting '{bad[0]}': {', '.join(SEARCH_KEYS)}", f"search.{bad[0]}")
        method = extension.get("method", search.method)
        if method not in REQUEST_METHODS:
            raise APIError(f"search.method must be one of {', '.join(REQUEST_METHODS)}", "search.method")
        candidates = _number(extension, "num_candidates", int, 1, MAX_CANDIDATES)
        if method not in ("greedy", "sample") and temperature == 0:
            raise APIError("a search samples its candidates: temperature must be > 0", "temperature")

    overrides = {"method": method}
    if candidates is not None:
        overrides["num_candidates"] = candidates
    elif search.num_candidates is None:  # the method's own default N (stage_search.DEFAULT_NUM_CANDIDATES)
        overrides["num_candidates"] = stage_search.DEFAULT_NUM_CANDIDATES[method]
    if temperature is not None and method != "greedy":
        overrides["temperature"] = float(temperature)
    if top_p is not None:
        overrides["top_p"] = float(top_p)
    if max_tokens is not None:
        if method in ("stage", "swires"):  # each of the four stages gets a quarter, within the server's stage budget
            overrides["stage_max_new_tokens"] = min(search.stage_max_new_tokens, -(-max_tokens // len(chat.STAGES)))
        else:
            overrides["max_new_tokens"] = max_tokens
    base = generate_config.search_config(search, seed if seed is not None else config.seed)
    try:
        settings = dataclasses.replace(base, **overrides)
    except ValueError as err:
        raise APIError(str(err), "search") from None

    try:
        prompt = processor.render_prompt(messages)
    except ValueError as err:
        raise APIError(str(err), "messages") from None
    limits = _Limits(config, settings)
    reason = generate_config.prompt_limit_reason(prompt, limits, processor.tokenizer, context)
    if reason:
        raise APIError(f"the prompt is too long: {reason}", "messages", "context_length_exceeded")
    return Job(prompt, question, images, settings, n, explicit_seed=seed is not None, stops=tuple(stops), stream=stream)


class _Limits:
    """The view of the config `prompt_limit_reason` reads, with the request's budgets in place of the server's."""

    def __init__(self, config, settings: stage_search.SearchConfig):
        self._config = config
        self.search = settings

    def get(self, key, default=None):
        return self._config.get(key, default)


# --- responses ---------------------------------------------------------------------------------------------------


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def cut_at_stop(text: str, stops) -> tuple[str, bool]:
    """`text` up to the first stop string (not included), and whether one was found."""
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(ends)], True) if ends else (text, False)


def finish_reason(result: stage_search.SearchResult, stopped: bool) -> str:
    """ "stop" when a stop string, EOS or the closed conclusion ended the answer; "length" when a budget cut it."""
    if stopped or not result.trace:
        return "stop"
    last = result.trace[-1]
    return "length" if last["candidates"][last["winner"]]["finish"] == "budget" else "stop"


def search_extension(job: Job, seed: int, results) -> dict:
    """The response's `search` field: the settings that ran and, per choice, the stages, conclusion and trace."""
    s = job.settings
    return {
        "method": s.method,
        "num_candidates": 1 if s.method in ("greedy", "sample") else s.num_candidates,
        "seed": seed,
        "choices": [
            {"index": i, "stages": r.stages, "conclusion": r.conclusion, "verdicts": r.verdicts, "trace": r.trace}
            for i, r in enumerate(results)
        ],
    }


def completion_body(cid: str, model: str, job: Job, seed: int, results, prompt_tokens: int, count) -> dict:
    choices, completion_tokens = [], 0
    for i, result in enumerate(results):
        text, stopped = cut_at_stop(result.text, job.stops)
        completion_tokens += count(text)
        choices.append(
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason(result, stopped),
                "logprobs": None,
            }
        )
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(job.created),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        "search": search_extension(job, seed, results),
    }


def chunk_body(cid: str, model: str, job: Job, choices: list[dict], **extra) -> dict:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(job.created),
        "model": model,
        "choices": choices,
        **extra,
    }


class StreamText:
    """What of a choice's growing text may be sent: everything up to a stop string, less a tail that could still
    become one. `update(text)` returns the new delta; `finish(text)` the rest (text: the choice's whole text)."""

    def __init__(self, stops):
        self.stops = tuple(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.sent = ""
        self.stopped = False

    def _delta(self, visible: str) -> str:
        if not visible.startswith(self.sent):  # e.g. a token merge re-decoded differently: never resend
            return ""
        delta, self.sent = visible[len(self.sent) :], visible
        return delta

    def update(self, text: str) -> str:
        if self.stopped:
            return ""
        visible, self.stopped = cut_at_stop(text, self.stops)
        if not self.stopped and self.hold:
            visible = visible[: max(len(visible) - self.hold, 0)]
        return self._delta(visible)

    def finish(self, text: str) -> str:
        visible, stopped = cut_at_stop(text, self.stops)
        self.stopped = self.stopped or stopped
        return self._delta(visible)
