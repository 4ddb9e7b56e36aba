"""Exports a llava_cot_jax checkpoint as an HF Mllama directory that transformers' from_pretrained loads.

  python tools/export_to_hf.py --ckpt DIR --out DIR [--max_shard_gb 5] [--overwrite]

Writes sharded safetensors with the Hub key names, model.safetensors.index.json, config.json and the
tokenizer/processor files the checkpoint carries.
"""

from absl import flags

from llava_cot_jax import cli_errors
from llava_cot_jax.checkpoint import export_to_hf

_CKPT = flags.DEFINE_string(
    "ckpt", None, "Converted weights directory, or a training checkpoint DIR/checkpoints/STEP.", required=True
)
_OUT = flags.DEFINE_string("out", None, "Output HF directory.", required=True)
_MAX_SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "Largest safetensors shard, in GiB.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")


def main(argv):
    del argv
    out = export_to_hf(
        _CKPT.value, _OUT.value, max_shard_bytes=int(_MAX_SHARD_GB.value * 2**30), overwrite=_OVERWRITE.value
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    cli_errors.run_absl(main)
