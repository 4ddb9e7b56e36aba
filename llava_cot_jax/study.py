"""`mode = "study"`: LLaVA-CoT's two claims on the synthetic reasoning task (configs/study.py).

    python -m llava_cot_jax.main --config configs/study.py --workdir DIR

1. Structured reasoning helps: three models of the same size, initial weights, steps and scenes, trained on the
   same questions (`synthetic.REASONING_KINDS`) and differing only in the answer: the conclusion alone ("direct"),
   the four stages without tags ("untagged"), the tagged stages ("tagged"), each evaluated greedily on held-out
   questions.
2. Stage-level search scales better: on the tagged model, greedy, one sample (T 0.6, top-p 0.9), self-consistency
   (majority vote over N samples), best-of-N, the sentence-level beam and the stage-level beam at each N, with the
   tokens each generates per question (candidates and judge replies).

Phases, each kept in DIR and reused by a later run with the same settings (DIR/study_settings.json):
1. data      DIR/data/train/{direct,untagged,tagged}: the same scenes in each answer format
             (`synthetic.write_answer_formats`); DIR/data/heldout.tsv: held-out questions from another seed as a
             VLMEvalKit TSV; DIR/data/judge_prompts.json: the demo's short judge prompts (the search reads them).
2. train     DIR/models/FORMAT/{init,train}: the trainer, from the same random init (demo.train).
3. ablation  DIR/eval/greedy_FORMAT: the evaluation harness, greedy, on every held-out question. The answer is
             read from each format's conclusion: the CONCLUSION stage (tagged), the last paragraph (untagged), the
             whole reply (direct).
4. scaling   DIR/scaling/RUN.jsonl: every method and N on the first `scaling.questions` held-out questions, one
             line per question (its answer, hit, generated tokens, seconds), appended as they finish.
5. report    DIR/study.json (every number), DIR/study.md (the tables), DIR/ablation.png, DIR/scaling.png.

Generated tokens per question: a candidate's count comes from the search's trace (`num_tokens`, EOS included);
judge and screen replies are in the trace as text only, so they are counted by re-tokenizing that text with the
model's tokenizer (special tokens are not in the text, so a reply's EOS is not counted).
Intervals: 95% percentile bootstrap over questions, and paired bootstrap of the difference of two methods on the
same questions (`stats.resamples`, `stats.seed`).
"""

from __future__ import annotations

import collections
import csv
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from llava_cot_jax import demo, files

SETTINGS_FILE = "study_settings.json"
RESULTS_FILE = "study.json"
REPORT_FILE = "study.md"
TIMINGS_FILE = "timings.json"
ABLATION_FIGURE = "ablation.png"
SCALING_FIGURE = "scaling.png"
JUDGE_FILE = "judge.json"
REWARD_FILE = "reward.json"
# Search methods with N candidates: the study's name -> (the Searcher's method, its scorer). "_reward" variants
# keep candidates by the study's reward model instead of the self-judge; swires always does.
SEARCHES = {
    "best_of_n": ("best_of_n", "self_judge"),
    "sentence": ("sentence", "self_judge"),
    "stage": ("stage", "self_judge"),
    "best_of_n_reward": ("best_of_n", "reward"),
    "stage_reward": ("stage", "reward"),
    "swires": ("swires", "reward"),
}
METHODS = ("greedy", "sample", "self_consistency", *SEARCHES)
SINGLE = ("greedy", "sample")  # one answer per question: no N
# SWIRES's threshold is their reward model's mean + Z * std with Z = 0.2533 (the 60th percentile of a normal;
# inference/VLMEvalKit/swires.py); ours applies the same rule to our reward model's rewards on training pairs.
SWIRES_Z = 0.2533
STAGE_COLUMNS = ("CAPTION", "REASONING", "CONCLUSION")  # the stages judge and reward model are measured on


# ------------------------------------------------------------------------------------------------- statistics


