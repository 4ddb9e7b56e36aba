"""`mode = "eval"`: a checkpoint on a VLMEvalKit multiple-choice or yes/no TSV; see configs/eval_mcq.py.

Writes to the workdir:
- `progress.jsonl`: one line per answered row (its index, the raw output and the conclusion), appended and
  synced after every batch. It is the run's memory: a rerun with the same workdir skips the rows it holds.
- `predictions.tsv`: the input's columns (less the base64 image), `prediction` (the conclusion: the column
  VLMEvalKit's evaluators read), `raw_output`, `extracted` and `hit`; rebuilt from progress.jsonl at the end.
- `accuracy.json`: overall and per-category accuracy, unanswered and bad rows (each with its reason).
- `eval_run.json`: what was evaluated (TSV checksum, checkpoint, prompt style, search settings); a rerun with
  other settings in the same workdir is refused, so one predictions file never mixes two runs.
Answers are extracted again on every rerun, so a change of the extraction rules needs no new inference.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys

from llava_cot_jax import files
from llava_cot_jax.eval import mcq

PROGRESS = "progress.jsonl"
RUN_FILE = "eval_run.json"
PREDICTIONS = "predictions.tsv"
ACCURACY = "accuracy.json"


class Progress:
    """Answered rows, kept as JSON lines: a line cut short by an interruption is dropped and overwritten."""

    def __init__(self, path: str):
        self.path = path
        self.done: dict[str, dict] = {}
        if not os.path.exists(path):
            return
        with open(path, "rb") as f:
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # the part up to the last full line
        for line in complete.decode("utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                self.done[record["index"]] = record
        if len(complete) < len(data):
            with open(path, "r+b") as f:
                f.truncate(len(complete))

    def add(self, records: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
            f.flush()
            os.fsync(f.fileno())
        self.done.update((r["index"], r) for r in records)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _claim_workdir(workdir: str, identity: dict, write: bool = True) -> None:
    """Refuses a workdir that holds an evaluation with other settings; with `write`, records what this workdir
    evaluates. A run checks before it starts and records when its first result is written, so one that fails
    before its first answer (a wrong checkpoint path) leaves no claim."""
    path = os.path.join(workdir, RUN_FILE)
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        changed = sorted(k for k in set(before) | set(identity) if before.get(k) != identity.get(k))
        if changed:
            names = (RUN_FILE, PROGRESS, PREDICTIONS, ACCURACY)
            held = [os.path.join(workdir, n) for n in names if os.path.exists(os.path.join(workdir, n))]
            raise ValueError(
                f"{workdir} holds an evaluation with other settings (changed: {', '.join(changed)}); "
                f"use another --workdir, or delete {', '.join(held)} to start over"
            )
        return
    if write:
        files.write_json_atomic(path, identity, indent=1)


def _prompt_fits(items: list, config, bad: list, tokenizer=None, context: int = 0) -> list:
    """The items whose prompts are within the prompt limits (generate/config.py); the others go to `bad`, decided
    before any of them is batched, so an oversized row never costs the rest of its batch."""
    from llava_cot_jax.generate import config as generate_config

    kept = []
    for item in items:
        reason = generate_config.prompt_limit_reason(item.prompt, config, tokenizer, context)
        if reason:
            bad.append(mcq.Bad(item.row, item.index, reason))
        else:
            kept.append(item)
    return kept


def _decoded(items: list, images_by_index: dict, bad: list, bar):
    """(item, its images) for the items whose images decode; the others go to `bad` (and tick `bar`)."""
    for item in items:
        try:
            yield item, mcq.decode_images(item, images_by_index)
        except mcq.BadRow as err:
            bad.append(mcq.Bad(item.row, item.index, str(err)))
            bar.update(1)


def _batches(pairs, size: int):
    batch = []
    for pair in pairs:
        batch.append(pair)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _answer(
    pending: list, images_by_index: dict, batch_size: int, config, progress: Progress, bad: list, claim
) -> None:
    """Runs the search on the pending rows in batches, appending each batch's answers to `progress` (`claim()`
    first); rows whose prompts are over the limits or whose images do not decode go to `bad`. The model is loaded
    on the first batch, so a rerun with only bad rows left loads nothing."""
    from tqdm import tqdm

    from llava_cot_jax import loading
    from llava_cot_jax.generate import cli

    tokenizer = loading.load_processor(config.model, loading.stored_config(config.model)).tokenizer
    pending = _prompt_fits(pending, config, bad, tokenizer, cli.model_context(config))
    searcher, hits = None, []
    with tqdm(total=len(pending), unit="row", desc="eval") as bar:
        for batch in _batches(_decoded(pending, images_by_index, bad, bar), batch_size):
            # Every call gets batch_size rows (the last one padded with copies), so one program serves all.
            pad = [batch[-1]] * (batch_size - len(batch))
            searcher = searcher or cli.build_searcher(config)
            results = searcher.ask([item.prompt for item, _ in batch + pad], [images for _, images in batch + pad])
            done = [(item, r) for (item, _), r in zip(batch, results)]
            claim()
            progress.add([{"index": item.index, "raw_output": r.text, "prediction": r.conclusion} for item, r in done])
            hits += [mcq.extract(item, r.conclusion) == item.answer for item, r in done if item.answer]
            bar.update(len(batch))
            if hits:
                bar.set_postfix(accuracy=f"{sum(hits) / len(hits):.3f}")


def run(config, workdir: str = "") -> int:
    from llava_cot_jax import families, loading
    from llava_cot_jax.generate import config as generate_config

    if not workdir:
        raise ValueError("eval needs --workdir=DIR (predictions, accuracy and progress go there; a rerun resumes)")
    if config.batch_size < 1:
        raise ValueError(f"--config.batch_size must be >= 1, got {config.batch_size}")
    weights = config.model.weights
    loading.weights_format(weights)  # a missing checkpoint fails now, not after reading the TSV
    table = mcq.read_tsv(config.tsv)
    style = mcq.resolve_style(config.prompt, table)
    # The family the weights belong to may ask multiple-choice questions its own way (LLaVA-1.5's answer line).
    instruction = families.of(loading.stored_config(config.model)).processor_class.mcq_instruction
    items, bad = mcq.parse_rows(table, style, instruction)
    if config.limit:
        items = [item for item in items if item.row <= config.limit]
        bad = [b for b in bad if b.row <= config.limit]
    num_rows = min(len(table.rows), config.limit or len(table.rows))
    strip = bool(config.get("strip_prompt", False))
    if strip:
        items = [dataclasses.replace(item, prompt=item.prompt.strip()) for item in items]

    os.makedirs(workdir, exist_ok=True)
    search = generate_config.search_config(config.search, config.seed)
    identity = {
        "tsv_sha256": _sha256(config.tsv),
        "checkpoint": os.path.abspath(weights),
        "dtype": config.model.dtype,
        "prompt": style,
        "search": dataclasses.asdict(search),
        "stop_at_eos": bool(config.search.stop_at_eos),
        **({"strip_prompt": True} if strip else {}),  # absent when off: earlier workdirs still resume
        **({"mcq_instruction": instruction} if instruction is not None else {}),  # likewise
    }
    _claim_workdir(workdir, identity, write=False)
    items = _prompt_fits(items, config, bad)  # characters: before anything is tokenized

    def claim():
        _claim_workdir(workdir, identity)

    progress = Progress(os.path.join(workdir, PROGRESS))
    pending = [item for item in items if item.index not in progress.done]
    print(
        f"{config.tsv}: {num_rows} rows, prompt {style!r}{' (stripped)' if strip else ''}, {search.method} search; "
        f"{len(items) - len(pending)} answered before, {len(pending)} to run, {len(bad)} bad so far"
    )

    if pending:
        _answer(pending, mcq.image_cells(table), config.batch_size, config, progress, bad, claim)

    bad.sort(key=lambda b: b.row)
    rows = mcq.score(items, progress.done)
    result = mcq.report(rows, bad, num_rows)
    result = {
        "tsv": os.path.abspath(config.tsv),
        "checkpoint": os.path.abspath(weights),
        "prompt": style,
        "strip_prompt": strip,
        "method": search.method,
        **result,
    }
    claim()
    mcq.write_predictions(os.path.join(workdir, PREDICTIONS), table.columns, rows)
    files.write_json_atomic(os.path.join(workdir, ACCURACY), result, indent=1)
    _print_summary(result, workdir)
    return 0


def _print_summary(result: dict, workdir: str) -> None:
    def line(name, acc):
        value = "-" if acc["accuracy"] is None else f"{100 * acc['accuracy']:.1f}%"
        return f"  {name:<40} {value:>7}  ({acc['num_correct']}/{acc['num_scored']})"

    print(line("overall", result))
    for name, acc in result.get("per_category", {}).items():
        print(line(name, acc))
    if "circular" in result:
        c = result["circular"]
        print(line("circular (all rotations right)", {**c, "num_scored": c["num_questions"]}))
    print(
        f"{result['num_evaluated']} rows answered, {result['num_unanswered']} with no answer found, "
        f"{result['num_bad_rows']} bad rows; {workdir}/predictions.tsv, {workdir}/accuracy.json"
    )
    for b in result["bad_rows"][:20]:
        print(f"bad row {b['row']} (index {b['index'] or '-'}): {b['reason']}", file=sys.stderr)
    if result["num_bad_rows"] > 20:
        print(f"... {result['num_bad_rows'] - 20} more bad rows in {workdir}/accuracy.json", file=sys.stderr)
