"""First question vs warm: how long a stage search takes when its programs still have to be compiled.

    python benchmarks/bench_first_question.py --scenario cold|warmup|cache [--cache_dir DIR]

The bench model of docs/design.md (random weights, the same setup as bench_generate.py), stage search N=4, 32 tokens
per stage candidate, 16 per judge reply, one 448x448 image (4 tiles), EOS off. One scenario per process (a
fresh process is a cold start):

* cold: the first question in a new process with no compilation cache, then three more (the first of them a
  question of another length);
* warmup: `Searcher.warmup()` first (timed separately), then the same questions;
* cache: with the persistent compilation cache in --cache_dir (run it twice: the first run fills the cache,
  the second is a new process that finds every program there).

Prints one JSON line: seconds and CPU seconds per question, compiled programs after each (the sampler's jitted
entry points), and the per-phase timings of the last question. Runs against whichever llava_cot_jax is on
PYTHONPATH, so an older tree can be measured side by side (it then skips what it lacks, e.g. warmup).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_generate as B


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", choices=("cold", "warmup", "cache"), required=True)
    parser.add_argument("--cache_dir", default="")
    args = parser.parse_args()

    import jax

    if args.scenario == "cache":
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)  # as main.py sets it

    from llava_cot_jax.generate import sampler
    from llava_cot_jax.generate.stage_search import SearchConfig, Searcher

    report = {"scenario": args.scenario, "jax": jax.__version__, "tree": os.path.dirname(sampler.__file__)}
    with tempfile.TemporaryDirectory() as workdir:
        _, hf, model, processor = B.setup(workdir)
        del hf
        config = SearchConfig(
            num_candidates=B.N_CANDIDATES, stage_max_new_tokens=B.STAGE_TOKENS, judge_max_new_tokens=B.JUDGE_TOKENS
        )
        searcher = Searcher(model, processor, config)
        searcher.sampler.eos_token_ids = ()  # random weights: no EOS, every budget runs in full
        image = B.bench_image()
        questions = [B.QUESTION, "How many objects are in the picture?", B.QUESTION, "Which object is the largest?"]
        report["question_tokens"] = [
            len(processor.tokenizer(q, add_special_tokens=False)["input_ids"]) for q in questions
        ]
        if args.scenario == "warmup":
            if not hasattr(searcher, "warmup"):
                raise SystemExit("this tree has no Searcher.warmup")
            start, cpu = time.perf_counter(), time.process_time()
            searcher.warmup(question_tokens=max(report["question_tokens"]))
            report["warmup"] = {
                "s": time.perf_counter() - start,
                "cpu_s": time.process_time() - cpu,
                "programs": sampler.compile_count(),
            }
        runs = []
        for question in questions:
            start, cpu = time.perf_counter(), time.process_time()
            searcher.ask([question], [[image]])
            runs.append(
                {
                    "s": round(time.perf_counter() - start, 2),
                    "cpu_s": round(time.process_time() - cpu, 2),
                    "programs": sampler.compile_count(),
                }
            )
        report["questions"] = runs
        report["timings_last"] = {k: round(v, 2) for k, v in searcher.timings.items()}
        with open("/proc/loadavg") as f:
            report["loadavg_after"] = f.read().split()[:3]
    print("RESULT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
