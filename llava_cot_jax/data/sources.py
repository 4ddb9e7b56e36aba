"""Reading LLaVA-CoT-100k as published (a JSONL file plus an image root directory) and LLaVA's conversation data
(a JSON array of the same records, e.g. llava_v1_5_mix665k.json).

`validate_jsonl` reads every line, checks it, and returns the usable samples together with a `ValidationReport`
that counts every problem by kind and keeps a few examples of each (with file:line). Problems are never skipped
silently: with `on_error="skip"` the bad samples are left out and the report says which and why; with
`on_error="fail"` the whole file is still checked (so one run shows every problem) and then
`DataValidationError` is raised with the report's summary.

Which records train is `record_filter`:
  "llava_cot" (default)  the set LLaVA-CoT trained on (`train/datasets/cot_dataset.py`): every record with an
                         image, every question/answer pair of it (turns paired as their loader pairs them), stage
                         tags unchecked. Records with several pairs, an irregular turn layout, several `<image>`
                         placeholders or missing / repeated / out-of-order / empty stage tags are kept and counted
                         by kind in the report. Records without an image are left out, as their loader does.
  "strict"               exactly one human question and one gpt answer with the four stages well formed; such a
                         record may be text-only. Everything else is left out, by kind.
  "llava"                LLaVA-1.5's data: any number of human/gpt pairs, text-only records kept, stage tags not
                         looked at; turns that do not alternate human, gpt, human, gpt... are left out.

A file whose first character is `[` is read as one JSON array (LLaVA's format); its records are located as
`file[index]` in the report. Otherwise it is JSONL, located as `file:line`.

`JsonlSource` is a random-access source over the validated samples (`len` + `__getitem__`), small enough to hold in
memory and accepted by `grain.MapDataset.source`; its records have the same fields as the TFDS dataset that
`tools/prepare_data.py` writes, so the pipeline reads either.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from tqdm import tqdm

from llava_cot_jax.data import chat

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
OnError = Literal["skip", "fail"]
RecordFilter = Literal["llava_cot", "strict", "llava"]
RECORD_FILTERS = ("llava_cot", "strict", "llava")
# Counts the tokens of one sample: (conversations, has_image) -> int.
TokenCounter = Callable[[Sequence[dict], bool], int]

# Every kind of problem the validator reports, with the sentence used in the summary. Whether a kind leaves its
# record out or keeps it (counted as irregular) depends on the record filter.
ISSUE_KINDS: dict[str, str] = {
    "malformed_json": "line is not valid JSON",
    "bad_schema": "record is not {id, image, conversations: [{from, value}, ...]} with string values "
    "and at least one human question followed by a gpt answer",
    "no_image": "record has no image (LLaVA-CoT's loader leaves these out)",
    "multi_turn": "more than one question/answer pair",
    "turn_layout": "turns are not alternating human/gpt pairs (paired as LLaVA-CoT's loader pairs them)",
    "placeholders": f"more than one {IMAGE_PLACEHOLDER} placeholder in the text for the record's one image",
    "multi_image": "more than one image (only one image per sample is supported)",
    "missing_image": "image file not found (or <image> in the question but no image field)",
    "corrupt_image": "image file cannot be decoded",
    "missing_stage": "answer lacks one of the four stage tags",
    "stage_order": "answer's stage tags are out of order, repeated or unclosed",
    "empty_stage": "a stage of the answer is empty",
    "overlong": "sample is longer than the token budget",
}


class DataValidationError(ValueError):
    """Raised by `on_error="fail"` when any sample was left out; the message is the report's summary."""


@dataclasses.dataclass(frozen=True)
class Issue:
    kind: str
    location: str  # "path:line"
    sample_id: str | None
    message: str
    kept: bool = False  # the record trains anyway (an irregularity the record filter accepts)

    def __str__(self) -> str:
        sample = f" [id {self.sample_id}]" if self.sample_id is not None else ""
        return f"{self.location}{sample}: {self.message}"


@dataclasses.dataclass(frozen=True)
class Sample:
    """One validated sample. `image` is an absolute path, or None for a text-only sample; `conversations`
    alternate human and gpt turns."""

    id: str
    image: str | None
    conversations: tuple[dict, ...]
    location: str


