"""`mode = "demo"`: a small Mllama (or a small LLaVA-1.5, with model.family=llava) learns, on a laptop CPU and
offline, to answer multiple-choice questions about synthetic scenes, through the real trainer, evaluation harness
and stage-level search (configs/demo.py).

    python -m llava_cot_jax.main --config configs/demo.py --workdir DIR

Phases, each kept in DIR and reused by a later run with the same settings:
1. data    DIR/data/train: CLEVR-like scenes with four-option questions and four-stage answers in the LLaVA-CoT-100k
           layout (train.jsonl + images/), plus judge examples (a correct stage against a corrupted one, in the
           judge prompts of DIR/data/judge_prompts.json) so that the model learns to judge its own candidates;
           DIR/data/heldout.tsv: held-out questions as a VLMEvalKit TSV (base64 images), and heldout_blind.tsv:
           the same questions with a blank floor for the image.
2. init    DIR/init: random weights of the family's demo model (`MllamaConfig.demo()`, `LlavaConfig.demo()`), its
           tiny tokenizer and image processor, saved as a checkpoint the trainer starts from (`model.weights`).
3. train   DIR/train: the trainer (mesh, Orbax train-state checkpoints, Grain); a rerun resumes from the last
           checkpoint, and a finished run does no steps.
4. eval    DIR/eval/{greedy,blind,SEARCH}: the evaluation harness on the held-out TSV with greedy decoding, on the
           blind TSV (what the model answers without seeing the scene), and with the search method on the first
           `search_questions` rows; a rerun resumes from each run's progress file.
5. report  the table (chance, image-blind, greedy, search), DIR/demo_results.json and DIR/loss_curve.png.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import tempfile
import time

import numpy as np

from llava_cot_jax import files

SETTINGS_FILE = "demo_settings.json"
RESULTS_FILE = "demo_results.json"
LOSS_CURVE = "loss_curve.png"

# Short judge prompts for a small model with a small vocabulary (the defaults are written for LLaVA-CoT's 11B model);
# the demo trains on them and its search reads them through `prompts_file`, as a user's override would. {question}
# is the whole multiple-choice prompt, options included.
_RESPONSES = "\n\nResponse 1: {response_1}\n\nResponse 2: {response_2}"
JUDGE_PROMPTS = {
    "compare": {
        "summary": "Which plan fits the question?\n\n{question}" + _RESPONSES,
        "caption": "Which description matches the image?" + _RESPONSES,
        "reasoning": "Which reasoning is right?\n\n{question}\nDescription: {hint}" + _RESPONSES,
        "conclusion": "Which answer is right?\n\n{question}\nReasoning: {hint}" + _RESPONSES,
    },
}
# The stages the demo trains the judge on (plans hardly differ: a summary match is settled any way it goes).
JUDGE_STAGES = ("CAPTION", "REASONING", "CONCLUSION")


def build_demo_checkpoint(path: str, seed: int = 0, config=None, gate: float = 0.5) -> str:
    """Random weights of `config` (an architecture config of any family; default `MllamaConfig.tiny()`) saved as a
    llava_cot_jax checkpoint with its family's built-in processor (a tiny tokenizer and an image processor for its
    image size). Mllama: random init leaves the cross-attention gates at zero (as a fresh Llama-3.2-Vision has
    them); they are set to `gate` so that the image reaches the text from the start. LLaVA has no gates: its image
    tokens are in the prompt."""
    import jax.numpy as jnp
    from flax import nnx

    from llava_cot_jax import checkpoint, families
    from llava_cot_jax.models.mllama.config import MllamaConfig

    config = config or MllamaConfig.tiny()
    family = families.of(config)
    model = family.model_class(config, rngs=nnx.Rngs(seed))
    if family.name == "mllama":
        cross = model.language_model.cross_layers
        cross.cross_attn_attn_gate[...] = jnp.full_like(cross.cross_attn_attn_gate[...], gate)
        cross.cross_attn_mlp_gate[...] = jnp.full_like(cross.cross_attn_mlp_gate[...], gate)
    with tempfile.TemporaryDirectory() as side:
        family.built_in_processor(config).save_pretrained(side)
        checkpoint.save_model(path, model, side_files_from=side, overwrite=True)
    return path


# ------------------------------------------------------------------------------------------------------ data


def _kinds(data_cfg) -> tuple[str, ...]:
    return tuple(k.strip() for k in data_cfg.kinds.split(",") if k.strip())


def mcq_instruction(config) -> str | None:
    """The closing line of a multiple-choice question as the evaluation harness asks the model's family (None:
    VLMEvalKit's; LLaVA-1.5 has its own), so that the demo trains on the questions it is asked."""
    from llava_cot_jax import loading

    return loading.family(config.model).processor_class.mcq_instruction


