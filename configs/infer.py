"""Inference / search on one question: `python -m llava_cot_jax.main --config configs/infer.py \
  --config.checkpoint=DIR --config.image=PATH --config.question="..." [--config.search=stage --config.num_candidates=4]`.

Search defaults and where they come from are in `llava_cot_jax/generate/stage_search.py` (`SearchConfig`) and
the README; LLaVA-CoT's inference code is `inference/demo/simple_inference.py` and
`inference/VLMEvalKit/inference_demo.py` in PKU-YuanGroup/LLaVA-CoT. `--config.procedure=llava_cot` switches the
tournament to theirs. `get_config("runlocal")` shrinks every budget for a quick CPU smoke run.
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "infer"
    c.checkpoint = ""  # an HF-format directory: config.json, *.safetensors, tokenizer and preprocessor files
    c.dtype = "bfloat16"  # parameter/compute dtype: bfloat16 (theirs: torch_dtype=torch.bfloat16) | float32
    c.image = ""  # image path; several as "a.png,b.png"; empty for a text-only question
    c.question = ""
    c.search = "stage"  # stage | best_of_n | sentence | greedy | sample
    c.num_candidates = config_dict.placeholder(int)  # N; unset: stage 2, best_of_n 10, sentence 5 (SearchConfig)
    c.procedure = "ours"  # ours | llava_cot: bracket, screen, fallback and sentence end (SearchConfig)
    c.bracket = config_dict.placeholder(str)  # rounds | pool; unset: the procedure's
    c.screen = config_dict.placeholder(str)  # once | per_match; unset: the procedure's
    c.fallback = config_dict.placeholder(str)  # symmetric | second; unset: the procedure's
    c.sentence_end = config_dict.placeholder(str)  # period | text_end; unset: the procedure's
    c.temperature = 0.6  # theirs
    c.top_p = 0.9  # theirs
    c.top_k = 50  # transformers' default, which theirs keep
    c.stage_max_new_tokens = 512  # ours (theirs: 2048 per candidate call)
    c.max_new_tokens = 2048  # theirs
    c.sentence_max_new_tokens = 96  # ours (theirs: 2048 per candidate call)
    c.judge_max_new_tokens = 2048  # theirs; a comparison reply stops at its verdict phrase
    c.judge_do_sample = True  # theirs
    c.bos = "transformers"  # transformers | once | none: "transformers" gives two BOS, as theirs
    c.seed = 0
    c.stop_at_eos = True  # False: only the stage tags end a stage (the demo's random weights emit EOS anywhere)
    c.prompts_file = ""  # JSON overriding the judge prompts; example: configs/judge_prompts_example.json
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
        c.dtype = "float32"  # XLA:CPU handles float32 well; bfloat16 programs ask for fp32 copies of the weights
        c.stage_max_new_tokens = 32
        c.max_new_tokens = 128
        c.sentence_max_new_tokens = 16
        c.judge_max_new_tokens = 16
        c.num_candidates = 2
    return c