def bootstrap_interval(
    hits: Sequence[float], resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `hits` (questions drawn with replacement)."""
    hits = np.asarray(hits, float)
    if hits.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = hits[rng.integers(0, hits.size, (resamples, hits.size))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def paired_difference(
    a: Sequence[float], b: Sequence[float], resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> dict:
    """mean(a) - mean(b) over the same questions, with its paired bootstrap interval (one draw of questions
    resamples both, so what the questions share cancels)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in size: {a.shape} vs {b.shape}")
    lo, hi = bootstrap_interval(a - b, resamples, seed, level)
    return {"difference": float((a - b).mean()) if a.size else float("nan"), "lo": lo, "hi": hi}


def majority_vote(answers: Sequence[str]) -> str:
    """The most frequent non-empty answer; a tie goes to the tied answer that came first; "" when none."""
    counts = collections.Counter(a for a in answers if a)
    if not counts:
        return ""
    top = max(counts.values())
    return next(a for a in answers if a and counts[a] == top)


def _summary(hits: Sequence[int], kinds: Sequence[str], stats) -> dict:
    """Accuracy with its interval, overall and per question kind."""
    per_kind = {}
    for kind in sorted(set(kinds)):
        kind_hits = [h for h, k in zip(hits, kinds) if k == kind]
        per_kind[kind] = _accuracy(kind_hits, stats)
    return {**_accuracy(hits, stats), "per_kind": per_kind}


def _accuracy(hits: Sequence[int], stats) -> dict:
    lo, hi = bootstrap_interval(hits, stats.resamples, stats.seed)
    return {
        "accuracy": float(np.mean(hits)) if len(hits) else None,
        "interval": [lo, hi],
        "num_questions": len(hits),
        "num_correct": int(sum(hits)),
    }


# ---------------------------------------------------------------------------------------------------- answers


def conclusion_of(text: str, answer_format: str) -> str:
    """The part of a reply that states the answer, as each answer format writes it (`synthetic.format_answer`):
    the CONCLUSION stage (tagged), the last paragraph (untagged: the earlier paragraphs name other numbers and
    colours), the whole reply (direct)."""
    from llava_cot_jax.data import chat

    if answer_format == "tagged":
        return chat.extract_conclusion(text)
    if answer_format == "untagged":
        paragraphs = [p.strip() for p in text.strip().split("\n\n") if p.strip()]
        return paragraphs[-1] if paragraphs else ""
    if answer_format == "direct":
        return text.strip()
    raise ValueError(f"unknown answer format {answer_format!r}")


def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _num_tokens(tokenizer, text: str | None) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


def trace_tokens(trace: list[dict]) -> dict[str, int]:
    """Tokens one question cost a search, from its trace: the tokens its candidates generated, the tokens its
    scorer generated (judge and screen replies) and the tokens its scorer read (a reward model reads every
    candidate with the answer before it; a judge reads its prompts)."""
    scorer = [step.get("scorer_tokens", {}) for step in trace]
    return {
        "candidate_tokens": sum(c["num_tokens"] for step in trace for c in step["candidates"]),
        "judge_tokens": sum(t.get("generated", 0) for t in scorer),
        "scorer_read_tokens": sum(t.get("read", 0) for t in scorer),
    }


# ------------------------------------------------------------------------------------------------------- data


def write_data(config, data_dir: str) -> dict:
    """The training sets (one per answer format, the same scenes), the held-out TSV and the judge prompts, each
    written only when missing."""
    from llava_cot_jax.data import pairs as pairs_lib
    from llava_cot_jax.data import synthetic
    from llava_cot_jax.generate.judge import JudgePrompts

    d = config.data
    kinds, formats = _split(d.kinds), _split(d.formats)
    os.makedirs(data_dir, exist_ok=True)
    paths = {
        "train": {f: os.path.join(data_dir, "train", f) for f in formats},
        "heldout": os.path.join(data_dir, "heldout.tsv"),
        "judge_prompts": os.path.join(data_dir, "judge_prompts.json"),
        "pairs": os.path.join(data_dir, "pairs"),
    }
    if not os.path.exists(paths["judge_prompts"]):
        files.write_json_atomic(paths["judge_prompts"], demo.JUDGE_PROMPTS, indent=1)
    prompts = JudgePrompts.load(paths["judge_prompts"])

    def judge_turns(index, objects, sample):
        """A judge example (right stage against a corrupted one, "Better response: N") for a share of scenes."""
        rng = np.random.default_rng([d.train_seed, index, 1])
        return [demo.judge_example(rng, objects, sample, prompts)[1:]] if rng.random() < d.judge_fraction else []

    missing = tuple(f for f in formats if not os.path.isfile(os.path.join(paths["train"][f], synthetic.JSONL_NAME)))
    if missing:
        print(f"writing {d.train_scenes} training scenes in the formats {', '.join(missing)}")
        synthetic.write_answer_formats(
            os.path.join(data_dir, "train"),
            d.train_scenes,
            d.train_seed,
            kinds,
            d.object_scale,
            d.image_size,
            missing,
            overwrite=True,
            progress=True,
            extra_turns=judge_turns,
        )
    if config.reward.steps and not os.path.isfile(os.path.join(paths["pairs"], pairs_lib.PAIRS_JSONL)):
        print(f"writing reward-model pairs of {config.reward.train_scenes} training scenes")
        pairs_lib.write_pairs(
            paths["pairs"], d.train_seed, config.reward.train_scenes, kinds, d.object_scale, d.image_size
        )
    if not os.path.exists(paths["heldout"]):
        demo.write_heldout_tsv(
            paths["heldout"], d.heldout_seed, d.heldout_questions, kinds, d.object_scale, d.image_size
        )
    return paths


def heldout_items(tsv: str, limit: int = 0) -> list:
    """The held-out questions as the evaluation harness reads them (prompts stripped, as the models trained)."""
    import dataclasses

    from llava_cot_jax.eval import mcq

    table = mcq.read_tsv(tsv)
    items, bad = mcq.parse_rows(table, "mcq")
    if bad:
        raise ValueError(f"{tsv}: bad rows {[b.as_dict() for b in bad]}")
    items = [dataclasses.replace(item, prompt=item.prompt.strip()) for item in items]
    return items[:limit] if limit else items


# ------------------------------------------------------------------------------------------------------ train


def _last_step(run_dir: str) -> int | None:
    steps_dir = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(steps_dir):
        return None
    return max((int(s) for s in os.listdir(steps_dir) if s.isdigit()), default=None)


def train_models(config, workdir: str, paths: dict, timings: dict) -> dict[str, str]:
    """One model per answer format, from the same initial weights (the same seed); a finished one is not touched."""
    checkpoints = {}
    for answer_format, train_dir in paths["train"].items():
        model_dir = os.path.join(workdir, "models", answer_format)
        done, steps = _last_step(os.path.join(model_dir, "train")), config.trainer.train.num_steps
        if done is not None and steps and done >= steps:  # finished (by epochs: the trainer itself decides)
            checkpoints[answer_format] = os.path.join(model_dir, "train", "checkpoints", str(done))
            continue
        length = f"{steps} steps" if steps else f"{config.trainer.train.epochs} epochs"
        print(f"\n== training the {answer_format} model ({length})")
        start = time.perf_counter()
        checkpoints[answer_format] = demo.train(config, model_dir, {"train": train_dir})
        timings[f"train_{answer_format}_s"] = time.perf_counter() - start
    return checkpoints


# --------------------------------------------------------------------------------------------------- ablation


def ablation(config, workdir: str, paths: dict, checkpoints: dict, timings: dict) -> dict:
    """Greedy on every held-out question with each model (the evaluation harness), scored on each format's
    conclusion; per format: accuracy with its interval, per kind, generated tokens per question."""
    from llava_cot_jax import loading
    from llava_cot_jax.eval import mcq

    items = {item.index: item for item in heldout_items(paths["heldout"])}
    results, hits_by_format = {}, {}
    for answer_format, checkpoint in checkpoints.items():
        name = f"greedy_{answer_format}"
        out = os.path.join(workdir, "eval", name)
        if not os.path.exists(os.path.join(out, "accuracy.json")):
            start = time.perf_counter()
            demo.evaluate(config, workdir, name, paths["heldout"], checkpoint, "greedy")
            timings[f"eval_{answer_format}_s"] = time.perf_counter() - start
        tokenizer = loading.load_processor(demo.mode_config(config, {}, "eval", checkpoint).model).tokenizer
        hits, kinds, tokens = [], [], []
        for row in _read_predictions(os.path.join(out, "predictions.tsv")):
            item = items[row["index"]]
            extracted = mcq.extract(item, conclusion_of(row["raw_output"], answer_format))
            hits.append(int(extracted == item.answer))
            kinds.append(row["category"])
            tokens.append(_num_tokens(tokenizer, row["raw_output"]))
        hits_by_format[answer_format] = hits
        results[answer_format] = {
            **_summary(hits, kinds, config.stats),
            "tokens_per_question": float(np.mean(tokens)),
            "checkpoint": checkpoint,
            "seconds": timings.get(f"eval_{answer_format}_s"),
        }
    pairs = [(a, b) for a, b in (("tagged", "direct"), ("untagged", "direct"), ("tagged", "untagged"))]
    differences = {
        f"{a}-{b}": paired_difference(hits_by_format[a], hits_by_format[b], config.stats.resamples, config.stats.seed)
        for a, b in pairs
        if a in hits_by_format and b in hits_by_format
    }
    return {"formats": results, "differences": differences}


def _read_predictions(path: str) -> list[dict]:
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


# ----------------------------------------------------------------------------------------- judge and reward


def judge_phase(config, workdir: str, paths: dict, checkpoint: str) -> dict:
    """The tagged model as a judge on held-out (right, corrupted) stage pairs (`demo.judge_accuracy`): accuracy
    per stage and how often it answers "Better response: 1". Kept in DIR/judge.json."""
    path = os.path.join(workdir, JUDGE_FILE)
    if not os.path.exists(path):
        cases = demo.judge_pairs(config, config.judge.scenes)
        print(f"\n== judge: {len(cases)} held-out pairs, the right stage against a corrupted one")
        start = time.perf_counter()
        result = demo.judge_accuracy(config, checkpoint, paths["judge_prompts"], cases)
        result["seconds"] = time.perf_counter() - start
        files.write_json_atomic(path, result, indent=1)
    with open(path) as f:
        return json.load(f)


def train_reward_model(config, workdir: str, paths: dict, init: str, timings: dict) -> str:
    """A reward model (the tagged model's weights plus a scalar head) trained by the trainer with the pairwise
    Bradley-Terry loss on the training scenes' stage pairs (`data/pairs.write_pairs`); returns its checkpoint."""
    from llava_cot_jax.train import trainer

    run_dir = os.path.join(workdir, "models", "reward", "train")
    done, steps = _last_step(run_dir), config.reward.steps
    if done is not None and done >= steps:
        return os.path.join(run_dir, "checkpoints", str(done))
    print(f"\n== training the reward model ({steps} steps on {config.reward.train_scenes * 3} pairs)")
    t = demo.mode_config(config, config.trainer, "train", weights=init)
    t.train.objective = "pairwise"
    t.data.train, t.data.image_root = paths["pairs"], ""
    t.train.num_steps, t.optimizer.learning_rate = steps, config.reward.learning_rate
    t.optimizer.warmup_steps = min(t.optimizer.warmup_steps, max(steps // 10, 1))
    t.checkpointing.every_steps = steps
    start = time.perf_counter()
    code = trainer.run(t, run_dir)
    if code:
        raise RuntimeError(f"reward-model training stopped with exit code {code}; see {run_dir}")
    timings["train_reward_s"] = time.perf_counter() - start
    return os.path.join(run_dir, "checkpoints", str(_last_step(run_dir)))


def pair_rewards(config, reward_checkpoint: str, cases: list, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rewards of the right sides, rewards of the corrupted sides) of stage pairs from scenes of `seed`, each
    read as the search's reward scorer reads a candidate (the question with its image, the answer so far)."""
    from tqdm import tqdm

    from llava_cot_jax import loading
    from llava_cot_jax.data import synthetic
    from llava_cot_jax.generate import scorer as scorer_lib
    from llava_cot_jax.generate.config import search_config
    from llava_cot_jax.generate.stage_search import question_image_arrays, question_inputs

    d = config.data
    infer = demo.mode_config(config, {}, "infer", weights=reward_checkpoint)
    processor = loading.load_processor(infer.model)
    model = scorer_lib.load_reward_model(reward_checkpoint, dtype=config.model.dtype)
    size, bos = config.eval.batch_size, search_config(config.search, config.seed).bos
    right, wrong = [], []
    for start in tqdm(range(0, len(cases), size), desc="rewards", unit="batch"):
        batch = cases[start : start + size]
        questions = [synthetic.mcq_prompt(pair.sample) for pair in batch]
        scenes = [synthetic.mcq_scene(seed, pair.index, _split(d.kinds), d.object_scale)[0] for pair in batch]
        inputs = question_inputs(processor, questions, [[synthetic.render_scene(o, d.image_size)] for o in scenes])
        arrays = question_image_arrays(inputs)
        image = lambda q, arrays=arrays: {key: value[q] for key, value in arrays.items()}
        scorer = scorer_lib.RewardScorer(model, processor.tokenizer, image, bos=bos)
        answers = [p.chosen for p in batch] + [p.rejected for p in batch]
        rewards = scorer.score(questions * 2, answers, list(range(len(batch))) * 2)
        right += list(rewards[: len(batch)])
        wrong += list(rewards[len(batch) :])
    return np.asarray(right), np.asarray(wrong)


def reward_phase(config, workdir: str, paths: dict, tagged: str, timings: dict) -> dict:
    """Trains the reward model, measures its accuracy on held-out pairs (the right side rewarded higher) and sets
    SWIRES's threshold from its rewards on training pairs (SWIRES_Z). Kept in DIR/reward.json."""
    from llava_cot_jax.data import pairs as pairs_lib

    checkpoint = train_reward_model(config, workdir, paths, tagged, timings)
    path = os.path.join(workdir, REWARD_FILE)
    if not os.path.exists(path):
        d, r = config.data, config.reward
        kinds = _split(d.kinds)
        heldout = pairs_lib.stage_pairs(d.heldout_seed, r.heldout_scenes, kinds, d.object_scale)
        print(f"\n== reward model: {len(heldout)} held-out pairs")
        right, wrong = pair_rewards(config, checkpoint, heldout, d.heldout_seed)
        hits = (right > wrong).astype(int)
        stages = [p.stage for p in heldout]
        calibration = pairs_lib.stage_pairs(d.train_seed, r.calibration_scenes, kinds, d.object_scale)
        cal_right, cal_wrong = pair_rewards(config, checkpoint, calibration, d.train_seed)
        every = np.concatenate([cal_right, cal_wrong])
        result = {
            "checkpoint": checkpoint,
            **_summary(list(hits), stages, config.stats),
            "swires_threshold": float(every.mean() + SWIRES_Z * every.std()),
            "calibration_pairs": len(calibration),
            "mean_reward": {"right": float(right.mean()), "corrupted": float(wrong.mean())},
        }
        files.write_json_atomic(path, result, indent=1)
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------------- scaling


def scaling_runs(config) -> list[tuple[str, str, int, int]]:
    """(run name, Searcher method, N, seed) of every search run the scaling phase needs: greedy, one sample run
    per seed self-consistency votes over (the first is the `sample` method), each search at each N."""
    methods = _split(config.scaling.methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"scaling.methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    ns = sorted({int(n) for n in config.scaling.num_candidates})
    if not ns or ns[0] < 1:
        raise ValueError(f"scaling.num_candidates={tuple(config.scaling.num_candidates)} must be >= 1")
    runs = []
    if "greedy" in methods:
        runs.append(("greedy", "greedy", 1, config.seed))
    samples = max(ns) if "self_consistency" in methods else (1 if "sample" in methods else 0)
    runs += [(f"sample_seed{s}", "sample", 1, config.seed + s) for s in range(samples)]
    for m in (m for m in SEARCHES if m in methods):
        runs += [(f"{m}_n{n}", m, n, config.seed) for n in method_candidates(config, m)]
    return runs


def method_candidates(config, method: str) -> list[int]:
    """The N a search method runs at: scaling.num_candidates, or for swires (one question per call, the
    costliest) scaling.swires_num_candidates."""
    values = config.scaling.swires_num_candidates if method == "swires" else config.scaling.num_candidates
    return sorted({int(n) for n in values})


def needs_reward_model(config) -> bool:
    return any(SEARCHES[m][1] == "reward" for m in _split(config.scaling.methods) if m in SEARCHES)


def search_run(config, workdir: str, name: str, method: str, n: int, seed: int, checkpoint: str, items) -> list:
    """One method on the held-out items through `Searcher.ask`, one JSON line per question in
    DIR/scaling/NAME.jsonl (a rerun answers only the questions missing there). Returns the records in item order."""
    from tqdm import tqdm

    from llava_cot_jax.eval import mcq
    from llava_cot_jax.eval.run import Progress
    from llava_cot_jax.generate import cli

    os.makedirs(os.path.join(workdir, "scaling"), exist_ok=True)
    progress = Progress(os.path.join(workdir, "scaling", f"{name}.jsonl"))
    pending = [item for item in items if item.index not in progress.done]
    if pending:
        infer = demo.mode_config(config, {}, "infer", weights=checkpoint)
        infer.seed = seed
        infer.search.method, infer.search.num_candidates = SEARCHES.get(method, (method,))[0], n
        if method in SEARCHES:
            infer.search.scorer = SEARCHES[method][1]
        searcher = cli.build_searcher(infer)
        images_by_index = mcq.image_cells(mcq.read_tsv(heldout_tsv(workdir)))
        size = 1 if infer.search.method == "swires" else config.scaling.batch_size  # SWIRES: one question a call
        with tqdm(total=len(pending), desc=name, unit="question") as bar:
            for start in range(0, len(pending), size):
                batch = pending[start : start + size]
                padded = batch + [batch[-1]] * (size - len(batch))  # one compiled program for every batch
                t0 = time.perf_counter()
                results = searcher.ask(
                    [item.prompt for item in padded], [mcq.decode_images(item, images_by_index) for item in padded]
                )
                seconds = (time.perf_counter() - t0) / len(batch)
                records = []
                for item, result in zip(batch, results):
                    extracted = mcq.extract(item, result.conclusion)
                    records.append(
                        {
                            "index": item.index,
                            "category": item.record.get("category", ""),
                            "conclusion": result.conclusion,
                            "extracted": extracted,
                            "hit": int(extracted == item.answer),
                            **trace_tokens(result.trace),
                            "seconds": seconds,
                        }
                    )
                progress.add(records)
                bar.update(len(batch))
    return [progress.done[item.index] for item in items]


def heldout_tsv(workdir: str) -> str:
    """Where `write_data` puts the held-out TSV."""
    return os.path.join(workdir, "data", "heldout.tsv")


def scaling(config, workdir: str, checkpoint: str, timings: dict) -> dict:
    """Every method at every N on the tagged model: accuracy with its interval, the paired difference to greedy,
    generated tokens and seconds per question. `series` lists the points of each method (the scaling figure)."""
    items = heldout_items(heldout_tsv(workdir), config.scaling.questions)
    answers = {}
    for name, method, n, seed in scaling_runs(config):
        before = os.path.exists(os.path.join(workdir, "scaling", f"{name}.jsonl"))
        start = time.perf_counter()
        answers[name] = search_run(config, workdir, name, method, n, seed, checkpoint, items)
        if not before:  # a resumed run keeps its per-question seconds in its records
            timings[f"scaling_{name}_s"] = time.perf_counter() - start

    methods = _split(config.scaling.methods)
    ns = sorted({int(n) for n in config.scaling.num_candidates})
    points = []  # (method, N, records)
    if "greedy" in methods:
        points.append(("greedy", 1, answers["greedy"]))
    if "sample" in methods:
        points.append(("sample", 1, answers[f"sample_seed{0}"]))
    if "self_consistency" in methods:
        for n in ns:
            points.append(("self_consistency", n, _voted([answers[f"sample_seed{s}"] for s in range(n)], items)))
    points += [(m, n, answers[f"{m}_n{n}"]) for m in SEARCHES if m in methods for n in method_candidates(config, m)]

    greedy_hits = [r["hit"] for r in answers["greedy"]] if "greedy" in answers else None
    runs = []
    for method, n, records in points:
        hits = [r["hit"] for r in records]
        candidate = float(np.mean([r["candidate_tokens"] for r in records]))
        judge = float(np.mean([r["judge_tokens"] for r in records]))
        read = float(np.mean([r["scorer_read_tokens"] for r in records]))
        run = {
            "method": method,
            "num_candidates": n,
            **_summary(hits, [r["category"] for r in records], config.stats),
            "tokens_per_question": {
                "candidates": candidate,
                "judge": judge,
                "total": candidate + judge,
                "scorer_read": read,
            },
            "seconds_per_question": float(np.mean([r["seconds"] for r in records])),
            "num_unanswered": sum(1 for r in records if not r["extracted"]),
        }
        if greedy_hits is not None:
            run["difference_to_greedy"] = paired_difference(
                hits, greedy_hits, config.stats.resamples, config.stats.seed
            )
        runs.append(run)
    # What any selector could reach: the share of questions where one of N independent samples is right (pass@N),
    # the ceiling of a perfect judge or reward model over N whole answers.
    samples = [[r["hit"] for r in answers[name]] for name in sorted(answers) if name.startswith("sample_seed")]
    pass_at = {str(n): _accuracy(np.max(samples[:n], axis=0).tolist(), config.stats) for n in ns if n <= len(samples)}
    return {
        "num_questions": len(items),
        "num_candidates": ns,
        "methods": list(methods),
        "runs": runs,
        "pass_at_n": pass_at,
        "tokens_counted": (
            "generated tokens (total) = candidates' tokens + judge and screen replies' tokens, each from the search "
            "trace; scorer_read = tokens the judge or reward model read"
        ),
    }


def _voted(sample_runs: list[list[dict]], items) -> list[dict]:
    """Self-consistency: per question, the majority of the sample runs' extracted letters; tokens and seconds add
    up over the runs."""
    voted = []
    for i, item in enumerate(items):
        records = [run[i] for run in sample_runs]
        extracted = majority_vote([r["extracted"] for r in records])
        voted.append(
            {
                "index": item.index,
                "category": records[0]["category"],
                "extracted": extracted,
                "hit": int(extracted == item.answer),
                "candidate_tokens": sum(r["candidate_tokens"] for r in records),
                "judge_tokens": sum(r["judge_tokens"] for r in records),
                "scorer_read_tokens": 0,
                "seconds": sum(r["seconds"] for r in records),
            }
        )
    return voted


# ----------------------------------------------------------------------------------------------------- report


def plot_ablation(path: str, ablation_results: dict, chance: float) -> list[str]:
    """Bars of each format's greedy accuracy with its 95% interval; returns the bars' labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    formats = list(ablation_results["formats"])
    acc = [ablation_results["formats"][f]["accuracy"] for f in formats]
    lo = [a - ablation_results["formats"][f]["interval"][0] for f, a in zip(formats, acc)]
    hi = [ablation_results["formats"][f]["interval"][1] - a for f, a in zip(formats, acc)]
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    ax.bar(formats, acc, yerr=[lo, hi], capsize=6, color=["#999999", "#6a9fd4", "#1f5fa8"][: len(formats)])
    ax.axhline(chance, color="black", linestyle=":", label=f"chance ({chance:.0%})")
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_title("answer format ablation (95% bootstrap intervals)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return [tick.get_text() for tick in ax.get_xticklabels()]


def plot_scaling(path: str, scaling_results: dict, chance: float) -> list[str]:
    """Accuracy against generated tokens per question (log scale), one series per method with 95% intervals;
    returns the legend's series names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for method in METHODS:
        runs = [r for r in scaling_results["runs"] if r["method"] == method]
        if not runs:
            continue
        x = [r["tokens_per_question"]["total"] for r in runs]
        y = [r["accuracy"] for r in runs]
        err = [[a - r["interval"][0] for a, r in zip(y, runs)], [r["interval"][1] - a for a, r in zip(y, runs)]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method)
        if method not in SINGLE:
            for xi, yi, r in zip(x, y, runs):
                ax.annotate(f"N={r['num_candidates']}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(chance, color="gray", linestyle=":")  # unlabelled: the legend lists the methods only
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel("generated tokens per question (candidates + judge)")
    ax.set_ylabel("accuracy (tagged model)")
    ax.set_title(f"inference scaling on {scaling_results['num_questions']} held-out questions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return ax.get_legend_handles_labels()[1]


def _pct(value) -> str:
    return "-" if value is None or np.isnan(value) else f"{100 * value:.1f}"


def _interval(d: dict) -> str:
    return f"[{_pct(d['interval'][0])}, {_pct(d['interval'][1])}]"


def write_markdown(path: str, results: dict) -> str:
    """The tables of DIR/study.md (accuracies in percent with their 95% intervals)."""
    a, s = results["ablation"], results["scaling"]
    kinds = sorted({k for f in a["formats"].values() for k in f["per_kind"]})
    lines = [
        "# LLaVA-CoT study on the synthetic reasoning task",
        "",
        (
            f"{results['num_heldout']} held-out questions ({', '.join(results['kinds'])}), four options each "
            f"(chance {_pct(results['chance'])}%); accuracies in %, 95% bootstrap intervals in brackets."
        ),
        "",
        "## Answer format ablation (greedy)",
        "",
        "| format | accuracy | 95% interval | " + " | ".join(kinds) + " | tokens / question (reply re-tokenized) |",
        "|---|---|---|" + "---|" * len(kinds) + "---|",
    ]
    for name, f in a["formats"].items():
        per_kind = " | ".join(_pct(f["per_kind"].get(k, {}).get("accuracy")) for k in kinds)
        lines.append(
            f"| {name} | {_pct(f['accuracy'])} | {_interval(f)} | {per_kind} | {f['tokens_per_question']:.1f} |"
        )
    lines += ["", "| difference | points | 95% paired interval |", "|---|---|---|"]
    for name, d in a["differences"].items():
        lines.append(f"| {name} | {_pct(d['difference'])} | [{_pct(d['lo'])}, {_pct(d['hi'])}] |")
    j, r = results.get("judge"), results.get("reward_model")
    if j or r:
        lines += ["", "## Scorers on held-out (right, corrupted) stage pairs (chance 50)", ""]
        lines += ["| scorer | pairs | accuracy | " + " | ".join(STAGE_COLUMNS) + " | picks response 1 |"]
        lines += ["|---|---|---|" + "---|" * len(STAGE_COLUMNS) + "---|"]
    if j:
        per_stage = " | ".join(_pct(j["per_stage"].get(stage)) for stage in STAGE_COLUMNS)
        lines.append(
            f"| self-judge (greedy verdict) | {j['num_pairs']} | {_pct(j['accuracy'])} | {per_stage} "
            f"| {_pct(j['picks_response_1'])} (no verdict {_pct(j['no_verdict'])}) |"
        )
    if r:
        per_stage = " | ".join(_pct(r["per_kind"].get(stage, {}).get("accuracy")) for stage in STAGE_COLUMNS)
        lines.append(
            f"| reward model | {r['num_questions']} | {_pct(r['accuracy'])} {_interval(r)} | {per_stage} | - |"
        )
    lines += [
        "",
        f"## Inference scaling (tagged model, first {s['num_questions']} held-out questions)",
        "",
        "| method | N | accuracy | 95% interval | vs greedy (paired 95%) | candidate tokens | judge tokens "
        "| scorer read tokens | s / q |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s["runs"]:
        d = r.get("difference_to_greedy")
        diff = f"{_pct(d['difference'])} [{_pct(d['lo'])}, {_pct(d['hi'])}]" if d else "-"
        t = r["tokens_per_question"]
        n = "-" if r["method"] in SINGLE else r["num_candidates"]
        lines.append(
            f"| {r['method']} | {n} | {_pct(r['accuracy'])} | {_interval(r)} | {diff} | {t['candidates']:.1f} "
            f"| {t['judge']:.1f} | {t['scorer_read']:.0f} | {r['seconds_per_question']:.2f} |"
        )
    if s.get("pass_at_n"):
        lines += [
            "",
            "Candidate diversity: pass@N, the share of questions where one of N samples is right (the ceiling ",
        ]
        lines[-1] += "of a perfect selector over N sampled answers):"
        lines += ["", "| N | " + " | ".join(s["pass_at_n"]) + " |", "|---|" + "---|" * len(s["pass_at_n"])]
        lines.append(
            "| pass@N | " + " | ".join(f"{_pct(p['accuracy'])} {_interval(p)}" for p in s["pass_at_n"].values()) + " |"
        )
    lines += ["", f"Tokens: {s['tokens_counted']}.", ""]
    text = "\n".join(lines)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return text


# -------------------------------------------------------------------------------------------------------- run


def _load_timings(workdir: str) -> dict:
    path = os.path.join(workdir, TIMINGS_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def run(config, workdir: str = "") -> int:
    from llava_cot_jax.data import synthetic

    kinds, formats = _split(config.data.kinds), _split(config.data.formats)
    if not kinds or any(k not in synthetic.REASONING_KINDS + synthetic.MCQ_KINDS for k in kinds):
        raise ValueError(f"data.kinds={config.data.kinds!r}: choose from {', '.join(synthetic.REASONING_KINDS)}")
    if not formats or any(f not in synthetic.ANSWER_FORMATS for f in formats):
        raise ValueError(f"data.formats={config.data.formats!r}: choose from {', '.join(synthetic.ANSWER_FORMATS)}")
    if "tagged" not in formats:
        raise ValueError("data.formats must include tagged: the scaling phase searches the tagged model")
    scaling_runs(config)  # checks the methods and N before any work
    if needs_reward_model(config) and config.reward.steps < 1:
        raise ValueError("scaling.methods has reward-scored searches: set reward.steps >= 1 (or drop them)")
    workdir = os.path.abspath(workdir or os.path.join(tempfile.gettempdir(), "llava_cot_jax_study"))
    os.makedirs(workdir, exist_ok=True)
    demo._claim(workdir, config, write=False, settings_file=SETTINGS_FILE)
    timings = _load_timings(workdir)
    save_timings = lambda: files.write_json_atomic(os.path.join(workdir, TIMINGS_FILE), timings, indent=1)
    run_start = time.perf_counter()

    start = time.perf_counter()
    paths = write_data(config, os.path.join(workdir, "data"))
    demo._claim(workdir, config, settings_file=SETTINGS_FILE)  # recorded with the first result (see demo._claim)
    config.search.prompts_file = paths["judge_prompts"]
    timings.setdefault("data_s", time.perf_counter() - start)
    save_timings()

    checkpoints = train_models(config, workdir, paths, timings)
    save_timings()
    ablation_results = ablation(config, workdir, paths, checkpoints, timings)
    save_timings()
    judge_results = judge_phase(config, workdir, paths, checkpoints["tagged"]) if config.judge.scenes else None
    reward_results = None
    if needs_reward_model(config):
        reward_results = reward_phase(config, workdir, paths, checkpoints["tagged"], timings)
        save_timings()
        config.search.reward_weights = reward_results["checkpoint"]
        config.search.swires_threshold = reward_results["swires_threshold"]
    scaling_results = scaling(config, workdir, checkpoints["tagged"], timings)
    save_timings()

    chance = 1 / len(synthetic.OPTION_LETTERS)
    figures = {
        "ablation": {"path": os.path.join(workdir, ABLATION_FIGURE)},
        "scaling": {"path": os.path.join(workdir, SCALING_FIGURE)},
    }
    figures["ablation"]["series"] = plot_ablation(figures["ablation"]["path"], ablation_results, chance)
    figures["scaling"]["series"] = plot_scaling(figures["scaling"]["path"], scaling_results, chance)
    results = {
        "chance": chance,
        "num_heldout": config.data.heldout_questions,
        "kinds": list(kinds),
        "ablation": ablation_results,
        "judge": judge_results,
        "reward_model": reward_results,
        "scaling": scaling_results,
        "training": {
            "steps": config.trainer.train.num_steps,
            "global_batch": config.trainer.train.global_batch,
            "train_scenes": config.data.train_scenes,
            "judge_fraction": config.data.judge_fraction,
            "reward_steps": config.reward.steps,
            "model_preset": config.model.preset,
            "checkpoints": checkpoints,
        },
        "stats": {"resamples": config.stats.resamples, "seed": config.stats.seed, "level": 0.95},
        "figures": figures,
        "seconds": {**timings, "this_run_s": time.perf_counter() - run_start},
    }
    files.write_json_atomic(os.path.join(workdir, RESULTS_FILE), results, indent=1)
    print("\n" + write_markdown(os.path.join(workdir, REPORT_FILE), results))
    print(f"results: {os.path.join(workdir, RESULTS_FILE)}; figures: {', '.join(f['path'] for f in figures.values())}")
    return 0
