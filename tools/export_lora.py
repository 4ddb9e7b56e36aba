"""Exports the adapters of a LoRA training run in peft's format, or folds them into the base weights.

  python tools/export_lora.py --adapter RUN/checkpoints/STEP --out DIR [--naming transformers|hub]
  python tools/export_lora.py --adapter RUN/checkpoints/STEP --merge_into BASE --out DIR [--overwrite]

The first writes adapter_config.json + adapter_model.safetensors that `peft.PeftModel.from_pretrained` loads onto
transformers' MllamaForConditionalGeneration (module names of transformers >= 4.52, or the Hub's with
--naming=hub). The second writes a converted checkpoint of BASE (a converted or HF directory) with the adapters
merged into its weights: inference loads it like any checkpoint, tools/export_to_hf.py exports it.
"""

from absl import flags

from llava_cot_jax import cli_errors, loading

_ADAPTER = flags.DEFINE_string("adapter", None, "A LoRA training checkpoint DIR/checkpoints/STEP.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_NAMING = flags.DEFINE_enum("naming", "transformers", ["transformers", "hub"], "Module names of the peft keys.")
_MERGE_INTO = flags.DEFINE_string("merge_into", None, "Base weights to merge the adapters into (instead of peft).")
_BASE_NAME = flags.DEFINE_string("base_model", "", "base_model_name_or_path recorded in adapter_config.json.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --out if it exists (merge).")


def main(argv):
    del argv
    if _MERGE_INTO.value:
        out = loading.merge_adapter(_MERGE_INTO.value, _ADAPTER.value, _OUT.value, overwrite=_OVERWRITE.value)
    else:
        out = loading.export_adapter(_ADAPTER.value, _OUT.value, naming=_NAMING.value, base_model=_BASE_NAME.value)
    print(f"wrote {out}")


if __name__ == "__main__":
    cli_errors.run_absl(main)
