"""The study mode (configs/study.py): its statistics and vote, and `:runlocal` end to end through the one entry point
(every phase on a few scenes and steps: its accuracies mean nothing, so the test checks the outputs' contract), then
a second run in the same workdir that reuses everything."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from llava_cot_jax import config_file, study

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "study.py")


# ------------------------------------------------------------------------------------------------ statistics


def test_bootstrap_interval_covers_the_true_proportion_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    p, n, trials = 0.7, 200, 200
    covered = 0
    for trial in range(trials):
        lo, hi = study.bootstrap_interval(rng.random(n) < p, resamples=1000, seed=trial)
        covered += lo <= p <= hi
    assert 0.88 <= covered / trials <= 0.99
    lo, hi = study.bootstrap_interval([1] * 70 + [0] * 30, resamples=1000)
    assert lo < 0.7 < hi and hi - lo < 0.25  # about +-1.96 * sqrt(0.21 / 100) = +-0.09


def test_bootstrap_interval_of_constant_hits_is_a_point():
    assert study.bootstrap_interval([1, 1, 1, 1]) == (1.0, 1.0)
    assert study.bootstrap_interval([0] * 10) == (0.0, 0.0)


def test_paired_difference():
    hits = np.random.default_rng(0).integers(0, 2, 50)
    same = study.paired_difference(hits, hits)
    assert same == {"difference": 0.0, "lo": 0.0, "hi": 0.0}
    better = study.paired_difference(np.ones(40), np.r_[np.ones(20), np.zeros(20)], resamples=500)
    assert better["difference"] == pytest.approx(0.5)
    assert 0.3 < better["lo"] <= 0.5 <= better["hi"] < 0.7
    with pytest.raises(ValueError, match="differ in size"):
        study.paired_difference([1, 0], [1])


def test_majority_vote():
    assert study.majority_vote(["B", "A", "B", "C"]) == "B"
    assert study.majority_vote(["C", "A", "A", "C"]) == "C"  # a tie goes to the answer seen first
    assert study.majority_vote(["", "", "D"]) == "D"  # unanswered samples do not vote
    assert study.majority_vote(["", ""]) == ""
    assert study.majority_vote([]) == ""


def test_conclusion_of_each_answer_format():
    from llava_cot_jax.data import synthetic

    _, sample = synthetic.mcq_scene(0, 1, synthetic.REASONING_KINDS, 1.8)
    for answer_format in synthetic.ANSWER_FORMATS:
        assert study.conclusion_of(synthetic.format_answer(sample, answer_format), answer_format) == sample.conclusion


def test_trace_tokens_counts_candidates_and_scorer_tokens():
    trace = [
        {"candidates": [{"num_tokens": 5}, {"num_tokens": 7}], "scorer_tokens": {"read": 40, "generated": 8}},
        {"candidates": [{"num_tokens": 3}], "scorer_tokens": {"read": 0, "generated": 0}},
        {"candidates": [{"num_tokens": 2}]},  # a step without a scorer (one candidate)
    ]
    assert study.trace_tokens(trace) == {"candidate_tokens": 17, "judge_tokens": 8, "scorer_read_tokens": 40}


def test_scaling_runs_share_the_sample_runs():
    config = config_file.load(CONFIG, None)
    config.scaling.num_candidates = (4, 2)
    names = [name for name, *_ in study.scaling_runs(config)]
    searches = ("best_of_n", "sentence", "stage", "best_of_n_reward", "stage_reward")
    assert names == [
        "greedy",
        "sample_seed0",
        "sample_seed1",
        "sample_seed2",
        "sample_seed3",
        *[f"{m}_n{n}" for m in searches for n in (2, 4)],
        "swires_n4",
    ]
    assert study.needs_reward_model(config)
    config.scaling.methods = "greedy,stage"
    assert not study.needs_reward_model(config)
    config.scaling.methods = "greedy,beam"
    with pytest.raises(ValueError, match="beam"):
        study.scaling_runs(config)


# -------------------------------------------------------------------------------------------------- runlocal


def _main(workdir, cache):
    start = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llava_cot_jax.main",
            "--config",
            f"{CONFIG}:runlocal",
            f"--workdir={workdir}",
            f"--config.compilation_cache={cache}",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
        cwd=workdir,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, time.perf_counter() - start


def _json(path):
    with open(path) as f:
        return json.load(f)


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def runlocal(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("study")
    cache = str(tmp_path_factory.mktemp("xla"))
    stdout, seconds = _main(workdir, cache)
    return workdir, cache, stdout, seconds


def _check_interval(entry):
    lo, hi = entry["interval"]
    assert lo <= entry["accuracy"] <= hi, entry
    assert 0 <= lo and hi <= 1


def test_runlocal_writes_every_method_and_interval(runlocal):
    workdir, _, stdout, _ = runlocal
    config = config_file.load(CONFIG, "runlocal")
    results = _json(workdir / study.RESULTS_FILE)
    ns = list(config.scaling.num_candidates)

    formats = results["ablation"]["formats"]
    assert list(formats) == ["direct", "untagged", "tagged"]
    for entry in formats.values():
        assert entry["num_questions"] == config.data.heldout_questions
        _check_interval(entry)
        for per_kind in entry["per_kind"].values():
            _check_interval(per_kind)
        assert sum(k["num_questions"] for k in entry["per_kind"].values()) == entry["num_questions"]
    for d in results["ablation"]["differences"].values():
        assert d["lo"] <= d["difference"] <= d["hi"]

    runs = results["scaling"]["runs"]
    got = [(r["method"], r["num_candidates"]) for r in runs]
    want = [("greedy", 1), ("sample", 1)] + [(m, n) for m in ("self_consistency", *study.SEARCHES) for n in ns]
    want = [(m, n) for m, n in want if m != "swires"] + [("swires", n) for n in config.scaling.swires_num_candidates]
    assert got == want
    for r in runs:
        _check_interval(r)
        assert r["num_questions"] == config.data.heldout_questions
        d = r["difference_to_greedy"]
        assert d["lo"] <= d["difference"] <= d["hi"]
        tokens = r["tokens_per_question"]
        assert tokens["total"] == pytest.approx(tokens["candidates"] + tokens["judge"])
        assert tokens["candidates"] > 0
        if r["method"] in ("greedy", "sample", "self_consistency"):
            assert tokens["judge"] == tokens["scorer_read"] == 0  # no judge asked
        if study.SEARCHES.get(r["method"], ("", ""))[1] == "reward":
            assert tokens["judge"] == 0 and tokens["scorer_read"] > 0  # the reward model reads, generates nothing
    assert runs[0]["difference_to_greedy"] == {"difference": 0.0, "lo": 0.0, "hi": 0.0}

    # Self-consistency at N votes over the first N sample runs: its tokens are theirs, added up.
    by_name = {(r["method"], r["num_candidates"]): r for r in runs}
    samples = [_lines(workdir / "scaling" / f"sample_seed{s}.jsonl") for s in range(max(ns))]
    for n in ns:
        expected = np.mean([sum(run[i]["candidate_tokens"] for run in samples[:n]) for i in range(len(samples[0]))])
        assert by_name[("self_consistency", n)]["tokens_per_question"]["candidates"] == pytest.approx(expected)

    pass_at = results["scaling"]["pass_at_n"]
    assert list(pass_at) == [str(n) for n in ns]
    sample_accuracy = by_name[("sample", 1)]["accuracy"]
    assert all(p["accuracy"] >= sample_accuracy for p in pass_at.values())  # any of N samples >= the first one
    judge = results["judge"]
    assert judge["num_pairs"] == 3 * config.judge.scenes and 0 <= judge["picks_response_1"] <= 1
    assert set(judge["per_stage"]) == {"CAPTION", "REASONING", "CONCLUSION"}
    reward = results["reward_model"]
    assert reward["num_questions"] == 3 * config.reward.heldout_scenes
    _check_interval(reward)
    assert os.path.isdir(reward["checkpoint"]) and np.isfinite(reward["swires_threshold"])
    report = (workdir / study.REPORT_FILE).read_text()
    assert "| stage | 2 |" in report and "| stage_reward | 2 |" in report and "| reward model |" in report
    assert "Answer format ablation" in stdout


def test_runlocal_figures(runlocal):
    workdir, *_ = runlocal
    figures = _json(workdir / study.RESULTS_FILE)["figures"]
    assert figures["ablation"]["series"] == ["direct", "untagged", "tagged"]
    assert figures["scaling"]["series"] == list(study.METHODS)
    for figure in figures.values():
        with Image.open(figure["path"]) as image:
            image.verify()
            assert image.format == "PNG"
        with Image.open(figure["path"]) as image:
            assert image.size[0] >= 400 and image.size[1] >= 300
            assert len(image.convert("RGB").getcolors(1 << 16)) > 10  # something is drawn


def test_runlocal_rerun_reuses_everything(runlocal):
    workdir, cache, _, first_seconds = runlocal
    checkpoints = sorted(workdir.glob("models/*/train/checkpoints/*"))
    kept = {
        p: p.stat().st_mtime_ns
        for p in [*checkpoints, *workdir.glob("scaling/*.jsonl"), *workdir.glob("eval/*/progress.jsonl")]
    }
    before = _json(workdir / study.RESULTS_FILE)

    stdout, seconds = _main(workdir, cache)
    assert "reusing what an earlier run" in stdout
    assert "== training" not in stdout and "to run" not in stdout
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert seconds < first_seconds / 3
    after = _json(workdir / study.RESULTS_FILE)
    assert after["scaling"]["runs"] == before["scaling"]["runs"]
    assert after["ablation"] == before["ablation"]


def test_other_settings_in_the_same_workdir_are_refused(runlocal):
    workdir, *_ = runlocal
    config = config_file.load(CONFIG, "runlocal")
    config.scaling.num_candidates = (2, 4)
    with pytest.raises(ValueError, match=r"other settings \(changed: scaling\)"):
        study.run(config, str(workdir))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("data.formats", "direct,untagged", "must include tagged"),
        ("data.formats", "tagged,boxed", "data.formats"),
        ("data.kinds", "remove,shape", "data.kinds"),
        ("scaling.methods", "greedy,beam", "scaling.methods"),
    ],
)
def test_bad_settings_are_clear_errors_before_any_work(tmp_path, key, value, message):
    config = config_file.load(CONFIG, "runlocal")
    group, name = key.split(".")
    config[group][name] = value
    with pytest.raises(ValueError, match=message):
        study.run(config, str(tmp_path / "study"))
    assert not (tmp_path / "study").exists()
