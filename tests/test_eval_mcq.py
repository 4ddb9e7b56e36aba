"""The evaluation harness (configs/eval_mcq.py): VLMEvalKit TSVs written here, answer extraction, scoring, the
eval mode end to end on a tiny random checkpoint, resumption, and the one-line errors of the entry point."""

import base64
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from llava_cot_jax import config_file
from llava_cot_jax.data import chat
from llava_cot_jax.eval import mcq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_CONFIG = os.path.join(REPO, "configs", "eval_mcq.py")


def b64_image(fmt: str, size=(24, 40), seed=0) -> str:
    pixels = (np.random.default_rng(seed).random((size[0], size[1], 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def write_tsv(path, columns, rows, quoting=csv.QUOTE_MINIMAL) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", quoting=quoting)
        writer.writerow(columns)
        writer.writerows([[row.get(c, "") for c in columns] for row in rows])
    return str(path)


def read_tsv_rows(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


PNG, JPEG = b64_image("PNG", seed=1), b64_image("JPEG", seed=2)
MCQ_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "E", "answer", "category", "source", "image"]
NOT_AN_IMAGE = base64.b64encode(b"this is not an image at all, just text" * 3).decode()


def mcq_row(index, question, options, answer, image, **other):
    return {
        "index": index,
        "question": question,
        **dict(zip("ABCDE", options)),
        "answer": answer,
        "image": image,
        **other,
    }


MCQ_ROWS = [
    mcq_row(
        "1",
        "What animal is shown?",
        ["cat", "dog", "cow", "owl"],
        "B",
        PNG,
        hint="Look at the ears.",
        category="animals",
        source="s1",
    ),
    mcq_row("2", "Is it day?", ["day", "night"], "A", JPEG, category="scenes", source="s2"),
    mcq_row("3", "Which letter?", ["a", "b", "c", "d", "e"], "E", PNG, category="letters"),
    mcq_row("4", "Broken image?", ["x", "y"], "A", NOT_AN_IMAGE, category="animals"),
    mcq_row("5", "No options here?", [], "A", PNG, category="scenes"),
    mcq_row("6", "   ", ["x", "y"], "A", PNG, category="scenes"),
    mcq_row("1000001", "What animal is shown?", ["dog", "cat"], "A", "1", category="animals"),  # row 1's image
    mcq_row("8", "Two images?", ["same", "different"], "B", repr([PNG, JPEG])),
    mcq_row("9", "Bad answer?", ["x", "y"], "F", PNG),
]


# ------------------------------------------------------------------------------------------- reading, prompts


def test_reader_prompts_and_bad_rows(tmp_path):
    table = mcq.read_tsv(write_tsv(tmp_path / "MMStar.tsv", MCQ_COLUMNS, MCQ_ROWS))
    assert mcq.resolve_style("auto", table) == "mcq"
    items, bad = mcq.parse_rows(table, "mcq")
    assert [i.index for i in items] == ["1", "2", "3", "4", "1000001", "8"]
    assert [(b.row, b.index, b.reason) for b in bad] == [
        (5, "5", "no options"),
        (6, "6", "empty question"),
        (9, "9", "answer 'F' is not one of the options A, B"),
    ]
    by_index = {i.index: i for i in items}
    # VLMEvalKit's ImageMCQDataset.build_prompt, written out by hand.
    assert by_index["1"].prompt == (
        "Hint: Look at the ears.\nQuestion: What animal is shown?\nOptions:\nA. cat\nB. dog\nC. cow\nD. owl\n"
        "Please select the correct answer from the options above. \n"
    )
    assert by_index["2"].prompt == (  # no hint; two options (the empty C, D, E cells are no options)
        "Question: Is it day?\nOptions:\nA. day\nB. night\nPlease select the correct answer from the options above. \n"
    )
    assert list(by_index["3"].options) == ["A", "B", "C", "D", "E"]
    assert by_index["3"].record["source"] == ""  # other columns are kept as read

    cells = mcq.image_cells(table)
    assert [im.size for im in mcq.decode_images(by_index["1"], cells)] == [(40, 24)]  # PNG
    jpeg = mcq.decode_images(by_index["2"], cells)[0]
    assert jpeg.mode == "RGB" and jpeg.size == (40, 24)
    shared = mcq.decode_images(by_index["1000001"], cells)  # "1": the image of the row with index 1
    assert np.array_equal(np.asarray(shared[0]), np.asarray(mcq.decode_images(by_index["1"], cells)[0]))
    assert len(mcq.decode_images(by_index["8"], cells)) == 2  # a list of images
    with pytest.raises(mcq.BadRow, match="undecodable image"):
        mcq.decode_images(by_index["4"], cells)
    no_image = mcq.Item(1, "x", {"index": "x", "image": ""}, "", {"A": "a"}, "A")
    with pytest.raises(mcq.BadRow, match="no image"):
        mcq.decode_images(no_image, cells)
    dangling = mcq.Item(1, "x", {"index": "x", "image": "77"}, "", {"A": "a"}, "A")
    with pytest.raises(mcq.BadRow, match="refers to row index '77'"):
        mcq.decode_images(dangling, cells)


def test_malformed_rows_are_bad_rows(tmp_path):
    path = tmp_path / "bench.tsv"
    path.write_text(
        "index\tquestion\tA\tB\tanswer\timage\n"
        f"1\tWhat is it? \tcat\tdog\tA\t{PNG}\n"
        f"1\tAgain?\tcat\tdog\tA\t{PNG}\n"  # the same index twice
        "2\tToo few cells\tcat\n"
        f"3\tToo many\tcat\tdog\tA\t{PNG}\textra\n"
        f"\tNo index\tcat\tdog\tA\t{PNG}\n"
    )
    items, bad = mcq.parse_rows(mcq.read_tsv(str(path)), "mcq")
    assert [i.index for i in items] == ["1"]
    assert items[0].prompt.startswith("Question: What is it? \n")  # text is kept as written, as VLMEvalKit does
    assert [(b.row, b.reason) for b in bad] == [
        (2, "duplicate index (first on row 1)"),
        (3, "wrong number of cells: the header has 6"),
        (4, "wrong number of cells: the header has 6"),
        (5, "empty index"),
    ]


def test_ai2d_and_yes_no_prompts(tmp_path):
    ai2d = mcq.read_tsv(write_tsv(tmp_path / "AI2D_TEST.tsv", MCQ_COLUMNS, MCQ_ROWS[:1]))
    assert mcq.resolve_style("auto", ai2d) == "ai2d"
    [item], _ = mcq.parse_rows(ai2d, "ai2d")
    assert item.prompt == (  # LLaVA-CoT's AI2D prompt (inference/VLMEvalKit/inference_demo.py)
        "Look at the scientific diagram carefully and answer the following question: What animal is shown?\n"
        "A. cat\nB. dog\nC. cow\nD. owl\nRespond only with the correct option digit."
    )
    columns = ["index", "category", "question", "answer", "image"]  # HallusionBench-style: no options, no hint
    rows = [
        {"index": "0", "category": "VD", "question": "Is the cat black?", "answer": "Yes", "image": PNG},
        {"index": "1", "category": "VS", "question": "Is it night?", "answer": "no", "image": JPEG},
        {"index": "2", "category": "VS", "question": "Why?", "answer": "maybe", "image": PNG},
    ]
    table = mcq.read_tsv(write_tsv(tmp_path / "HallusionBench.tsv", columns, rows, quoting=csv.QUOTE_ALL))
    assert mcq.resolve_style("auto", table) == "yorn"
    items, bad = mcq.parse_rows(table, "yorn")
    assert [(i.prompt, i.answer, i.options) for i in items] == [
        ("Is the cat black?", "Yes", {}),
        ("Is it night?", "No", {}),
    ]
    assert [b.reason for b in bad] == ["answer 'maybe' is not Yes or No"]


def test_unreadable_tsv(tmp_path):
    with pytest.raises(FileNotFoundError, match="TSV not found"):
        mcq.read_tsv(str(tmp_path / "missing.tsv"))
    binary = tmp_path / "binary.tsv"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00")
    with pytest.raises(ValueError, match="UTF-8 TSV"):
        mcq.read_tsv(str(binary))
    csv_file = tmp_path / "comma.tsv"
    csv_file.write_text("index,question,A,B,answer,image\n1,q,a,b,A,xx\n")
    with pytest.raises(ValueError, match="not a VLMEvalKit TSV: no index, question, image column"):
        mcq.read_tsv(str(csv_file))
    empty = tmp_path / "empty.tsv"
    empty.write_text("index\tquestion\timage\n")
    with pytest.raises(ValueError, match="no rows"):
        mcq.read_tsv(str(empty))


# ------------------------------------------------------------------------------------------ answer extraction

OPTIONS = {"A": "cat", "B": "dog", "C": "red", "D": "dark red"}


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("B", "B"),
        ("b", "B"),
        ("(B)", "B"),
        ("**B**", "B"),
        ("B.", "B"),
        (" 'C' ", "C"),
        ("B. dog", "B"),
        ("(b) dog", "B"),
        ("D: dark red", "D"),
        ("The answer is B.", "B"),
        ("Answer: (c)", "C"),
        ("The correct option is D, the darker one.", "D"),
        ("Option A is wrong; the answer is C.", "C"),
        ("I pick B, since it barks.", "B"),
        ("A small dog sleeps on the sofa.", "B"),  # "A" is the article; the option text decides
        ("the answer is a dog", "B"),  # a lowercase letter followed by a word is not a choice
        ("It is a dog.", "B"),
        ("DOG", "B"),
        ("dark red", "D"),  # "red" inside "dark red" does not count for C
        ("It is red, not dark red.", ""),  # both appear on their own: ambiguous
        ("Either A or B.", ""),
        ("(A) cat\n(B) dog", ""),
        ("I cannot tell.", ""),
        ("", ""),
        ("42", ""),
    ],
)
def test_extract_choice(answer, expected):
    assert mcq.extract_choice(answer, OPTIONS) == expected


def test_extract_choice_reads_only_the_conclusion():
    raw = (
        "<SUMMARY>Compare options A and B.</SUMMARY><CAPTION>A dog and a cat.</CAPTION>"
        "<REASONING>The cat is in front, so A is tempting, but the question asks for the dog.</REASONING>"
        "<CONCLUSION>The answer is B.</CONCLUSION>"
    )
    assert mcq.extract_choice(chat.extract_conclusion(raw), OPTIONS) == "B"
    cut = "<SUMMARY>s</SUMMARY><CONCLUSION>(D) dark red, because"  # cut off before </CONCLUSION>
    assert mcq.extract_choice(chat.extract_conclusion(cut), OPTIONS) == "D"
    assert mcq.extract_choice(chat.extract_conclusion("C"), OPTIONS) == "C"  # no tags at all


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Yes, there is a cat.", "Yes"),
        ("No.", "No"),
        ("YES", "Yes"),
        ("There is no cat.", "No"),
        ("yes and no", ""),
        ("Not sure.", ""),
        ("", ""),
    ],
)
def test_extract_yes_no(answer, expected):
    assert mcq.extract_yes_no(answer) == expected