@dataclasses.dataclass
class ValidationReport:
    source: str
    max_examples: int = 3
    record_filter: str = "llava_cot"
    lines: int = 0
    blank_lines: int = 0
    kept: int = 0
    skipped: int = 0
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # kinds left out
    irregular: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # kinds kept
    examples: dict[str, list[Issue]] = dataclasses.field(default_factory=dict)
    checks_not_run: list[str] = dataclasses.field(default_factory=list)

    def add(self, issue: Issue) -> None:
        (self.irregular if issue.kept else self.counts)[issue.kind] += 1
        shown = self.examples.setdefault(issue.kind, [])
        if len(shown) < self.max_examples:
            shown.append(issue)

    @property
    def ok(self) -> bool:
        """Nothing was left out (irregular records that were kept do not count)."""
        return not self.counts

    def summary(self) -> str:
        lines = [
            f"{self.source}: {self.lines} lines, {self.kept} samples kept, {self.skipped} skipped"
            + (f", {self.blank_lines} blank lines ignored" if self.blank_lines else "")
            + f" (record_filter={self.record_filter!r})"
        ]
        for title, counter in (("left out", self.counts), ("kept, irregular", self.irregular)):
            if counter:
                lines.append(f"  {title}:")
            for kind, count in sorted(counter.items(), key=lambda kv: -kv[1]):
                lines.append(f"    {kind}: {count} — {ISSUE_KINDS[kind]}")
                lines.extend(f"        e.g. {issue}" for issue in self.examples.get(kind, ()))
        lines.extend(f"  not checked: {what}" for what in self.checks_not_run)
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ single checks


def stage_issue(answer: str) -> tuple[str, str] | None:
    """(kind, message) when the answer's four stages are missing, out of order or empty; None when it is fine."""
    problems = chat.validate_stages(answer)
    if not problems:
        return None
    message = "; ".join(problems)
    # chat.validate_stages reports missing/repeated tags first, then order, then empty content.
    if any(p.startswith("missing stage") for p in problems):
        return "missing_stage", message
    if any(p.endswith("is empty") for p in problems):
        return "empty_stage", message
    return "stage_order", message


def pair_turns(conversations: Sequence[dict]) -> list[tuple[str, str]]:
    """(question, answer) pairs as LLaVA-CoT's loader forms them: a "human" turn sets the question, a "gpt" turn the
    answer, and a pair is complete once both are set; other speakers are ignored, a dangling question is dropped."""
    pairs, pending = [], {}
    for turn in conversations:
        if turn["from"] in ("human", "gpt"):
            pending[turn["from"]] = turn["value"]
        if len(pending) == 2:
            pairs.append((pending["human"], pending["gpt"]))
            pending = {}
    return pairs


