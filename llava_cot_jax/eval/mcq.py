"""Multiple-choice and yes/no benchmarks in VLMEvalKit's TSV format: reading, prompts, answer extraction, scoring.

A VLMEvalKit TSV has one row per question: `index`, `question`, an optional `hint`, one column per option named
by its letter (`A`, `B`, ... up to however many the benchmark has; an empty cell means the row has fewer), `answer`
(a letter, or Yes/No for yes/no benchmarks such as HallusionBench), `image` (base64 of the encoded image; a short
value names the `index` of another row whose image it shares; a Python list literal holds several images),
`category` and any other columns, which are kept. VLMEvalKit reads it with pandas; we read every cell as text.

Prompts are built by `data/mcq_prompt.build_prompt` (the layer the synthetic data generator shares).

Answers are read from the text inside `<CONCLUSION>` (what LLaVA-CoT's evaluation scores) with rules, no LLM
judge: `extract_choice` for options, `extract_yes_no` for yes/no (VLMEvalKit's `YOrN_Extraction` rule).
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import dataclasses
import os
import re
import string
import sys
from collections.abc import Iterable, Mapping, Sequence

from llava_cot_jax import files
from llava_cot_jax.data.mcq_prompt import build_prompt

STYLES = ("auto", "mcq", "ai2d", "yorn")
# Columns that predictions.tsv adds to the input's (VLMEvalKit's evaluators read `prediction`).
OUTPUT_COLUMNS = ("prediction", "raw_output", "extracted", "hit")
_REFERENCE_MAX_LEN = 64  # VLMEvalKit: an image cell this short names another row's index


class BadRow(ValueError):
    """A row that cannot be evaluated; its reason is listed in the report and it is left out of the scores."""


@dataclasses.dataclass(frozen=True)
class Table:
    path: str
    columns: list[str]
    rows: list[dict[str, str]]  # every cell as text; a row with the wrong number of cells has key None (csv)


@dataclasses.dataclass(frozen=True)
class Item:
    """One evaluable row."""

    row: int  # 1-based data row (the header is not counted)
    index: str
    record: dict[str, str]  # the row as read
    prompt: str
    options: dict[str, str]  # letter -> text; empty for yes/no
    answer: str  # the normalised gold answer (a letter, Yes or No); "" when the TSV has none (test splits)


@dataclasses.dataclass(frozen=True)
class Bad:
    row: int
    index: str
    reason: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------ reading


def read_tsv(path: str) -> Table:
    """Reads a VLMEvalKit TSV. A missing or unreadable file, or one without `index`, `question` and `image`
    columns, raises FileNotFoundError / ValueError with one line saying what is wrong."""
    if not path:
        raise ValueError("--config.tsv=FILE.tsv is required")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"TSV not found: {path}")
    csv.field_size_limit(sys.maxsize)  # base64 images are far longer than csv's 128 KiB default
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter="\t")
            columns = list(reader.fieldnames or [])
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"cannot read {path} as a UTF-8 TSV: {err}") from None
    missing = [c for c in ("index", "question", "image") if c not in columns]
    if missing:
        found = ", ".join(columns[:12]) or "nothing"
        raise ValueError(f"{path} is not a VLMEvalKit TSV: no {', '.join(missing)} column (header: {found})")
    if not rows:
        raise ValueError(f"{path} has a header but no rows")
    return Table(path, columns, rows)


def option_letters(columns: Iterable[str]) -> list[str]:
    """The option columns: those named by one capital letter, in alphabetical order (as VLMEvalKit)."""
    return [c for c in string.ascii_uppercase if c in set(columns)]


def resolve_style(style: str, table: Table) -> str:
    """ "auto" picks "ai2d" for a file named like AI2D, "mcq" for a TSV with option columns, else "yorn"."""
    if style not in STYLES:
        raise ValueError(f"--config.prompt must be one of {STYLES}, got {style!r}")
    if style != "auto":
        return style
    if not option_letters(table.columns):
        return "yorn"
    return "ai2d" if "ai2d" in os.path.basename(table.path).lower() else "mcq"


def _cell(record: Mapping[str, str | None], column: str) -> str:
    return (record.get(column) or "").strip()


def _text(record: Mapping[str, str | None], column: str) -> str:
    """A cell as written (VLMEvalKit does not strip prompt text either); "" when it is blank."""
    value = record.get(column) or ""
    return value if value.strip() else ""


def parse_rows(table: Table, style: str, instruction: str | None = None) -> tuple[list[Item], list[Bad]]:
    """Every row as an Item, or as a Bad with its reason (images are checked later, by `decode_images`);
    `instruction`: the model family's multiple-choice line, if it has its own (`build_prompt`)."""
    letters = option_letters(table.columns)
    items, bad, seen = [], [], {}
    for row, record in enumerate(table.rows, start=1):
        index = _cell(record, "index")
        try:
            if None in record or any(v is None for v in record.values()):
                raise BadRow(f"wrong number of cells: the header has {len(table.columns)}")
            if not index:
                raise BadRow("empty index")
            if index in seen:
                raise BadRow(f"duplicate index (first on row {seen[index]})")
            seen[index] = row
            question = _text(record, "question")
            if not question:
                raise BadRow("empty question")
            options = {k: _text(record, k) for k in letters if _text(record, k)}
            answer = _cell(record, "answer")
            if style == "yorn":
                if answer and answer.lower() not in ("yes", "no"):
                    raise BadRow(f"answer {answer!r} is not Yes or No")
                answer = answer.capitalize()
            else:
                if not options:
                    raise BadRow("no options")
                if answer and answer not in options:
                    raise BadRow(f"answer {answer!r} is not one of the options {', '.join(options)}")
            prompt = build_prompt(question, options, _text(record, "hint"), style, instruction)
        except BadRow as err:
            bad.append(Bad(row, index, str(err)))
            continue
        items.append(Item(row, index, record, prompt, options, answer))
    return items, bad