def test_scores_and_report_on_known_outputs(tmp_path):
    rows = [
        {"index": str(i), "question": f"q{i}", "A": "cat", "B": "dog", "answer": a, "category": c, "image": PNG}
        for i, a, c in [
            (1, "A", "x"),
            (2, "B", "x"),
            (3, "A", "y"),
            (1000001, "B", "x"),
            (1000003, "B", "y"),
            (4, "", "y"),
        ]
    ]
    table = mcq.read_tsv(
        write_tsv(tmp_path / "MMBench_DEV_EN.tsv", ["index", "question", "A", "B", "answer", "category", "image"], rows)
    )
    items, _ = mcq.parse_rows(table, "mcq")
    outputs = {
        "1": "A",
        "2": "It is a cat.",
        "3": "I don't know",
        "1000001": "(B) dog",
        "1000003": "The answer is B",
        "4": "B",
    }
    scored = mcq.score(
        items, {k: {"prediction": v, "raw_output": f"<CONCLUSION>{v}</CONCLUSION>"} for k, v in outputs.items()}
    )
    assert [(r["extracted"], r["hit"]) for r in scored] == [("A", 1), ("A", 0), ("", 0), ("B", 1), ("B", 1), ("B", "")]
    assert "image" not in scored[0] and scored[0]["raw_output"] == "<CONCLUSION>A</CONCLUSION>"
    result = mcq.report(scored, [mcq.Bad(9, "9", "no options")], num_rows=7)
    assert (result["num_scored"], result["num_correct"], result["accuracy"]) == (5, 3, 3 / 5)
    assert result["num_unanswered"] == 1
    assert result["per_category"] == {
        "x": {"accuracy": 2 / 3, "num_scored": 3, "num_correct": 2},
        "y": {"accuracy": 1 / 2, "num_scored": 2, "num_correct": 1},
    }
    # circular: question 1 (rows 1, 1000001) right in both rotations, question 3 (3, 1000003) wrong in one.
    assert result["circular"] == {"accuracy": 1 / 3, "num_questions": 3, "num_correct": 1}
    assert result["num_bad_rows"] == 1 and result["bad_rows"][0]["reason"] == "no options"


