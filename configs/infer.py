"""Inference / search on one question: `python -m llava_cot_jax.main --config configs/infer.py \
  --config.checkpoint=DIR --config.image=PATH --config.question="..." [--config.search=stage --config.num_candidates=4]`.

`get_config("runlocal")` shrinks every budget for a quick CPU smoke run.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "infer"
    c.checkpoint = ""  # an HF-format directory: config.json, *.safetensors, tokenizer and preprocessor files
    c.dtype = "float32"  # parameter/compute dtype: float32 | bfloat16
    c.image = ""  # image path; several as "a.png,b.png"; empty for a text-only question
    c.question = ""
    c.search = "stage"  # stage | best_of_n | sentence | greedy | sample
    c.num_candidates = 4
    c.temperature = 0.6
    c.top_p = 0.9
    c.top_k = 50
    c.stage_max_new_tokens = 512
    c.max_new_tokens = 2048
    c.sentence_max_new_tokens = 96
    c.judge_max_new_tokens = 128
    c.judge_do_sample = True
    c.seed = 0
    c.stop_at_eos = True  # False: only the stage tags end a stage (the demo's random weights emit EOS anywhere)
    c.prompts_file = ""  # JSON file overriding the judge prompts (llava_cot_jax/generate/judge.py)
    c.show_stages = False  # print every stage, not only the conclusion
    c.stream = True  # print text as it is produced when stdout is a terminal
    c.trace = ""  # write a JSON trace of every candidate and judge verdict here
    c.compilation_cache = "~/.cache/llava_cot_jax/xla"  # compiled programs kept across runs; "" = off
    # Device mesh (data x fsdp x tensor; one may be -1 = the devices left over). All 1: one device. A TPU VM slice
    # or a multi-GPU host: --config.mesh_tensor=-1 (weights split over every chip; see README).
    c.mesh_data = 1
    c.mesh_fsdp = 1
    c.mesh_tensor = 1
    c.scan_layers = False  # decode with the text layers scanned (compile time independent of depth) or unrolled
    c.quantize = ""  # "int8": int8 text-decoder weights (11B in ~11 GiB: one 16 GB chip, e.g. Colab's v5e-1)
    c.model = ""  # tools/aot_compile.py without a checkpoint: an architecture preset (llama_11b, llama_90b, ...)
    c.batch_size = 1  # tools/aot_compile.py: questions searched together (the CLI answers one)
    if arg == "runlocal":
        c.stage_max_new_tokens = 32
        c.max_new_tokens = 128
        c.sentence_max_new_tokens = 16
        c.judge_max_new_tokens = 16
        c.num_candidates = 2
    return c
