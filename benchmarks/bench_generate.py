"""Generation benchmark: JAX sampler and stage-level search vs transformers/PyTorch, side by side, on CPU.

    /work/venv/bin/python benchmarks/bench_generate.py [--quick]

Model: the shared ~163M-parameter "bench" config of docs/design.md with random weights, saved once as an HF
checkpoint and loaded by both sides (same weights). One 448x448 image → 4 tiles of 224; prompt 64 tokens;
torch with 2 threads. Measures:

* memory bandwidth of this machine (numpy single-thread sum, jitted JAX sum over all cores);
* greedy decode tokens/s at batch 1 and 8 (time of 65 new tokens minus time of 1, both after warm-up);
  bytes the decoder must read per token and the fraction of the bandwidth roofline reached at batch 1;
* stage-level beam search, N=4, 32 tokens per stage candidate, 16 per judge reply, per question:
  ours (`Searcher`) vs `ReferenceStageSearch` below, a faithful PyTorch rendering of the paper's loop
  (one `generate` per candidate and per judge call, the full prefix and image re-run by every call,
  pairs popped at random, the reasoning screen run per pair); and, as throughput, ours on a batch of 4 questions.
Random weights never emit a closing tag or EOS, so both sides run every budget in full (EOS is disabled on
both sides to keep the work identical).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

# The transformers <-> our-config mapping (incl. the 4.45 vs 5.x vision-tap shift), shared with the parity tests.
from llava_cot_jax.models.mllama.hf_reference import hf_config, save_hf_checkpoint

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

N_CANDIDATES, STAGE_TOKENS, JUDGE_TOKENS = 4, 32, 16
TORCH_DEVICE = "cpu"  # --torch_device
QUESTION = (
    "Look at the picture carefully. How many red cubes and how many small blue spheres are there, and which "
    "of the two groups is larger? Explain briefly before you answer."
)


# --- setup ---------------------------------------------------------------------------------------------------


def padded_tokenizer(text_vocab: int):
    """The tiny byte-level BPE, padded with filler tokens so that the Llama-3 specials and <|image|> sit right
    after `text_vocab - 256` base tokens (<|image|> = text_vocab, as the bench config expects)."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    from llava_cot_jax.data import chat
    from llava_cot_jax.data.tokenizer import build_tiny_tokenizer, llama3_special_tokens

    tiny = build_tiny_tokenizer()
    data = json.loads(tiny.backend_tokenizer.to_str())
    data["added_tokens"] = []
    base = Tokenizer.from_str(json.dumps(data))
    fillers = text_vocab - 256 - base.get_vocab_size()
    base.add_tokens([AddedToken(f"<filler_{i}>", special=False, normalized=False) for i in range(fillers)])
    specials = llama3_special_tokens() + [chat.IMAGE]
    base.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    assert base.token_to_id(chat.IMAGE) == text_vocab, base.token_to_id(chat.IMAGE)
    return PreTrainedTokenizerFast(
        tokenizer_object=base,
        bos_token=chat.BOS,
        eos_token=chat.EOT,
        pad_token=chat.PAD,
        clean_up_tokenization_spaces=False,
    )


def setup(workdir: str):
    import torch
    import transformers

    from llava_cot_jax.data.image import MllamaImageProcessor
    from llava_cot_jax.data.processor import MllamaProcessor
    from llava_cot_jax.models.mllama.config import MllamaConfig
    from llava_cot_jax.models.mllama.params import from_hf

    tokenizer = padded_tokenizer(32000)
    t = dict(
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id, eos_token_id=(tokenizer.eos_token_id,)
    )
    config = MllamaConfig.bench()
    config = config.replace(text=__import__("dataclasses").replace(config.text, **t))
    torch.manual_seed(0)
    hf = transformers.MllamaForConditionalGeneration(hf_config(config)).eval()
    with torch.no_grad():  # non-zero gates so the cross-attention layers do real work
        for name, p in hf.named_parameters():
            if "gate" in name:
                p.fill_(0.5)
    hf.generation_config.eos_token_id = None  # random weights: run every budget in full on both sides
    hf.generation_config.pad_token_id = tokenizer.pad_token_id
    path = save_hf_checkpoint(hf, config, os.path.join(workdir, "bench_ckpt"))  # with the 4.45 tap indices
    ours = from_hf(path, scan_layers=False)
    processor = MllamaProcessor(MllamaImageProcessor(size=config.vision.image_size, max_image_tiles=4), tokenizer)
    return config, hf, ours, processor