# ------------------------------------------------------------------------------------ the eval mode, end to end


def _config(checkpoint, tsv, **overrides):
    config = config_file.load(EVAL_CONFIG, "runlocal")
    config.model.weights, config.tsv, config.batch_size, config.compilation_cache = checkpoint, tsv, 2, ""
    config.search.max_new_tokens = 6
    for key, value in overrides.items():
        config[key] = value
    return config


def test_eval_resumes_without_redoing_rows(tiny_checkpoint, tmp_path, monkeypatch):
    from llava_cot_jax.eval import run as eval_run
    from llava_cot_jax.generate import cli, stage_search

    asked = []
    original = stage_search.Searcher.ask

    def counting_ask(self, questions, images=None):
        asked.append(list(questions))
        return original(self, questions, images)

    monkeypatch.setattr(stage_search.Searcher, "ask", counting_ask)
    columns = ["index", "question", "A", "B", "C", "D", "E", "answer", "category", "split", "image"]
    rows = [MCQ_ROWS[0], MCQ_ROWS[1], MCQ_ROWS[3], MCQ_ROWS[4], MCQ_ROWS[2]]  # rows 3 and 4 are bad
    tsv = write_tsv(tmp_path / "bench.tsv", columns, [dict(r, split="dev") for r in rows])
    workdir = str(tmp_path / "run")
    items, _ = mcq.parse_rows(mcq.read_tsv(tsv), "mcq")
    prompt = {i.index: i.prompt for i in items}

    assert eval_run.run(_config(tiny_checkpoint, tsv), workdir) == 0
    # Batches of 2: rows 1, 2; then row 4 (undecodable, dropped) and row 3, padded with a copy of row 3.
    assert asked == [[prompt["1"], prompt["2"]], [prompt["3"], prompt["3"]]]
    predictions = read_tsv_rows(os.path.join(workdir, "predictions.tsv"))
    assert list(predictions[0]) == [c for c in columns if c != "image"] + list(mcq.OUTPUT_COLUMNS)
    assert [p["index"] for p in predictions] == ["1", "2", "3"]
    for p, item in zip(predictions, [i for i in items if i.index in ("1", "2", "3")]):
        assert p["extracted"] == mcq.extract_choice(p["prediction"], item.options)
        assert p["hit"] == str(int(p["extracted"] == item.answer))
        assert p["prediction"] == chat.extract_conclusion(p["raw_output"])
    # random weights may write only special tokens (decoded to nothing) on a row, not on every row
    assert any(p["raw_output"] for p in predictions)
    result = json.loads(Path(workdir, "accuracy.json").read_text())
    assert (result["num_rows"], result["num_evaluated"], result["num_scored"]) == (5, 3, 3)
    assert result["accuracy"] == sum(int(p["hit"]) for p in predictions) / 3
    assert set(result["per_category"]) == {"animals", "scenes", "letters"}
    assert [(b["index"], b["reason"].split(":")[0]) for b in result["bad_rows"]] == [
        ("4", "undecodable image"),
        ("5", "no options"),
    ]

    # An interruption: the last row's line is lost and the one before is half written.
    progress = os.path.join(workdir, "progress.jsonl")
    lines = Path(progress).read_text(encoding="utf-8").splitlines(keepends=True)
    with open(progress, "w", encoding="utf-8") as f:
        f.write(lines[0] + lines[1][: len(lines[1]) // 2])
    asked.clear()
    assert eval_run.run(_config(tiny_checkpoint, tsv), workdir) == 0
    assert asked == [[prompt["2"], prompt["3"]]]  # row 1 is not asked again
    again = read_tsv_rows(os.path.join(workdir, "predictions.tsv"))
    assert [p["index"] for p in again] == ["1", "2", "3"] and again[0] == predictions[0]
    assert len(Path(progress).read_text(encoding="utf-8").splitlines()) == 3  # the cut line was replaced, not kept

    # Prompts stripped as training strips questions: asked stripped, and never mixed with unstripped answers.
    stripped = _config(tiny_checkpoint, tsv, strip_prompt=True, limit=1)
    with pytest.raises(ValueError, match=r"other settings \(changed: strip_prompt\)"):
        eval_run.run(stripped, workdir)
    asked.clear()
    assert prompt["1"] != prompt["1"].strip()
    assert eval_run.run(stripped, str(tmp_path / "stripped")) == 0
    assert asked == [[prompt["1"].strip(), prompt["1"].strip()]]

    # Everything answered: a rerun rebuilds the reports without loading the model.
    monkeypatch.setattr(cli, "build_searcher", lambda *a, **k: pytest.fail("model loaded with nothing to do"))
    assert eval_run.run(_config(tiny_checkpoint, tsv), workdir) == 0
    assert read_tsv_rows(os.path.join(workdir, "predictions.tsv")) == again
    # Other search settings in the same workdir are refused rather than mixed into one predictions file.
    other = _config(tiny_checkpoint, tsv)
    other.search.method = "sample"
    with pytest.raises(ValueError, match=r"other settings \(changed: search\)"):
        eval_run.run(other, workdir)


def _main(tmp_path, *args):
    cmd = [
        sys.executable,
        "-m",
        "llava_cot_jax.main",
        f"--config={EVAL_CONFIG}:runlocal",
        *args,
        f"--config.compilation_cache={tmp_path}/xla",
    ]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, check=False)


def test_eval_through_main_with_stage_search(tiny_checkpoint, tmp_path):
    tsv = write_tsv(tmp_path / "bench.tsv", MCQ_COLUMNS, MCQ_ROWS[:3])
    out = _main(
        tmp_path,
        f"--workdir={tmp_path}/run",
        f"--config.model.weights={tiny_checkpoint}",
        f"--config.tsv={tsv}",
        "--config.batch_size=2",
        "--config.search.method=stage",
        "--config.search.stage_max_new_tokens=4",
        "--config.search.judge_max_new_tokens=2",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "overall" in out.stdout
    result = json.loads((tmp_path / "run" / "accuracy.json").read_text())
    assert result["method"] == "stage" and result["num_evaluated"] == 3 and result["num_bad_rows"] == 0
    assert len(read_tsv_rows(tmp_path / "run" / "predictions.tsv")) == 3


def test_eval_errors_are_one_line(tiny_checkpoint, tmp_path):
    tsv = write_tsv(tmp_path / "bench.tsv", MCQ_COLUMNS, MCQ_ROWS[:1])
    not_tsv = tmp_path / "image.tsv"
    not_tsv.write_bytes(base64.b64decode(PNG))
    cases = [
        (["--config.search.mehtod=stage"], "unknown config key search.mehtod"),
        (["--config.infer.search=stage"], "unknown config key infer.search"),
        (["--config.checkpoint=x"], "config key checkpoint is now model.weights"),
        (["--config.infer.num_candidates=2"], "config key infer.num_candidates is now search.num_candidates"),
        (["--config.search=stage"], "--config.search is a group"),
        ([f"--config.model.weights={tmp_path}/nope", f"--config.tsv={tsv}"], "must be a checkpoint directory"),
        ([f"--config.model.weights={tmp_path}", f"--config.tsv={tsv}"], "is not a checkpoint"),
        ([f"--config.model.weights={tiny_checkpoint}", f"--config.tsv={tmp_path}/nope.tsv"], "TSV not found"),
        ([f"--config.model.weights={tiny_checkpoint}", f"--config.tsv={not_tsv}"], "cannot read"),
    ]
    for args, message in cases:
        out = _main(tmp_path, f"--workdir={tmp_path}/run", *args)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), (args, out.stderr[-2000:])
        assert message in lines[0], (args, lines)