def judge_example(
    rng: np.random.Generator, objects, sample, prompts, instruction: str | None = None
) -> tuple[str, str, str]:
    """(stage, prompt, reply): the correct stage against a corrupted one, in random order, for a random stage of
    JUDGE_STAGES, asked as the stage search asks (the hint is what the search shows: the caption for reasoning,
    caption + reasoning for the conclusion) and answered "Better response: N"; `instruction` as `mcq_prompt`'s."""
    from llava_cot_jax.data import synthetic

    stage = JUDGE_STAGES[rng.integers(len(JUDGE_STAGES))]
    right = getattr(sample, stage.lower())
    wrong = synthetic.corrupt_stage(rng, objects, sample, stage)
    first_right = bool(rng.integers(2))
    hint = {"REASONING": sample.caption, "CONCLUSION": f"{sample.caption}\n{sample.reasoning}"}.get(stage, "")
    responses = (right, wrong) if first_right else (wrong, right)
    text = prompts.compare_text(stage.lower(), synthetic.mcq_prompt(sample, instruction), *responses, hint)
    return stage, text, f"Better response: {1 if first_right else 2}"


def write_data(config, data_dir: str) -> dict[str, str]:
    """The training set, the held-out TSVs and the judge prompts (each written only when missing)."""
    from llava_cot_jax.data import synthetic
    from llava_cot_jax.generate.judge import JudgePrompts

    d = config.data
    kinds = _kinds(d)
    os.makedirs(data_dir, exist_ok=True)
    paths = {
        "train": os.path.join(data_dir, "train"),
        "heldout": os.path.join(data_dir, "heldout.tsv"),
        "blind": os.path.join(data_dir, "heldout_blind.tsv"),
        "judge_prompts": os.path.join(data_dir, "judge_prompts.json"),
    }
    if not os.path.exists(paths["judge_prompts"]):
        files.write_json_atomic(paths["judge_prompts"], JUDGE_PROMPTS, indent=1)
    prompts = JudgePrompts.load(paths["judge_prompts"])
    instruction = mcq_instruction(config)

    if not os.path.isfile(os.path.join(paths["train"], synthetic.JSONL_NAME)):

        def scene(index):
            objects, sample = synthetic.mcq_scene(d.train_seed, index, kinds, d.object_scale)
            conversations = [(synthetic.mcq_prompt(sample, instruction), sample.answer())]
            judge_rng = np.random.default_rng([d.train_seed, index, 1])
            if judge_rng.random() < d.judge_fraction:
                conversations.append(judge_example(judge_rng, objects, sample, prompts, instruction)[1:])
            return objects, conversations

        print(f"writing {d.train_scenes} training scenes to {paths['train']}")
        synthetic.write_scenes(
            paths["train"], d.train_scenes, scene, d.train_seed, d.image_size, "png", overwrite=True, progress=True
        )

    if not (os.path.exists(paths["heldout"]) and os.path.exists(paths["blind"])):
        heldout = (d.heldout_seed, d.heldout_questions, kinds, d.object_scale, d.image_size)
        write_heldout_tsv(paths["blind"], *heldout, blank=True)
        write_heldout_tsv(paths["heldout"], *heldout)
    return paths


def write_heldout_tsv(
    path: str, seed: int, num_questions: int, kinds, object_scale: float, image_size: int, blank: bool = False
) -> None:
    """`synthetic.mcq_scene(seed, index, kinds, object_scale)` for index < num_questions as a VLMEvalKit TSV
    (base64 PNG images, the kind as `category`); `blank`: every image a blank floor (the image-blind baseline)."""
    from llava_cot_jax.data import synthetic
    from llava_cot_jax.eval import mcq

    rows = []
    blank_image = _png_base64(synthetic.render_scene([], image_size)) if blank else None
    for index in range(num_questions):
        objects, sample = synthetic.mcq_scene(seed, index, kinds, object_scale)
        image = blank_image or _png_base64(synthetic.render_scene(objects, image_size))
        rows.append(
            {
                "index": index,
                "question": sample.question,
                **sample.option_map(),
                "answer": sample.correct,
                "category": sample.kind,
                "image": image,
            }
        )
    mcq.write_tsv(path, ["index", "question", *synthetic.OPTION_LETTERS, "answer", "category", "image"], rows)