def bench_image():
    import PIL.Image

    rng = np.random.default_rng(0)
    return PIL.Image.fromarray((rng.random((448, 448, 3)) * 255).astype(np.uint8))


def prompt_inputs(processor, batch: int, prompt_tokens: int = 64):
    """`batch` copies of a chat prompt with one image, trimmed/padded to exactly `prompt_tokens` tokens."""
    from llava_cot_jax.data import chat

    words = (QUESTION + " ") * 4
    for n in range(len(words), 0, -1):
        text = chat.render_prompt(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": words[:n]}]}]
        )
        if len(processor.tokenizer(text, add_special_tokens=False)["input_ids"]) <= prompt_tokens:
            break
    inputs = processor(images=[[bench_image()]] * batch, text=[text] * batch, padding=True, bos="once")
    assert inputs["input_ids"].shape[1] <= prompt_tokens
    return inputs


# --- measurements --------------------------------------------------------------------------------------------


def measure_bandwidth() -> dict:
    import jax
    import jax.numpy as jnp

    a = np.ones(256 * 1024 * 1024 // 4 * 4, np.float32)  # 1 GiB
    best = min(_timed(lambda: a.sum()) for _ in range(5))
    x = jnp.ones(a.shape, jnp.float32)
    f = jax.jit(lambda v: jnp.sum(v))
    f(x).block_until_ready()
    best_jax = min(_timed(lambda v=x: f(v).block_until_ready()) for _ in range(5))
    del x
    return {"numpy_1thread_GBps": a.nbytes / best / 1e9, "jax_GBps": a.nbytes / best_jax / 1e9}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def decode_bytes_per_token(config, cache_slots: int, vision_tokens: int) -> dict:
    """Bytes the text decoder reads for one token at batch 1 (fp32): every weight except the embedding table
    (one row) and the cross layers' k/v projections (their output, the image K/V, is precomputed), plus the
    self-attention cache slots attention reads and the image K/V."""
    t = config.text
    d, kvh, hd = t.hidden_size, t.num_key_value_heads, t.head_dim
    n_self, n_cross = len(t.self_attention_layers), len(t.cross_attention_layers)
    attn = d * t.num_attention_heads * hd * 2 + d * kvh * hd * 2
    mlp = 3 * d * t.intermediate_size
    self_layer = attn + mlp + 2 * d
    cross_layer = d * t.num_attention_heads * hd * 2 + mlp + 2 * d + 2 * hd + 2
    weights = 4 * (n_self * self_layer + n_cross * cross_layer + d + d * t.vocab_size + d)
    cache = 4 * n_self * 2 * cache_slots * kvh * hd
    image = 4 * n_cross * 2 * vision_tokens * kvh * hd
    return {"weights": weights, "kv_cache": cache, "image_kv": image, "total": weights + cache + image}


def bench_decode_hf(hf, inputs, batch: int, new: int, repeats: int):
    import torch

    torch_inputs = {k: torch.as_tensor(v).to(TORCH_DEVICE) for k, v in inputs.items()}

    def run(n):
        with torch.no_grad():
            out = hf.generate(**torch_inputs, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
            if TORCH_DEVICE != "cpu":
                torch.cuda.synchronize()
            return out

    run(2)  # warm-up
    t1 = min(_timed(lambda: run(1)) for _ in range(repeats))
    tn = min(_timed(lambda: run(new + 1)) for _ in range(repeats))
    return {"prefill_s": t1, "decode_tokens_per_s": batch * new / (tn - t1)}


def bench_decode_ours(model, inputs, batch: int, new: int, repeats: int):
    from llava_cot_jax.generate import sampler

    s = sampler.Sampler(model)
    run = lambda n: sampler.generate(model, **inputs, max_new_tokens=n, eos_token_id=None, sampler=s)
    t_compile = _timed(lambda: (run(1), run(new + 1)))
    t1 = min(_timed(lambda: run(1)) for _ in range(repeats))
    tn = min(_timed(lambda: run(new + 1)) for _ in range(repeats))
    return {"prefill_s": t1, "decode_tokens_per_s": batch * new / (tn - t1), "first_calls_s": t_compile}


# --- the reference: the paper's loop in PyTorch ---------------------------------------------------------------


class ReferenceStageSearch:
    """Stage-level beam search as the paper's code runs it, on transformers: every candidate and every judge
    reply is its own `generate` call over the full prompt + accepted prefix (vision encoder included). The
    judge wording is ours (the same as the JAX side), so both sides read prompts of the same length."""

    def __init__(self, hf, processor, n: int, stage_tokens: int, judge_tokens: int, seed: int = 0):
        from llava_cot_jax.generate.judge import JudgePrompts

        self.hf, self.processor, self.n = hf, processor, n
        self.stage_tokens, self.judge_tokens = stage_tokens, judge_tokens
        self.prompts = JudgePrompts()
        self.rng = np.random.default_rng(seed)
        self.calls = 0
        self.sampling = dict(do_sample=True, temperature=0.6, top_p=0.9, pad_token_id=0)

    def _generate(self, inputs: dict, max_new: int, stop: str | None = None):
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        tokenizer, start = self.processor.tokenizer, inputs["input_ids"].shape[1]

        class StopOnString(StoppingCriteria):  # decodes the new text at every step, as the paper's criterion does
            def __call__(self, input_ids, scores, **kwargs):
                return torch.tensor(
                    [stop in tokenizer.decode(input_ids[0, start:], skip_special_tokens=True)], device=input_ids.device
                )

        self.calls += 1
        extra = {"stopping_criteria": StoppingCriteriaList([StopOnString()])} if stop else {}
        with torch.no_grad():
            out = self.hf.generate(
                **{k: torch.as_tensor(v).to(TORCH_DEVICE) for k, v in inputs.items()},
                max_new_tokens=max_new,
                **self.sampling,
                **extra,
            )
        return out[0, start:].cpu().numpy()

    def _judge_inputs(self, text: str, image):
        from llava_cot_jax.data import chat

        parts = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": text}]
        prompt = chat.render_prompt([{"role": "user", "content": parts}])
        return self.processor(images=[[image]] if image is not None else None, text=[prompt], bos="once")

    def _judge(self, question, image, kind, a, b, hint):
        if kind == "reasoning":  # the paper screens both sides of each pair first
            for index, text in enumerate((a, b)):
                reply = self._reply(self._judge_inputs(self.prompts.screen_text(question, text, hint), None))
                if "incorrect" in reply:
                    return 1 - index
        reply = self._reply(self._judge_inputs(self.prompts.compare_text(kind, question, a, b, hint), image))
        return 0 if self.prompts.parse_choice(reply) == 0 else 1  # the paper: anything but "1" means 2

    def _reply(self, inputs):
        return self.processor.tokenizer.decode(self._generate(inputs, self.judge_tokens), skip_special_tokens=True)

    def run(self, question: str, image, inputs: dict) -> str:
        from llava_cot_jax.data import chat

        tokenizer = self.processor.tokenizer
        ids = inputs["input_ids"]
        accepted_ids = np.zeros((1, 0), np.int64)
        stages = {}
        for stage in chat.STAGES:
            candidates = []
            for _ in range(self.n):
                full = np.concatenate([ids, accepted_ids], axis=1)
                step = dict(
                    inputs,
                    input_ids=full,
                    attention_mask=np.ones_like(full),
                    cross_attention_mask=np.concatenate(
                        [
                            inputs["cross_attention_mask"],
                            np.repeat(inputs["cross_attention_mask"][:, -1:], accepted_ids.shape[1], axis=1),
                        ],
                        1,
                    ),
                )
                new = self._generate(step, self.stage_tokens, chat.close_tag(stage))
                text = tokenizer.decode(new, skip_special_tokens=True)
                candidates.append((new, text))
            kind = stage.lower()
            hint = (
                stages.get("CAPTION", "")
                if kind == "reasoning"
                else (stages.get("CAPTION", "") + stages.get("REASONING", "") if kind == "conclusion" else "")
            )
            while len(candidates) > 1:
                first = candidates.pop(self.rng.integers(len(candidates)))
                second = candidates.pop(self.rng.integers(len(candidates)))
                verdict = self._judge(question, image, kind, first[1], second[1], hint)
                candidates.append(first if verdict == 0 else second)
            accepted_ids = np.concatenate([accepted_ids, candidates[0][0][None]], axis=1)
            stages[stage] = candidates[0][1]
        return tokenizer.decode(accepted_ids[0], skip_special_tokens=True)


def bench_search_ours(model, processor, question_sets):
    from llava_cot_jax.generate import sampler
    from llava_cot_jax.generate.stage_search import SearchConfig, Searcher

    cfg = SearchConfig(
        num_candidates=N_CANDIDATES, stage_max_new_tokens=STAGE_TOKENS, judge_max_new_tokens=JUDGE_TOKENS
    )
    searcher = Searcher(model, processor, cfg)
    searcher.sampler.eos_token_ids = ()  # random weights: no EOS, as on the reference side
    image = bench_image()
    times, compiles = [], []
    for questions in question_sets:
        t = _timed(lambda questions=questions: searcher.ask(questions, [[image]] * len(questions)))
        times.append(t)
        compiles.append(sampler.compile_count())
    return {
        "seconds": times,
        "compiled_programs_after_each_run": compiles,
        "host_syncs": searcher.syncs,
        "timings_last_run": searcher.timings,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    parser.add_argument("--skip", default="", help="comma list of sections to skip: bandwidth,decode,search")
    parser.add_argument("--torch_device", default="cpu", help="where transformers runs: cpu, or cuda on a GPU host")
    args = parser.parse_args()
    global TORCH_DEVICE
    TORCH_DEVICE = args.torch_device
    skip = set(args.skip.split(","))
    repeats = 1 if args.quick else 3

    import jax
    import torch

    torch.set_num_threads(2)
    report = {"jax": jax.__version__, "torch": torch.__version__, "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as workdir:
        config, hf, ours, processor = setup(workdir)
        hf.to(TORCH_DEVICE)
        report["devices"] = {"jax": str(jax.devices()[0]), "torch": TORCH_DEVICE}
        report["params_text"] = sum(
            p.numel() for n, p in hf.named_parameters() if "vision" not in n and "projector" not in n
        )
        report["params_total"] = sum(p.numel() for p in hf.parameters())
        print(json.dumps(report), flush=True)
        if "bandwidth" not in skip:
            report["bandwidth"] = measure_bandwidth()
            print(json.dumps(report["bandwidth"]), flush=True)

        if "decode" not in skip:
            for batch in (1, 8):
                inputs = prompt_inputs(processor, batch)
                h = bench_decode_hf(hf, inputs, batch, 64, repeats)
                o = bench_decode_ours(ours, inputs, batch, 64, repeats)
                report[f"decode_b{batch}"] = {
                    "transformers": h,
                    "ours": o,
                    "speedup": o["decode_tokens_per_s"] / h["decode_tokens_per_s"],
                }
                print(json.dumps({f"decode_b{batch}": report[f"decode_b{batch}"]}), flush=True)
            vision_tokens = 4 * config.vision.num_patches
            from llava_cot_jax.generate.sampler import bucket_length

            slots = bucket_length(inputs["input_ids"].shape[1]) + 65
            bpt = decode_bytes_per_token(config, slots, vision_tokens)
            bw = report.get("bandwidth", {}).get("jax_GBps")
            report["roofline_b1"] = {"bytes_per_token": bpt}
            if bw:
                roof = bw * 1e9 / bpt["total"]
                report["roofline_b1"].update(
                    roofline_tokens_per_s=roof,
                    fraction_ours=report["decode_b1"]["ours"]["decode_tokens_per_s"] / roof,
                    fraction_transformers=report["decode_b1"]["transformers"]["decode_tokens_per_s"] / roof,
                )
            print(json.dumps({"roofline_b1": report["roofline_b1"]}), flush=True)

        if "search" not in skip:
            inputs = prompt_inputs(processor, 1)
            ref = ReferenceStageSearch(hf, processor, N_CANDIDATES, STAGE_TOKENS, JUDGE_TOKENS)
            t_ref = _timed(lambda: ref.run(QUESTION, bench_image(), inputs))
            print(json.dumps({"search_transformers_s": t_ref, "generate_calls": ref.calls}), flush=True)
            more = ["How many objects are in the picture?", QUESTION + " Be precise.", "Which object is the largest?"]
            o = bench_search_ours(ours, processor, [[QUESTION], more[:1], more[1:2]])
            report["stage_search_n4"] = {
                "transformers_s": t_ref,
                "transformers_generate_calls": ref.calls,
                "ours": o,
                "speedup_warm": t_ref / min(o["seconds"][1:]),
                "speedup_incl_compile": t_ref / o["seconds"][0],
            }
            print(json.dumps({"stage_search_n4": report["stage_search_n4"]}), flush=True)
            # Throughput, not latency: 4 questions searched as one batch (16 candidate rows); the reference loop
            # answers one question at a time, so its time per question is the single-question figure above.
            batched = bench_search_ours(ours, processor, [[QUESTION] + more, more + [QUESTION]])
            per_question = min(batched["seconds"][1:]) / 4
            report["stage_search_n4_batch4"] = {
                "ours": batched,
                "seconds_per_question_warm": per_question,
                "throughput_ratio": t_ref / per_question,
            }
            print(json.dumps({"stage_search_n4_batch4": report["stage_search_n4_batch4"]}), flush=True)
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    main()