def image_cells(table: Table) -> dict[str, str]:
    """index -> image cell, for resolving rows that name another row's image."""
    return {_cell(r, "index"): _cell(r, "image") for r in table.rows if r.get("index") is not None}


def decode_images(item: Item, images_by_index: Mapping[str, str]) -> list:
    """The row's images as RGB PIL images; BadRow when there is none or one does not decode."""
    import PIL.Image

    from llava_cot_jax.data.image import load_image, to_rgb

    cell = _cell(item.record, "image")
    if not cell:
        raise BadRow("no image")
    if len(cell) <= _REFERENCE_MAX_LEN:  # the index of the row that holds the image
        target = images_by_index.get(cell, "")
        if len(target) <= _REFERENCE_MAX_LEN:
            raise BadRow(f"image refers to row index {cell!r}, which has no image")
        cell = target
    encoded = [cell]
    if cell.startswith("[") and cell.endswith("]"):
        try:
            encoded = [str(x) for x in ast.literal_eval(cell)]
        except (ValueError, SyntaxError):
            raise BadRow("image cell looks like a list but is not one") from None
    images = []
    for n, text in enumerate(encoded, start=1):
        which = f"image {n} of {len(encoded)}" if len(encoded) > 1 else "image"
        try:
            images.append(to_rgb(load_image(base64.b64decode(text))))
        except binascii.Error as err:
            raise BadRow(f"{which} is not base64 ({err})") from None
        except (ValueError, OSError, PIL.Image.DecompressionBombError) as err:
            detail = re.sub(r" <_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(err.__cause__ or err))
            raise BadRow(f"undecodable {which}: {detail}") from None
    if not images:
        raise BadRow("no image")
    return images


# ---------------------------------------------------------------------------------------- answer extraction

_MARKUP = re.compile(r"[*`_]")
_WHOLE_LETTER = re.compile(r"[\s\"'(\[]*([A-Za-z])[\s\"')\].:]*")
_MARKED_LETTER = re.compile(r"\(\s*([A-Za-z])\s*\)|\[\s*([A-Za-z])\s*\]|(?:^|\n)\s*([A-Za-z])[.):](?=\s|$)")
# "the answer is B", "Answer: (c)", "the correct option is D"; then the weaker "option B", "choice (b)".
_LETTER_AFTER = r"\s*(?:is|would\s+be|should\s+be)?\s*[:=]?\s*[(\[]?\s*([A-Za-z])(?![A-Za-z0-9])"
_ANSWER_LETTER = re.compile(r"\b(?:answer|correct\s+(?:option|choice))\b" + _LETTER_AFTER, re.IGNORECASE)
_OPTION_LETTER = re.compile(r"\b(?:option|choice)\b" + _LETTER_AFTER, re.IGNORECASE)
_BEFORE_LOWERCASE_WORD = re.compile(r"\s+(?!(?:is|or|and)\b)[a-z]")
_CAPITAL = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])")


