"""LLaVA-CoT JSONL + image root → TFDS ArrayRecord dataset that the training pipeline reads.

    python tools/prepare_data.py --jsonl DATA/train.jsonl --image_root DATA/images --out_dir DATA/tfds \
        [--num_shards 16] [--on_error skip|fail] [--record_filter llava_cot|strict|llava] \
        [--tokenizer TOKENIZER_DIR --max_tokens 2048] [--overwrite]

Prints a summary of every skipped sample and why, and of every irregular sample kept (also saved as
validation_report.txt next to the shards). `--record_filter llava_cot` (default) keeps the records LLaVA-CoT trained
on; `strict` keeps only single-turn records with four well-formed stages; `llava` reads LLaVA-1.5's data (text-only
and multi-turn conversations kept; llava_cot_jax/data/sources.py).
The dataset appears at OUT_DIR/llava_cot/1.0.0 only once complete; an interrupted run can simply be rerun.
"""

from __future__ import annotations

import argparse
import sys

from llava_cot_jax import cli_errors
from llava_cot_jax.data import sources, tfds_builder


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jsonl", required=True, help="LLaVA-CoT JSONL file (one sample per line) or LLaVA JSON array")
    parser.add_argument("--image_root", required=True, help="directory the samples' 'image' paths are relative to")
    parser.add_argument("--out_dir", required=True, help="TFDS data directory to write into")
    parser.add_argument("--split", default="train")
    parser.add_argument("--num_shards", type=int, default=None, help="ArrayRecord shard count (default: by size)")
    parser.add_argument("--on_error", choices=("skip", "fail"), default="skip", help="what to do with bad samples")
    parser.add_argument(
        "--record_filter", choices=sources.RECORD_FILTERS, default="llava_cot", help="which records train (see above)"
    )
    parser.add_argument("--tokenizer", default=None, help="HF tokenizer directory, for the --max_tokens budget")
    parser.add_argument("--max_tokens", type=int, default=None, help="skip/fail samples longer than this")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    parser.add_argument("--num_threads", type=int, default=4, help="threads decoding images during validation")
    parser.add_argument("--verbose", action="store_true", help="show the traceback of an error, not one line")
    parser.error = lambda text: cli_errors.exit_with(f"{text}; see --help", code=2, program=argv is None)
    args = parser.parse_args(argv)
    if (args.tokenizer is None) != (args.max_tokens is None):
        parser.error("--tokenizer and --max_tokens go together")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    with cli_errors.one_line_errors(args.verbose, program=argv is None):
        return prepare(args)


def prepare(args: argparse.Namespace) -> int:
    token_counter = None
    if args.tokenizer is not None:
        from transformers import AutoTokenizer  # only needed for the token budget

        token_counter = sources.make_token_counter(AutoTokenizer.from_pretrained(args.tokenizer))
    try:
        prepared = tfds_builder.prepare_tfds(
            args.jsonl,
            args.image_root,
            args.out_dir,
            split=args.split,
            num_shards=args.num_shards,
            on_error=args.on_error,
            record_filter=args.record_filter,
            token_counter=token_counter,
            max_tokens=args.max_tokens,
            overwrite=args.overwrite,
            num_threads=args.num_threads,
        )
    except sources.DataValidationError as err:
        print(err, file=sys.stderr)  # the report: every sample left out and why
        raise ValueError(
            f"samples of {args.jsonl} failed validation (listed above): fix them, or pass --on_error=skip"
        ) from err
    print(prepared.report.summary())
    print(f"wrote {prepared.num_examples} examples to {prepared.builder_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
