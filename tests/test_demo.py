"""The README's first command: the offline demo (data, training, held-out evaluation greedy / image-blind / stage
search, results and loss curve) runs end to end through the one entry point, on `configs/demo.py:runlocal` (a
few samples and steps: its accuracy means nothing, so the test checks the outputs' contract), and a second run in
the same workdir reuses everything."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from llava_cot_jax import config_file, demo
from llava_cot_jax.data import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "demo.py")


def _main(workdir, cache, *overrides):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "llava_cot_jax.main",
            "--config",
            f"{CONFIG}:runlocal",
            f"--workdir={workdir}",
            f"--config.compilation_cache={cache}",
            *overrides,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
        cwd=workdir,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def _run_demo(workdir, cache):
    result = _main(workdir, cache)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _json(path):
    with open(path) as f:
        return json.load(f)


def _tsv(path):
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    cache = tmp_path_factory.mktemp("xla")
    return workdir, cache, _run_demo(workdir, cache)


def test_every_phase_writes_its_outputs(demo_run):
    workdir, cache, stdout = demo_run
    results = _json(workdir / demo.RESULTS_FILE)
    accuracy = results["accuracy"]
    assert accuracy["chance"] == 0.25 and results["bar"]["two_times_chance"] == 0.5
    for key in ("image_blind", "greedy", "search", "image_blind_subset", "greedy_subset"):
        assert 0.0 <= accuracy[key] <= 1.0, key
    met = accuracy["greedy"] >= 0.5 and accuracy["greedy"] > accuracy["image_blind"]
    assert results["bar"]["met"] == met
    assert results["num_heldout"] == 8 and results["num_search_questions"] == 4
    assert results["search"] == {"method": "stage", "num_candidates": 2}
    assert results["judge"]["num_pairs"] == 4 and set(results["judge"]["per_stage"]) <= set(demo.JUDGE_STAGES)
    assert results["training"]["steps"] == 4 and results["training"]["last_loss"] < results["training"]["first_loss"]
    for line in (
        "chance (1 / options)",
        "image-blind (greedy, blank image)",
        "stage search (N=2)",
        "judge picks the right stage (50%)",
        "against greedy on the same 4 questions:",
        "held-out accuracy (greedy)",
    ):
        assert line in stdout
    assert len(os.listdir(cache)) > 5  # compiled programs kept for the next run

    # Data: the LLaVA-CoT layout with four-stage answers and judge examples; held-out TSVs with and without scenes.
    lines = (workdir / "data" / "train" / synthetic.JSONL_NAME).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    answers = [r["conversations"][1]["value"] for r in records]
    assert sum(a.startswith("<SUMMARY>") for a in answers) == 48
    assert {a for a in answers if not a.startswith("<SUMMARY>")} <= {"Better response: 1", "Better response: 2"}
    assert len(answers) > 48
    heldout, blind = _tsv(workdir / "data" / "heldout.tsv"), _tsv(workdir / "data" / "heldout_blind.tsv")
    drop_image = lambda rows: [{k: v for k, v in r.items() if k != "image"} for r in rows]
    assert len(heldout) == 8 and drop_image(heldout) == drop_image(blind)
    assert len({r["image"] for r in blind}) == 1 and len({r["image"] for r in heldout}) == 8

    # Training through the trainer; evaluations through the harness.
    assert (workdir / "train" / "checkpoints" / "4").is_dir()
    assert len((workdir / "train" / "metrics.jsonl").read_text().splitlines()) == 4
    for name, rows, method in (("greedy", 8, "greedy"), ("blind", 8, "greedy"), ("stage", 4, "stage")):
        report = _json(workdir / "eval" / name / "accuracy.json")
        assert report["method"] == method and report["num_evaluated"] == rows, name
        assert len(_tsv(workdir / "eval" / name / "predictions.tsv")) == rows
    judge_prompts = _json(workdir / "data" / "judge_prompts.json")
    assert set(judge_prompts["compare"]) == {"summary", "caption", "reasoning", "conclusion"}

    with Image.open(workdir / demo.LOSS_CURVE) as curve:
        assert curve.format == "PNG" and curve.size == (640, 400)


def test_a_second_run_reuses_data_checkpoint_and_answers(demo_run):
    workdir, cache, _ = demo_run
    before = _json(workdir / demo.RESULTS_FILE)
    train_jsonl = (workdir / "data" / "train" / synthetic.JSONL_NAME).stat().st_mtime_ns
    stdout = _run_demo(workdir, cache)
    assert "reusing what an earlier run with these settings made" in stdout
    assert "resumed from" in stdout and "trained to step 4" in stdout
    assert stdout.count("0 to run") == 3  # every evaluation found all its answers
    assert (workdir / "data" / "train" / synthetic.JSONL_NAME).stat().st_mtime_ns == train_jsonl
    after = _json(workdir / demo.RESULTS_FILE)
    assert after["accuracy"] == before["accuracy"]


def test_other_settings_in_the_same_workdir_are_refused(demo_run):
    workdir, _, _ = demo_run
    config = config_file.load(CONFIG, "runlocal")
    config.data.train_scenes = 40
    with pytest.raises(ValueError, match=r"other settings \(changed: data\)"):
        demo.run(config, str(workdir))


def test_bad_settings_are_clear_errors(tmp_path):
    config = config_file.load(CONFIG, "runlocal")
    config.data.kinds = "color,shape"
    with pytest.raises(ValueError, match="data.kinds='color,shape': choose from color, count"):
        demo.run(config, str(tmp_path))
    with pytest.raises(ValueError, match="runlocal or none"):
        config_file.load(CONFIG, "fast")
    assert not os.listdir(tmp_path)


def test_the_entry_point_reports_bad_settings_in_one_line(tmp_path):
    result = _main(tmp_path, tmp_path / "xla", "--config.data.kinds=color,shape")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: data.kinds='color,shape': choose from color, count (--verbose shows the traceback)"
    ]


def test_loss_curve_is_a_png_of_the_logged_losses(tmp_path):
    records = [{"step": s, "loss": 3.0 / s} for s in range(1, 9)] + [{"step": 4, "eval_loss": 1.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    curves = demo._loss_curves(str(tmp_path))
    assert curves == {"training": [(s, 3.0 / s) for s in range(1, 9)], "held-out": [(4, 1.5)]}
    path = tmp_path / demo.LOSS_CURVE
    demo.plot_curves(str(path), curves, "loss during training", "loss")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (640, 400)
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert (pixels == (31, 119, 180)).all(axis=1).sum() > 100  # the first curve, in matplotlib's first colour
    assert sorted(os.listdir(tmp_path)) == sorted(["metrics.jsonl", demo.LOSS_CURVE])  # no temporary left behind


def test_judge_examples_pit_the_right_stage_against_a_wrong_one():
    from llava_cot_jax.generate.judge import JudgePrompts

    prompts = JudgePrompts(compare=dict(JudgePrompts().compare, **demo.JUDGE_PROMPTS["compare"]))
    seen = set()
    for index in range(40):
        objects, sample = synthetic.mcq_scene(0, index)
        stage, text, reply = demo.judge_example(np.random.default_rng(index), objects, sample, prompts)
        right = prompts.parse_choice(reply)
        responses = [text.split(f"Response {k}: ")[1].split("\n\nResponse")[0] for k in (1, 2)]
        assert responses[right] == getattr(sample, stage.lower()) != responses[1 - right]
        assert text.startswith(demo.JUDGE_PROMPTS["compare"][stage.lower()].split("\n")[0])
        seen.add((stage, right))
    assert {s for s, _ in seen} == set(demo.JUDGE_STAGES) and {r for _, r in seen} == {0, 1}


def test_the_llava_family_runs_every_phase(tmp_path):
    """`--config.model.family=llava`: the init phase builds `LlavaConfig.demo()` with the tiny Vicuna tokenizer,
    the trainer trains it on the same data, and the harness asks the held-out questions in its template (the
    training questions end with LLaVA-1.5's multiple-choice line, as the harness asks this family)."""
    from llava_cot_jax import checkpoint
    from llava_cot_jax.data import mcq_prompt
    from llava_cot_jax.data.llava_processor import LlavaProcessor
    from llava_cot_jax.models.llava.config import LlavaConfig

    workdir = tmp_path / "demo"
    workdir.mkdir()
    result = _main(workdir, tmp_path / "xla", "--config.model.family=llava", "--config.data.judge_fraction=0")
    assert result.returncode == 0, result.stderr[-3000:]
    init = checkpoint.load_config(str(workdir / "init"))
    assert isinstance(init, LlavaConfig) and init.text == LlavaConfig.demo().text and init.image_tokens == 64
    processor = LlavaProcessor.from_pretrained(checkpoint.side_files_dir(str(workdir / "init")))
    assert processor.image_token_id == init.image_token_id and len(processor.tokenizer) == 1024

    record = json.loads((workdir / "data" / "train" / synthetic.JSONL_NAME).read_text().splitlines()[0])
    _, sample = synthetic.mcq_scene(0, 0, ("color", "count"), 1.8)
    asked = mcq_prompt.build_prompt(sample.question, sample.option_map(), "", "mcq", LlavaProcessor.mcq_instruction)
    assert record["conversations"][0]["value"] == "<image>\n" + asked.strip()

    results = _json(workdir / demo.RESULTS_FILE)
    assert results["training"]["steps"] == 4 and (workdir / "train" / "checkpoints" / "4").is_dir()
    assert results["num_heldout"] == 8 and results["judge"] is None
    for name, rows in (("greedy", 8), ("blind", 8), ("stage", 4)):
        assert _json(workdir / "eval" / name / "accuracy.json")["num_evaluated"] == rows, name
    for line in ("chance (1 / options)", "image-blind (greedy, blank image)", "stage search (N=2)", "greedy"):
        assert line in result.stdout
    assert (workdir / demo.LOSS_CURVE).is_file() and (workdir / "trace.json").is_file()


def test_build_demo_checkpoint_defaults_to_the_tiny_model(tmp_path):
    from llava_cot_jax import checkpoint
    from llava_cot_jax.models.mllama.config import MllamaConfig

    demo.build_demo_checkpoint(str(tmp_path / "ckpt"))
    assert checkpoint.load_config(str(tmp_path / "ckpt")).text == MllamaConfig.tiny().text


def test_judge_accuracy_reads_verdicts_as_response_numbers(tmp_path, monkeypatch):
    """A judge that always answers "Better response: 1", on held-out pairs whose right side is first in exactly
    half: 50% right and position bias 1. (The search's parser numbers responses from 0; the pairs from 1.)"""
    import types

    from llava_cot_jax.generate import cli

    class AlwaysFirst:
        def ask(self, texts, images):
            return [types.SimpleNamespace(text="Better response: 1") for _ in texts]

    monkeypatch.setattr(cli, "build_searcher", lambda config: AlwaysFirst())
    config = config_file.load(os.path.join(REPO, "configs", "demo.py"), "runlocal")
    prompts = tmp_path / "judge_prompts.json"
    prompts.write_text(json.dumps(demo.JUDGE_PROMPTS))
    cases = demo.judge_pairs(config, 4)
    result = demo.judge_accuracy(config, "unused", str(prompts), cases)
    assert result["num_pairs"] == 12 and result["accuracy"] == 0.5
    assert result["picks_response_1"] == 1.0 and result["no_verdict"] == 0.0
    assert result["per_stage"] == {"CAPTION": 0.5, "REASONING": 0.5, "CONCLUSION": 0.5}