def _one(letters: Iterable[str], options: Mapping[str, str]) -> str | None:
    found = {x for x in letters if x in options}
    return found.pop() if len(found) == 1 else None


def _is_article(text: str, match: re.Match) -> bool:
    """An "A" that opens a sentence before a lowercase word ("A small dog sleeps.") is the article, not option A."""
    before = text[: match.start()].rstrip()
    return (
        match.group(1) == "A"
        and (not before or before[-1] in ".!?")
        and _BEFORE_LOWERCASE_WORD.match(text, match.end()) is not None
    )


def _named_letters(pattern: re.Pattern, text: str) -> list[str]:
    """Letters the pattern names; a lowercase one only when no word follows it ("the answer is a cat")."""
    return [
        m.group(1).upper()
        for m in pattern.finditer(text)
        if m.group(1).isupper() or not re.match(r"\s+[A-Za-z]", text[m.end() :])
    ]


def extract_choice(text: str, options: Mapping[str, str]) -> str:
    """The option letter an answer names, or "" when it names none or several. The first rule that decides wins:

    1. the whole answer is one letter: "B", "b", "(B)", "**B**", "B.";
    2. the letters it marks as options — "(B)", "[b]", or "B." / "B)" / "B:" at the start of a line — are one option;
    3. "answer is B", "Answer: (c)", "the correct option is B" name one option; failing that, "option B",
       "choice (b)" do (a lowercase letter counts only when no word follows it: "the answer is a cat");
    4. one option letter stands alone as a capital ("I pick B, since ..."); "A" opening a sentence before a
       lowercase word is the article ("A small dog ..."), unless that word is "is", "or" or "and";
    5. one option's text appears in it, case-insensitively as whole words ("It is a cat." for "B. cat"); an
       option whose text lies inside a longer option that also appears does not count ("dark red" vs "red").
    """
    text = _MARKUP.sub("", text or "").strip()
    if not text or not options:
        return ""
    whole = _WHOLE_LETTER.fullmatch(text)
    if whole and whole.group(1).upper() in options:
        return whole.group(1).upper()
    marked = _one((next(g for g in m.groups() if g).upper() for m in _MARKED_LETTER.finditer(text)), options)
    if marked:
        return marked
    for pattern in (_ANSWER_LETTER, _OPTION_LETTER):
        if choice := _one(_named_letters(pattern, text), options):
            return choice
    capitals = (m.group(1) for m in _CAPITAL.finditer(text) if not _is_article(text, m))
    if choice := _one(capitals, options):
        return choice
    lowered = " ".join(text.lower().split())
    spans = {}
    for letter, option in options.items():
        option = " ".join(str(option).lower().split())
        found = [m.span() for m in re.finditer(rf"(?<!\w){re.escape(option)}(?!\w)", lowered)] if option else []
        if found:
            spans[letter] = found
    # An option counts unless every place it appears lies inside a longer option found there ("red", "dark red").
    inside_longer = lambda span, letter: any(
        _contains(o, span) for k, found in spans.items() if k != letter for o in found
    )
    hits = [k for k, found in spans.items() if not all(inside_longer(span, k) for span in found)]
    return hits[0] if len(hits) == 1 else ""


def _contains(outer: tuple[int, int], inner: tuple[int, int]) -> bool:
    return outer[0] <= inner[0] and inner[1] <= outer[1] and outer[1] - outer[0] > inner[1] - inner[0]