def check_image(path: str | os.PathLike) -> str | None:
    """None if the file decodes as an image, else why not. Decodes fully (a truncated JPEG passes `verify`), in
    JPEG draft mode at reduced scale to keep it cheap."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (64, 64))  # JPEG only: DCT-domain downscale, still reads the whole stream
            image.load()
    except FileNotFoundError:
        raise
    except Exception as err:  # PIL raises a variety of types (OSError, SyntaxError, ValueError, ...) for bad data
        return f"{type(err).__name__}: {err}"
    return None


def _parse_record(
    record: Any, location: str, image_root: Path, record_filter: RecordFilter
) -> tuple[Sample | None, list[Issue]]:
    """Schema, turn, image-field and stage checks that need no file access. Returns the sample (None when it is
    left out) and its issues: why it is left out, or the irregularities it is kept with."""

    def fail(kind, message, sample_id=None):
        return None, [Issue(kind, location, sample_id, message)]

    if not isinstance(record, dict):
        return fail("bad_schema", f"expected a JSON object, got {type(record).__name__}")
    sample_id = record.get("id")
    if not isinstance(sample_id, (str, int)) or isinstance(sample_id, bool):
        return fail("bad_schema", f"missing or non-string 'id' (got {sample_id!r})")
    sample_id = str(sample_id)
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not all(
        isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)
        for turn in conversations
    ):
        return fail("bad_schema", "'conversations' must be a list of {from: str, value: str}", sample_id)
    roles = [turn["from"] for turn in conversations]
    pairs = pair_turns(conversations)
    if not pairs:
        return fail("bad_schema", f"no human question followed by a gpt answer in turns {roles}", sample_id)

    irregular = []  # (kind, message): kept and counted under "llava_cot", left out under "strict"
    if roles != ["human", "gpt"] * (len(roles) // 2):
        if record_filter == "llava":
            return fail("turn_layout", f"turns {roles} do not alternate human/gpt", sample_id)
        irregular.append(("turn_layout", f"turns {roles} train as {len(pairs)} question/answer pair(s)"))
    elif len(pairs) > 1:
        irregular.append(("multi_turn", f"{len(roles)} turns ({', '.join(roles)})"))

    image_field = record.get("image")
    if isinstance(image_field, list):
        if len(image_field) > 1:
            return fail("multi_image", f"{len(image_field)} images: {image_field[:3]}", sample_id)
        image_field = image_field[0] if image_field else None
    if image_field is not None and not isinstance(image_field, str):
        return fail("bad_schema", f"'image' must be a path string, got {type(image_field).__name__}", sample_id)
    placeholders = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in conversations)
    if image_field is None and placeholders:
        return fail("missing_image", f"question contains {IMAGE_PLACEHOLDER} but the record has no image", sample_id)
    if image_field is None and record_filter == "llava_cot":
        return fail("no_image", "no 'image' field", sample_id)
    if placeholders > 1:
        irregular.append(("placeholders", f"{placeholders} {IMAGE_PLACEHOLDER} placeholders in the text"))

    for index, (_, answer) in enumerate(pairs if record_filter != "llava" else ()):
        kind_and_message = stage_issue(answer)
        if kind_and_message:
            kind, message = kind_and_message
            irregular.append((kind, (f"answer {index + 1}: " if len(pairs) > 1 else "") + message))
            break  # one stage issue per record is enough to count it

    if record_filter == "strict" and irregular:
        return fail(*irregular[0], sample_id)
    turns = tuple({"from": speaker, "value": text} for pair in pairs for speaker, text in zip(("human", "gpt"), pair))
    image_path = str(image_root / image_field) if image_field is not None else None
    issues = [Issue(kind, location, sample_id, message, kept=True) for kind, message in irregular]
    return Sample(sample_id, image_path, turns, location), issues


def _read_lines(path: Path, report: ValidationReport) -> Iterable[tuple[str, Any]]:
    """Yields (location, parsed JSON) per record: per non-blank line of JSONL (malformed lines go to the report), or
    per element of a JSON array file (one that does not parse is an error naming where it breaks)."""
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):
        with open(path, encoding="utf-8") as f:
            try:
                records = json.load(f)
            except json.JSONDecodeError as err:
                where = f"{err.msg} at line {err.lineno}, column {err.colno}"
                raise ValueError(f"{path}: not a valid JSON array ({where})") from err
        for index, record in enumerate(records):
            report.lines += 1
            yield f"{path}[{index}]", record
        return
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            report.lines += 1
            location = f"{path}:{line_number}"
            if not line.strip():
                report.blank_lines += 1
                continue
            try:
                yield location, json.loads(line)
            except json.JSONDecodeError as err:
                report.add(Issue("malformed_json", location, None, f"{err.msg} at column {err.colno}"))
                report.skipped += 1


# --------------------------------------------------------------------------------------------------- validator


def validate_jsonl(
    jsonl_path: str | os.PathLike,
    image_root: str | os.PathLike,
    *,
    on_error: OnError = "skip",
    record_filter: RecordFilter = "llava_cot",
    check_images: bool = True,
    token_counter: TokenCounter | None = None,
    max_tokens: int | None = None,
    max_examples: int = 3,
    num_threads: int = 4,
    progress: bool = False,
) -> tuple[list[Sample], ValidationReport]:
    """Checks every record of a LLaVA-CoT JSONL file or a LLaVA JSON array; returns (usable samples in file order,
    report).

    Args:
      on_error: "skip" leaves bad samples out; "fail" raises `DataValidationError` (after checking everything)
        when any sample was left out.
      record_filter: "llava_cot" (default) or "strict": which records train (module docstring).
      check_images: open and decode each image (threads, since PIL releases the GIL while decoding).
      token_counter, max_tokens: the token budget; both or neither. `make_token_counter(tokenizer)` builds one.
    """
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    if record_filter not in RECORD_FILTERS:
        raise ValueError(f"record_filter must be one of {RECORD_FILTERS}, got {record_filter!r}")
    if (token_counter is None) != (max_tokens is None):
        raise ValueError("token_counter and max_tokens must be given together")
    jsonl_path, image_root = Path(jsonl_path), Path(image_root)
    if not jsonl_path.is_file():
        raise FileNotFoundError(f"JSONL file not found: {jsonl_path}")
    if not image_root.is_dir():
        raise FileNotFoundError(f"image root is not a directory: {image_root}")

    report = ValidationReport(source=str(jsonl_path), max_examples=max_examples, record_filter=record_filter)
    parsed: list[Sample] = []
    irregularities: list[list[Issue]] = []  # per parsed sample; reported once the sample is known to be kept
    for location, record in tqdm(_read_lines(jsonl_path, report), desc="reading", unit=" lines", disable=not progress):
        sample, issues = _parse_record(record, location, image_root, record_filter)
        if sample is None:
            report.add(issues[0])
            report.skipped += 1
        else:
            parsed.append(sample)
            irregularities.append(issues)

    def later_checks(sample: Sample) -> Issue | None:
        if sample.image is not None and check_images:
            try:
                problem = check_image(sample.image)
            except FileNotFoundError:
                return Issue("missing_image", sample.location, sample.id, f"no such file: {sample.image}")
            if problem:
                return Issue("corrupt_image", sample.location, sample.id, f"{sample.image}: {problem}")
        if token_counter is not None:
            length = token_counter(sample.conversations, sample.image is not None)
            if length > max_tokens:
                return Issue("overlong", sample.location, sample.id, f"{length} tokens > budget {max_tokens}")
        return None

    kept: list[Sample] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        results = pool.map(later_checks, parsed, chunksize=16)
        for sample, issue, irregular in tqdm(
            zip(parsed, results, irregularities),
            total=len(parsed),
            desc="checking",
            unit=" samples",
            disable=not progress,
        ):
            if issue is None:
                kept.append(sample)
                for noted in irregular:
                    report.add(noted)
            else:
                report.add(issue)
                report.skipped += 1
    report.kept = len(kept)
    if not check_images:
        report.checks_not_run.append("image files (check_images=False)")
    if token_counter is None:
        report.checks_not_run.append("token budget (no token_counter/max_tokens given)")

    if on_error == "fail" and not report.ok:
        raise DataValidationError(f"invalid samples in {jsonl_path} (on_error='fail'):\n{report.summary()}")
    return kept, report


def make_token_counter(tokenizer) -> TokenCounter:
    """Counts tokens exactly as training will see them (chat template, special tokens, image token)."""

    def count(conversations: Sequence[dict], has_image: bool) -> int:
        # The image is one <|image|> token whatever its tile count, so one tile stands in for any image here.
        encoded = chat.encode_training_example(
            tokenizer, list(conversations), has_image=has_image, num_tiles=[1] if has_image else None
        )
        return len(encoded["input_ids"])

    return count


# ------------------------------------------------------------------------------------------------------ source


def read_record(sample: Sample) -> dict[str, Any]:
    """The record the pipeline consumes, with the same fields as the TFDS dataset: id, image (encoded bytes, b""
    when text-only), conversations (JSON text of the turns)."""
    image = b""
    if sample.image is not None:
        with open(sample.image, "rb") as f:
            image = f.read()
    return {
        "id": sample.id,
        "image": image,
        "conversations": json.dumps(list(sample.conversations), ensure_ascii=False),
    }


class JsonlSource:
    """Random-access source over a validated LLaVA-CoT JSONL file (held in memory; images read on access).

    Usable as `grain.MapDataset.source(JsonlSource(...))`. Construction runs `validate_jsonl` (keyword arguments
    go to it, e.g. `record_filter`); the report is in `.report`, and its summary is logged as a warning when
    anything was left out or kept irregular.
    """

    def __init__(self, jsonl_path: str | os.PathLike, image_root: str | os.PathLike, **validate_kwargs):
        self.samples, self.report = validate_jsonl(jsonl_path, image_root, **validate_kwargs)
        if not self.report.ok or self.report.irregular:
            logger.warning("%s", self.report.summary())

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return read_record(self.samples[index])

    def __repr__(self) -> str:
        return f"JsonlSource({self.report.source!r}, {len(self)} samples)"