def _png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------------------------------- train


def mode_config(config, sub, mode: str, weights: str):
    """A whole config of another mode for one phase: its own keys from `sub` (the demo's `trainer` or `eval`
    group, or a mode's defaults), the demo's shared keys (seed, model, mesh; search for inference) and the weights
    to load."""
    import ml_collections

    c = ml_collections.ConfigDict(dict(sub))
    c.mode, c.seed, c.compilation_cache = mode, config.seed, ""
    c.model = ml_collections.ConfigDict(config.model.to_dict())
    c.model.weights = weights
    c.mesh = ml_collections.ConfigDict(config.mesh.to_dict())
    if mode != "train":
        c.search = config.search.copy_and_resolve_references()
    return c


def train(config, workdir: str, paths: dict[str, str]) -> str:
    """Runs the trainer (resuming, or doing nothing when finished); returns the last step's checkpoint."""
    from llava_cot_jax import loading
    from llava_cot_jax.train import trainer

    init = os.path.join(workdir, "init")
    if not os.path.isdir(init):
        model_config = loading.family(config.model).preset(config.model.preset, image_size=config.data.image_size)
        print(f"building the initial checkpoint in {init} ({_num_params(model_config):,} parameters)")
        build_demo_checkpoint(init, seed=config.seed, config=model_config, gate=config.init_gate)
    t = mode_config(config, config.trainer, "train", weights=init)
    t.data.train, t.data.image_root = paths["train"], ""
    run_dir = os.path.join(workdir, "train")
    code = trainer.run(t, run_dir)
    if code:
        raise RuntimeError(f"training stopped with exit code {code}; see {run_dir}")
    steps_dir = os.path.join(run_dir, "checkpoints")
    last = max((int(s) for s in os.listdir(steps_dir) if s.isdigit()), default=None)
    if last is None:
        raise RuntimeError(f"training wrote no checkpoint in {steps_dir}")
    return os.path.join(steps_dir, str(last))