def extract_yes_no(text: str) -> str:
    """ "Yes" when the answer has the word yes and not no, "No" for the reverse, else "" (VLMEvalKit's rule)."""
    words = set(re.findall(r"[a-z]+", (text or "").lower()))
    if ("yes" in words) != ("no" in words):
        return "Yes" if "yes" in words else "No"
    return ""


# ------------------------------------------------------------------------------------------------- scoring


def extract(item: Item, prediction: str) -> str:
    return extract_choice(prediction, item.options) if item.options else extract_yes_no(prediction)


def score(items: Sequence[Item], outputs: Mapping[str, Mapping[str, str]]) -> list[dict]:
    """One predictions row per item that has an output: its columns (without the base64 image, as VLMEvalKit's
    prediction files), then prediction (the conclusion), raw_output, extracted and hit (1, 0, or "" without
    a gold answer)."""
    rows = []
    for item in items:
        out = outputs.get(item.index)
        if out is None:
            continue
        extracted = extract(item, out["prediction"])
        hit = "" if not item.answer else int(extracted == item.answer)
        kept = {k: v for k, v in item.record.items() if k != "image" and k not in OUTPUT_COLUMNS}
        rows.append(
            dict(kept, prediction=out["prediction"], raw_output=out["raw_output"], extracted=extracted, hit=hit)
        )
    return rows


def _accuracy(rows: Sequence[dict]) -> dict:
    scored = [r for r in rows if r["hit"] != ""]
    correct = sum(r["hit"] for r in scored)
    return {"accuracy": correct / len(scored) if scored else None, "num_scored": len(scored), "num_correct": correct}


def report(rows: Sequence[dict], bad: Sequence[Bad], num_rows: int) -> dict:
    """accuracy.json: overall, per `category` and `l2-category` (when the TSV has them), MMBench's circular
    accuracy (when indexes >= 1e6 mark rotated copies of a question), unanswered and bad rows."""
    result = {
        "num_rows": num_rows,
        "num_evaluated": len(rows),
        **_accuracy(rows),
        "num_unanswered": sum(1 for r in rows if not r["extracted"]),
    }
    for column in ("category", "l2-category"):
        if rows and column in rows[0]:
            groups: dict[str, list] = {}
            for r in rows:
                groups.setdefault(r[column], []).append(r)
            result[f"per_{column.replace('-', '_')}"] = {k: _accuracy(v) for k, v in sorted(groups.items())}
    circular = _circular(rows)
    if circular is not None:
        result["circular"] = circular
    result["num_bad_rows"] = len(bad)
    result["bad_rows"] = [b.as_dict() for b in bad]
    return result


def _circular(rows: Sequence[dict]) -> dict | None:
    """VLMEvalKit's circular evaluation (MMBench): rows whose index differs by a multiple of 1e6 ask the same
    question with the options rotated; the question counts as right only when every copy is."""
    try:
        indexes = [int(r["index"]) for r in rows]
    except ValueError:
        return None
    if not any(i >= 1_000_000 for i in indexes):
        return None
    groups: dict[int, list] = {}
    for i, r in zip(indexes, rows):
        if r["hit"] != "":
            groups.setdefault(i % 1_000_000, []).append(r["hit"])
    right = sum(all(hits) for hits in groups.values())
    return {"accuracy": right / len(groups) if groups else None, "num_questions": len(groups), "num_correct": right}


# ------------------------------------------------------------------------------------------------ writing


def write_tsv(path: str, header: Sequence[str], rows: Iterable[Mapping]) -> None:
    """A TSV with every cell quoted, as VLMEvalKit's own TSVs are (keys of a row not in `header` are left out),
    written atomically."""

    with files.atomic_write(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, header, delimiter="\t", quoting=csv.QUOTE_ALL, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_predictions(path: str, columns: Sequence[str], rows: Sequence[dict]) -> None:
    """predictions.tsv: the input's columns (less `image`) and OUTPUT_COLUMNS."""
    write_tsv(path, [c for c in columns if c != "image" and c not in OUTPUT_COLUMNS] + list(OUTPUT_COLUMNS), rows)
