"""Assembles the original LLaVA repository's checkpoints into one llava_cot_jax checkpoint (llava family).

  python tools/convert_llava_original.py --lm DIR [--clip DIR] [--projector FILE|random] \
      --processor DIR --out DIR [--dtype bfloat16] [--overwrite]

--lm         the language model: a released LLaVA-1.5 (liuhaotian/llava-v1.5-7b, with its projector) or, to start
             stage 1, Vicuna v1.5 (lmsys/vicuna-7b-v1.5); safetensors or torch .bin shards
--clip       the vision tower's CLIP checkpoint (openai/clip-vit-large-patch14-336)
--projector  a stage-1 mm_projector.bin replacing the language model's projector, or "random" for a fresh one
--processor  tokenizer and preprocessor_config.json to keep beside the weights (llava-hf's, e.g.
             llava-hf/llava-1.5-7b-hf: its tokenizer has <image> at 32000 and <pad> at 32001)

The result trains (configs/llava15_*.py, `model.weights`) and decodes like a converted llava-hf checkpoint; see
llava_cot_jax/models/llava/original.py for what is read and how the vocabulary is kept.
"""

from absl import flags

from llava_cot_jax import checkpoint, cli_errors
from llava_cot_jax.models.llava import original

_LM = flags.DEFINE_string("lm", None, "Language model checkpoint directory (LLaVA-1.5 or Vicuna).", required=True)
_CLIP = flags.DEFINE_string("clip", None, "CLIP checkpoint directory for the vision tower.")
_PROJECTOR = flags.DEFINE_string("projector", None, "mm_projector.bin, or 'random' for a fresh projector.")
_PROCESSOR = flags.DEFINE_string("processor", None, "Directory with the tokenizer and preprocessor_config.json.")
_OUT = flags.DEFINE_string("out", None, "Output checkpoint directory.", required=True)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Parameter dtype to store.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")


def main(argv):
    del argv
    config, params = original.read_original(_LM.value, _CLIP.value, _PROJECTOR.value, dtype=_DTYPE.value)
    out = checkpoint.save_checkpoint(
        _OUT.value, config, params, side_files_from=_PROCESSOR.value, overwrite=_OVERWRITE.value
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    cli_errors.run_absl(main)