def _num_params(model_config) -> int:
    import jax
    from flax import nnx

    from llava_cot_jax import families

    model_class = families.of(model_config).model_class
    abstract = nnx.eval_shape(lambda: model_class(model_config, rngs=nnx.Rngs(0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


# ------------------------------------------------------------------------------------------------------ eval


def evaluate(config, workdir: str, name: str, tsv: str, checkpoint: str, search: str, limit: int = 0) -> dict:
    """The evaluation harness on `tsv` (its accuracy.json), in DIR/eval/NAME; a rerun resumes."""
    from llava_cot_jax.eval import run as eval_run

    e = mode_config(config, config.eval, "eval", weights=checkpoint)
    e.tsv, e.limit, e.search.method = tsv, limit, search
    out = os.path.join(workdir, "eval", name)
    print(f"\n== {name}: {search} on {os.path.basename(tsv)}" + (f", first {limit} rows" if limit else ""))
    code = eval_run.run(e, out)
    if code:
        raise RuntimeError(f"evaluation {name} stopped with exit code {code}")
    with open(os.path.join(out, "accuracy.json")) as f:
        return json.load(f)


def judge_pairs(config, num_scenes: int) -> list:
    """Held-out judge cases: for each of the first `num_scenes` held-out scenes, the right caption, reasoning and
    conclusion against a corrupted one (`pairs.stage_pairs`, positions balanced exactly)."""
    from llava_cot_jax.data import pairs

    d = config.data
    return pairs.stage_pairs(d.heldout_seed, num_scenes, _kinds(d), d.object_scale, JUDGE_STAGES)


def judge_accuracy(config, checkpoint: str, prompts_file: str, cases: list) -> dict:
    """How often the trained model, asked greedily in the search's judge prompt (the hint the search shows: the
    caption for reasoning, caption + reasoning for the conclusion), picks the right side of each held-out pair
    (chance: 50%), overall and per stage; and its position bias: how often it answers "1" (the right side is
    response 1 in exactly half the pairs) and how often its reply has no verdict (counted wrong)."""
    from tqdm import tqdm

    from llava_cot_jax.data import pairs, synthetic
    from llava_cot_jax.generate import cli
    from llava_cot_jax.generate.judge import JudgePrompts

    d, e = config.data, config.eval
    prompts, instruction = JudgePrompts.load(prompts_file), mcq_instruction(config)
    asks = []
    for pair in cases:
        sample = pair.sample
        hint = {"REASONING": sample.caption, "CONCLUSION": f"{sample.caption}\n{sample.reasoning}"}.get(pair.stage, "")
        question = synthetic.mcq_prompt(sample, instruction)
        text = prompts.compare_text(pair.stage.lower(), question, *pair.responses, hint)
        objects, _ = synthetic.mcq_scene(d.heldout_seed, pair.index, _kinds(d), d.object_scale)
        asks.append((text, synthetic.render_scene(objects, d.image_size)))
    infer = mode_config(config, {}, "infer", weights=checkpoint)
    infer.search.method, infer.search.max_new_tokens = "greedy", infer.search.judge_max_new_tokens
    searcher = cli.build_searcher(infer)
    picks = []
    for start in tqdm(range(0, len(asks), e.batch_size), desc="judge", unit="batch"):
        batch = asks[start : start + e.batch_size]
        batch += [batch[-1]] * (e.batch_size - len(batch))  # one compiled program for every batch
        results = searcher.ask([text for text, _ in batch], [[image] for _, image in batch])
        choices = [prompts.parse_choice(r.text) for r in results[: len(asks) - start]]  # 0 or 1, or None
        picks += [None if choice is None else choice + 1 for choice in choices]  # the response's number
    accuracy = pairs.judge_accuracy(cases, picks)
    return {
        "accuracy": accuracy.pop("all"),
        "num_pairs": len(cases),
        "per_stage": accuracy,
        "picks_response_1": sum(p == 1 for p in picks) / len(picks),
        "no_verdict": sum(p is None for p in picks) / len(picks),
    }


def show_example(config, workdir: str, checkpoint: str) -> None:
    """Held-out question 0 through the search, as `mode = "infer"` answers it: every stage, then each step's
    candidates and how its match was decided (the whole trace goes to DIR/trace.json)."""
    from llava_cot_jax.data import synthetic
    from llava_cot_jax.generate import cli

    d = config.data
    objects, sample = synthetic.mcq_scene(d.heldout_seed, 0, _kinds(d), d.object_scale)
    from llava_cot_jax.generate.config import default_config

    infer = mode_config(config, default_config(), "infer", weights=checkpoint)
    infer.question = synthetic.mcq_prompt(sample, mcq_instruction(config))
    infer.image = os.path.join(workdir, "example.png")
    infer.show_stages, infer.trace = True, os.path.join(workdir, "trace.json")
    synthetic.render_scene(objects, d.image_size).save(infer.image)
    method = config.search.method
    print(f"\n== example: held-out question 0 ({infer.image}), {method} search; right answer: {sample.conclusion}")
    cli.run(infer)
    with open(infer.trace) as f:
        trace = json.load(f)["result"]["trace"]
    for step in trace:
        candidates = " | ".join(" ".join(c["shown_to_judge"].split()) for c in step["candidates"])
        rules = ", ".join(m["rule"] for m in step["matches"]) or "-"
        print(f"  {step['step']}: candidates {candidates}; decided by {rules}; kept {step['winner'] + 1}")


def _rows_accuracy(eval_dir: str, limit: int) -> dict:
    """Accuracy of an evaluation's first `limit` rows (from its predictions.tsv), to compare on the same rows."""
    import csv

    with open(os.path.join(eval_dir, "predictions.tsv"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    hits = [int(r["hit"]) for r in rows[:limit] if r["hit"] != ""]  # rows in the TSV's order, none of them bad
    return {"accuracy": sum(hits) / len(hits) if hits else None, "num_scored": len(hits), "num_correct": sum(hits)}


# ---------------------------------------------------------------------------------------------------- report


def plot_curves(
    path: str,
    curves: dict[str, list[tuple[float, float]]],
    title: str,
    ylabel: str,
    width: int = 640,
    height: int = 400,
) -> None:
    """Line charts of (step, value) points, one per named curve, as a `width` x `height` PNG (matplotlib, Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(figure)  # the Agg renderer, without pyplot's global state or a display
    axes = figure.add_subplot()
    for name, points in curves.items():
        if points:
            xs, ys = zip(*points)
            axes.plot(xs, ys, marker="o" if len(points) < 20 else None, markersize=3, label=name)
    axes.set(title=title, xlabel="step", ylabel=ylabel)
    axes.grid(True, alpha=0.3)
    if axes.lines:
        axes.legend()
    figure.tight_layout()
    with files.atomic_write(path, "wb") as f:
        figure.savefig(f, format="png", dpi=dpi)


def _loss_curves(run_dir: str) -> dict[str, list[tuple[float, float]]]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    curves = {"training": [(r["step"], r["loss"]) for r in records if "loss" in r]}
    held_out = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if held_out:
        curves["held-out"] = held_out
    return curves


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def report(workdir: str, results: dict) -> None:
    """Prints the table and the line that says whether the held-out accuracy clears the bar."""
    a, n, m = results["accuracy"], results["num_heldout"], results["num_search_questions"]
    search = "{method} search (N={num_candidates})".format(**results["search"])
    rows = [
        ("chance (1 / options)", a["chance"], a["chance"]),
        ("image-blind (greedy, blank image)", a["image_blind"], a["image_blind_subset"]),
        ("greedy", a["greedy"], a["greedy_subset"]),
        (search, None, a["search"]),
    ]
    rows += [
        (f"greedy, {kind} questions", acc["accuracy"], None) for kind, acc in results["per_category"]["greedy"].items()
    ]
    if results["judge"]:
        rows.append(("judge picks the right stage (50%)", results["judge"]["accuracy"], None))
    print(f"\nheld-out questions: {n} ({', '.join(results['kinds'])}), 4 options each; {search} on the first {m}")
    if results["judge"]:
        print(f"judge: {results['judge']['num_pairs']} held-out pairs of a right and a corrupted stage (chance 50%)")
    print(f"  {'method':<36}{'all ' + str(n):>10}{'first ' + str(m):>10}")
    for name, whole, first in rows:
        print(f"  {name:<36}{_percent(whole):>10}{_percent(first):>10}")
    gain = a["search"] - a["greedy_subset"]
    print(
        f"{search} against greedy on the same {m} questions: {100 * gain:+.1f} points: it "
        f"{'helped' if gain > 0 else 'did not help'} in this budget (docs/study.md measures each search and scorer)"
    )
    bar = results["bar"]
    print(
        f"held-out accuracy (greedy) {_percent(a['greedy'])}: {'above' if bar['met'] else 'BELOW'} the bar "
        f"(>= 2 x chance = {_percent(bar['two_times_chance'])} and > image-blind {_percent(a['image_blind'])})"
    )
    print(f"results: {os.path.join(workdir, RESULTS_FILE)}; loss curve: {os.path.join(workdir, LOSS_CURVE)}")


# ------------------------------------------------------------------------------------------------------- run


def _claim(workdir: str, config, write: bool = True, settings_file: str = SETTINGS_FILE) -> None:
    """Refuses a DIR that holds a run with other settings (its data and weights would not match them); with
    `write`, records this run's settings there (`settings_file`). The run checks before it starts and records once
    its first result (the data) is written, so a run that fails before that leaves no claim."""
    settings = config.to_dict()
    settings.pop("compilation_cache", None)
    settings = json.loads(json.dumps(settings, default=str))
    path = os.path.join(workdir, settings_file)
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        if before != settings:
            changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
            held = [
                p for p in (path, *(os.path.join(workdir, d) for d in ("data", "train", "eval"))) if os.path.exists(p)
            ]
            raise ValueError(
                f"{workdir} holds a run with other settings (changed: {', '.join(changed)}); use another "
                f"--workdir, or delete {' and '.join(held)} to start over"
            )
        if not write:
            print(f"{workdir}: reusing what an earlier run with these settings made")
        return
    if write:
        files.write_json_atomic(path, settings, indent=1)


def run(config, workdir: str = "") -> int:
    from llava_cot_jax.data import synthetic

    if config.search_questions < 1 or config.data.heldout_questions < 1:
        raise ValueError("data.heldout_questions and search_questions must be >= 1")
    unknown = [k for k in _kinds(config.data) if k not in synthetic.MCQ_KINDS]
    if unknown or not _kinds(config.data):
        raise ValueError(f"data.kinds={config.data.kinds!r}: choose from {', '.join(synthetic.MCQ_KINDS)}")
    workdir = os.path.abspath(workdir or os.path.join(tempfile.gettempdir(), "llava_cot_jax_demo"))
    os.makedirs(workdir, exist_ok=True)
    _claim(workdir, config, write=False)
    times = {}

    start = time.perf_counter()
    paths = write_data(config, os.path.join(workdir, "data"))
    _claim(workdir, config)
    config.search.prompts_file = paths["judge_prompts"]
    times["data_s"] = time.perf_counter() - start

    start = time.perf_counter()
    checkpoint = train(config, workdir, paths)
    times["train_s"] = time.perf_counter() - start

    start = time.perf_counter()
    search_rows = min(config.search_questions, config.data.heldout_questions)
    greedy = evaluate(config, workdir, "greedy", paths["heldout"], checkpoint, "greedy")
    blind = evaluate(config, workdir, "blind", paths["blind"], checkpoint, "greedy")
    method = config.search.method
    searched = evaluate(config, workdir, method, paths["heldout"], checkpoint, method, search_rows)
    judge = None
    if config.data.judge_fraction > 0 and config.judge_questions > 0:
        judge_file = os.path.join(workdir, "eval", "judge.json")
        if not os.path.exists(judge_file):
            scenes = math.ceil(config.judge_questions / len(JUDGE_STAGES))
            cases = judge_pairs(config, scenes)[: config.judge_questions]
            print(f"\n== judge: {len(cases)} held-out pairs, the right stage against a corrupted one")
            accuracy = judge_accuracy(config, checkpoint, paths["judge_prompts"], cases)
            files.write_json_atomic(judge_file, accuracy, indent=1)
        with open(judge_file) as f:
            judge = json.load(f)
    if not os.path.exists(os.path.join(workdir, "trace.json")):
        show_example(config, workdir, checkpoint)
    times["eval_s"] = time.perf_counter() - start

    chance = 1 / len(synthetic.OPTION_LETTERS)
    curves = _loss_curves(os.path.join(workdir, "train"))
    losses = curves["training"]
    plot_curves(
        os.path.join(workdir, LOSS_CURVE),
        curves,
        "loss during training",
        "loss (mean per supervised token)",
    )
    accuracy = {
        "chance": chance,
        "image_blind": blind["accuracy"],
        "greedy": greedy["accuracy"],
        "search": searched["accuracy"],
        "image_blind_subset": _rows_accuracy(os.path.join(workdir, "eval", "blind"), search_rows)["accuracy"],
        "greedy_subset": _rows_accuracy(os.path.join(workdir, "eval", "greedy"), search_rows)["accuracy"],
    }
    met = greedy["accuracy"] is not None and greedy["accuracy"] >= 2 * chance and greedy["accuracy"] > blind["accuracy"]
    results = {
        "accuracy": accuracy,
        "bar": {"two_times_chance": 2 * chance, "met": bool(met)},
        "per_category": {
            name: r.get("per_category", {}) for name, r in (("greedy", greedy), ("blind", blind), ("search", searched))
        },
        "judge": judge,
        "unanswered": {
            "greedy": greedy["num_unanswered"],
            "blind": blind["num_unanswered"],
            "search": searched["num_unanswered"],
        },
        "num_heldout": config.data.heldout_questions,
        "num_search_questions": search_rows,
        "kinds": list(_kinds(config.data)),
        "search": {"method": config.search.method, "num_candidates": config.search.num_candidates},
        "checkpoint": checkpoint,
        "training": {
            "steps": int(os.path.basename(checkpoint)),
            "first_loss": losses[0][1] if losses else None,
            "last_loss": losses[-1][1] if losses else None,
        },
        "seconds": times,
        "files": {"loss_curve": os.path.join(workdir, LOSS_CURVE), **paths, "eval": os.path.join(workdir, "eval")},
    }
    files.write_json_atomic(os.path.join(workdir, RESULTS_FILE), results, indent=1)
    report(workdir, results)
    return 0
