"""Converts an HF checkpoint directory (Llama-3.2-Vision, or LLaVA-1.5 in the llava-hf layout: the family is read
from its config.json) into a llava_cot_jax Orbax checkpoint.

  python tools/convert_hf_to_orbax.py --hf_dir DIR --out DIR [--dtype bfloat16] [--overwrite]

Reads the safetensors shards with numpy, one tensor at a time (no torch), and copies the tokenizer and
processor files so the result loads by path (`llava_cot_jax.checkpoint.load_model(DIR)`).
"""

from absl import flags

from llava_cot_jax import cli_errors
from llava_cot_jax.checkpoint import convert_hf_to_orbax

_HF_DIR = flags.DEFINE_string("hf_dir", None, "HF checkpoint directory (config.json + *.safetensors).", required=True)
_OUT = flags.DEFINE_string("out", None, "Output checkpoint directory.", required=True)
_DTYPE = flags.DEFINE_enum(
    "dtype",
    None,
    ["float32", "bfloat16", "float16"],
    "Parameter dtype to store (default: as stored in the HF checkpoint).",
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")


def main(argv):
    del argv
    out = convert_hf_to_orbax(_HF_DIR.value, _OUT.value, dtype=_DTYPE.value, overwrite=_OVERWRITE.value)
    print(f"wrote {out}")


if __name__ == "__main__":
    cli_errors.run_absl(main)
