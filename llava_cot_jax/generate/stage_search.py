"""Stage-level beam search (LLaVA-CoT) and the paper's baselines, over the jitted sampler.

For each stage SUMMARY → CAPTION → REASONING → CONCLUSION, a batch of B questions × N candidates decodes
as one batch of B·N rows that continue the accepted prefix from the KV cache (no prefix is ever re-run),
each ending at the stage's closing tag. The model then judges its own candidates in a knock-out
tournament (`judge.knockout`): every round's comparisons, over all questions, are one batched call
(`judge_runner.JudgeRunner`) that continues each question's judge prefix (prefilled once per stage) and reads
the image's cross-attention K/V computed once per question. For the reasoning stage each candidate is first
screened for mistakes (one batched text-only call). The winner's cache row is copied into all N rows
and the next stage starts from it.

Host round trips are per stage, not per token: one to read the candidates, one per tournament round
(log2 N), one for the screen. The judge prompts are text built from candidate text (they must be
user-overridable templates), so they are assembled and parsed on the host between those calls. A judge
reply ends at its verdict phrase (a stop string), at EOS or at its budget; the trace counts how many
verdicts were read and how many fell back (`SearchResult.verdicts`).

Baselines share the machinery: `greedy` / `sample` (one answer), `best_of_n` (N whole answers, one
tournament), `sentence` (sentence-level beam: N next sentences, tournament, repeat).

`SearchConfig.procedure` switches between our tournament and LLaVA-CoT's (their
`inference/VLMEvalKit/inference_demo.py` and `inference/demo/simple_inference.py`) in one setting:

    setting        "ours" (default)                         "llava_cot"
    bracket        rounds: shuffled single elimination      pool: two drawn at random, the winner goes back
    screen         once: every reasoning candidate, first   per_match: first shown, then second, every match
    fallback       symmetric: closed, log-prob, coin        second: the candidate shown second wins
    sentence_end   period: a token holding "."              text_end: the text ends with "."

Each can also be set on its own. Why ours is the default (tests/test_judge_procedures.py): with a judge that
is right more often than not, a balanced bracket gives the best candidate the highest chance to win of any
bracket shape (it plays the fewest matches), and with a perfect judge both brackets pick the same winner;
screening once settles a match of two failed candidates by the judge rather than by the order they were
shown in, and asks N screens per stage instead of up to 2(N - 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import PIL.Image

from llava_cot_jax.data import chat
from llava_cot_jax.generate import judge as judge_lib
from llava_cot_jax.generate import judge_runner as judge_runner_lib
from llava_cot_jax.generate import sampler as sampler_lib
from llava_cot_jax.generate import scorer as scorer_lib
from llava_cot_jax.generate import stop as stop_lib
from llava_cot_jax.generate import swires as swires_lib
from llava_cot_jax.generate.scorer import verdict_counts  # noqa: F401  (re-exported: the trace's verdict counts)

METHODS = ("stage", "best_of_n", "sentence", "greedy", "sample", "swires")
MIN_PROMPT_BUCKET = 128  # question prompts are padded to at least this many tokens (one bucket for most questions)
CACHE_STEP = 128  # KV caches are sized in multiples of this many slots

# N per method when num_candidates is not given. stage: the paper's Tables 4 and 7 (author, LLaVA-CoT issue #38)
# and the `--beam_size` default of inference/demo/simple_inference.py (their evaluation script hard-codes 10);
# best_of_n and sentence: inference/VLMEvalKit/inference_demo.py (`range(10)`, `range(5)`).
# swires: 4 caption candidates per round (inference/VLMEvalKit/swires.py, `for _ in range(4)`).
DEFAULT_NUM_CANDIDATES = {"stage": 2, "best_of_n": 10, "sentence": 5, "greedy": 1, "sample": 1, "swires": 4}

# The tournament settings each procedure implies (module docstring).
PROCEDURES = {
    "ours": {"bracket": "rounds", "screen": "once", "fallback": "symmetric", "sentence_end": "period"},
    "llava_cot": {"bracket": "pool", "screen": "per_match", "fallback": "second", "sentence_end": "text_end"},
}
SENTENCE_ENDS = ("period", "text_end")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Search settings. Where a default comes from LLaVA-CoT's inference code (`inference/demo/simple_inference.py`
    and `inference/VLMEvalKit/inference_demo.py`, transformers 4.45), the comment says so; `None` fields resolve
    from `method` / `procedure` when the config is built."""

    method: str = "stage"
    num_candidates: int | None = None  # N; None: DEFAULT_NUM_CANDIDATES[method] (2 / 10 / 5, sources there)
    temperature: float = 0.6  # theirs: generate(do_sample=True, temperature=0.6, top_p=0.9) for every call
    top_p: float = 0.9  # theirs (as above)
    top_k: int = 50  # transformers' generate default, which their calls keep
    stage_max_new_tokens: int = 512  # ours: one stage candidate, cut there (theirs allow 2048 per call)
    max_new_tokens: int = 2048  # theirs (max_new_tokens=2048): a whole answer; here also the sentence beam's total
    sentence_max_new_tokens: int = 96  # ours: one sentence candidate (theirs allow 2048 per call, no total cap)
    judge_max_new_tokens: int = 2048  # theirs: judge and screen replies get the candidates' 2048
    judge_do_sample: bool = True  # theirs: judge replies are sampled with the candidates' settings
    # Judge prefixes and the rest of judge prompts are padded to multiples of this many tokens: judge prefill is
    # much of a search's compute, so padding to powers of two would waste ~30% of it.
    judge_bucket_step: int = 64
    seed: int = 0
    prompts_file: str | None = None  # JSON overriding judge.JudgePrompts (configs/judge_prompts_example.json)
    bos: str = chat.DEFAULT_BOS  # "transformers": two BOS on every prompt, judge prompts included, as theirs
    procedure: str = "ours"  # "ours" | "llava_cot": the defaults of the four settings below (PROCEDURES)
    bracket: str | None = None  # "rounds" | "pool" (judge.bracket_rounds / judge.bracket_pool)
    screen: str | None = None  # "once" | "per_match" (judge.knockout)
    fallback: str | None = None  # "symmetric" | "second" (judge.fallback_winner)
    sentence_end: str | None = None  # "period" | "text_end": what ends a sentence candidate (sentence beam)
    scorer: str = "self_judge"  # what keeps candidates: "self_judge" (tournament) | "reward" (generate/scorer.py)
    reward_weights: str = ""  # scorer=reward: a reward model's training checkpoint DIR/checkpoints/STEP
    # SWIRES (method="swires", generate/swires.py; theirs: inference/VLMEvalKit/swires.py): resample the caption
    # while fewer than two reasoning candidates score above the cutoff, at most this many times. Their cutoff is
    # reward_mean + Z * reward_std = -0.77 + 0.2533 * 2.08 (Z = 0.2533: the 60th percentile of their reward
    # model's scores); a reward model trained here has its own scale, so set it from its rewards.
    swires_threshold: float = -0.77 + 0.2533 * 2.08
    swires_max_backtracks: int = 4  # theirs: max_backtrack = 4

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.procedure not in PROCEDURES:
            raise ValueError(f"procedure must be one of {sorted(PROCEDURES)}, got {self.procedure!r}")
        if self.num_candidates is None:
            object.__setattr__(self, "num_candidates", DEFAULT_NUM_CANDIDATES[self.method])
        for name, value in PROCEDURES[self.procedure].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        allowed = {
            "bracket": judge_lib.BRACKETS,
            "screen": judge_lib.SCREENS,
            "fallback": judge_lib.FALLBACKS,
            "sentence_end": SENTENCE_ENDS,
            "bos": chat.BOS_MODES,
        }
        for name, values in allowed.items():
            if getattr(self, name) not in values:
                raise ValueError(f"{name} must be one of {values}, got {getattr(self, name)!r}")
        if self.num_candidates < 1:
            raise ValueError("num_candidates must be >= 1")
        if self.scorer not in scorer_lib.SCORERS:
            raise ValueError(f"scorer must be one of {scorer_lib.SCORERS}, got {self.scorer!r}")
        if self.method == "swires" and self.scorer != "reward":
            raise ValueError("method swires keeps candidates by reward: set scorer=reward (and reward_weights)")
        if self.swires_max_backtracks < 0:
            raise ValueError("swires_max_backtracks must be >= 0")
        for name in ("stage_max_new_tokens", "max_new_tokens", "sentence_max_new_tokens", "judge_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


@dataclasses.dataclass
class SearchResult:
    question: str
    text: str  # the accepted answer as generated (all stages)
    stages: dict[str, str]  # stage → content of the accepted candidate (also a cut one)
    conclusion: str
    trace: list[dict]  # per step: candidates, matches (judge replies, verdicts, rules), verdict counts, winner
    num_host_syncs: int = 0
    verdicts: dict[str, int] = dataclasses.field(default_factory=dict)  # judge replies read / fallen back, in all

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def question_inputs(
    processor, questions: Sequence[str], images: Sequence[Sequence[Any]] | None = None, bos: str = chat.DEFAULT_BOS
) -> dict:
    """Processor inputs of questions asked as LLaVA-CoT asks them: one user turn (its images first, then the
    text) in the template of the processor's family, ready for the answer, with the BOS tokens of `bos` (Mllama:
    two by default, as theirs)."""
    if images is not None and len(images) != len(questions):
        raise ValueError(f"{len(questions)} questions but {len(images)} image lists")
    prompts = []
    for i, q in enumerate(questions):
        prompts.append(processor.render_prompt(chat.user_turn(q, len(images[i]) if images is not None else 0)))
    has_images = images is not None and all(len(x) > 0 for x in images)
    if images is not None and not has_images and any(len(x) > 0 for x in images):
        raise ValueError("mix of questions with and without images in one batch; split the batch")
    return processor(images=list(images) if has_images else None, text=prompts, padding=True, bos=bos)


def question_image_arrays(inputs: dict) -> dict:
    """The image arrays of processor inputs, per question: pixel_values, aspect_ratio_ids and aspect_ratio_mask
    as numpy, and num_tiles (each image's tile count): what a reward scorer reads of question q, at index q.
    A family without tiles (LLaVA: no aspect-ratio arrays) counts each image as one tile."""
    pixel_values = np.asarray(inputs["pixel_values"])
    tiled = "aspect_ratio_ids" in inputs  # Mllama's pixel_values [B, I, T, 3, H, W]; LLaVA's [B, I, 3, H, W]
    if "aspect_ratio_mask" in inputs:
        ar_mask = np.asarray(inputs["aspect_ratio_mask"])
    else:
        ar_mask = np.ones(pixel_values.shape[:3] if tiled else (*pixel_values.shape[:2], 1), np.int32)
    ar_ids = np.asarray(inputs["aspect_ratio_ids"]) if tiled else np.zeros(ar_mask.shape[:2], np.int32)
    return {
        "pixel_values": pixel_values,
        "aspect_ratio_ids": ar_ids,
        "aspect_ratio_mask": ar_mask,
        "num_tiles": [[int(t) for t in row.sum(-1) if t > 0] for row in ar_mask],
    }


def stage_content(text: str, stage: str) -> str:
    """The text inside a stage's tags; without the open tag, everything before the close tag."""
    start = text.find(chat.open_tag(stage))
    start = 0 if start < 0 else start + len(chat.open_tag(stage))
    end = text.find(chat.close_tag(stage), start)
    return (text[start:] if end < 0 else text[start:end]).strip()


@dataclasses.dataclass
class _Batch:
    """Per-call state on the host side."""

    questions: list[str]
    cross_kv: Any  # [.., B, ..] or None
    accepted: list[str]
    stages: list[dict]
    traces: list[list]
    ended: np.ndarray  # [B] the question's answer is finished (EOS or conclusion accepted)
    judges: judge_runner_lib.JudgeRunner | None = None
    images: dict | None = None  # per question: pixel_values, aspect_ratio_ids/mask, num_tiles (reward scorer)


@dataclasses.dataclass(frozen=True)
class SearchShapes:
    """The array shapes of one search, fixed by the search config, the question's prompt bucket and its length
    in judge bucket steps (not by what the model writes), so that one question compiles a handful of programs
    and the next one of a similar length none.

    prompt: token length of the question prompts; cache_len: KV-cache slots of candidate states; judge: the
    judge calls' shapes (`judge_runner.JudgeShapes`)."""

    prompt: int
    cache_len: int
    judge: judge_runner_lib.JudgeShapes


class Searcher:
    """Runs a `SearchConfig` over batches of questions with one model.

    `processor` is the processor of the model's family (`MllamaProcessor`, `LlavaProcessor`: tokenizer, image
    processor and the family's prompt template). Use `ask(questions, images)` with raw questions, or
    `__call__(inputs, questions)` with processor outputs of prompts you rendered yourself (`questions` is then the
    plain text the judge is shown).
    """

    def __init__(
        self,
        model,
        processor,
        config: SearchConfig = SearchConfig(),
        prompts: judge_lib.JudgePrompts | None = None,
        judge_fn: Callable[[list[str], str], Sequence[str]] | None = None,
        on_stage: Callable[[int, str, str], None] | None = None,
        on_token: Callable[[np.ndarray, np.ndarray], None] | None = None,
        mesh: jax.sharding.Mesh | None = None,
        scan_layers: bool = False,
        scorer: scorer_lib.Scorer | None = None,
    ):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.config = config
        self.prompts = prompts or judge_lib.JudgePrompts.load(config.prompts_file)
        self.sampler = sampler_lib.Sampler(model, tokenizer=self.tokenizer, mesh=mesh, scan_layers=scan_layers)
        self._judge_override = judge_fn  # (judge prompt texts, kind) -> replies, instead of the model
        self.on_stage = on_stage  # (question index, stage, accepted text) after each step
        self.on_token = on_token  # (tokens [rows], active [rows]) per decode step, single-candidate methods only
        self.syncs = 0
        self.timings: dict[str, float] = {}
        self._rng = np.random.default_rng(config.seed)  # brackets, fallback coins, judge seeds; reset per call
        self._warming_up = False  # `warmup()`: every step runs with a one-token budget
        self._batch: _Batch | None = None  # the batch being searched
        self._judge_tokens: dict[int, dict] = {}  # judge tokens read / generated per question since the last tally
        self.scorer = scorer or self._default_scorer()

    def _default_scorer(self) -> scorer_lib.Scorer:
        cfg = self.config
        if cfg.scorer == "reward":
            if not cfg.reward_weights:
                raise ValueError("scorer=reward needs reward_weights: a reward model's DIR/checkpoints/STEP")
            model = scorer_lib.load_reward_model(cfg.reward_weights, dtype=self.model.config.dtype)
            return scorer_lib.RewardScorer(model, self.tokenizer, self._question_images, bos=cfg.bos)
        return scorer_lib.SelfJudge(
            judge=lambda matches, step: self._judge(self._batch, step, matches),
            screen=lambda pairs, step: self._screen(self._batch, step.groups, pairs),
            tally=self._tally_judge_tokens,
            parse_choice=self.prompts.parse_choice,
            rng=lambda: self._rng,
            bracket=cfg.bracket,
            fallback=cfg.fallback,
            screen_mode=cfg.screen,
        )

    def _tally_judge_tokens(self) -> dict[int, dict]:
        tally, self._judge_tokens = self._judge_tokens, {}
        return tally

    def _question_images(self, q: int) -> dict | None:
        """Question q's processed image arrays (the reward scorer reads the image itself)."""
        images = self._batch.images if self._batch is not None else None
        if images is None:
            return None
        return {key: value[q] for key, value in images.items()}

    # -- entry points ----------------------------------------------------------------------------------------

    def ask(self, questions: Sequence[str], images: Sequence[Sequence[Any]] | None = None) -> list[SearchResult]:
        """Render each question with the chat template (its images first), then search."""
        return self(question_inputs(self.processor, questions, images, self.config.bos), questions)

    def __call__(self, inputs: dict, questions: Sequence[str]) -> list[SearchResult]:
        cfg = self.config
        input_ids = np.asarray(inputs["input_ids"])
        if len(questions) != input_ids.shape[0]:
            raise ValueError(f"{len(questions)} questions for a batch of {input_ids.shape[0]}")
        self.syncs = 0
        self.timings = {}
        method = cfg.method
        n = 1 if method in ("greedy", "sample") else cfg.num_candidates
        batch, state = self._prefill(inputs, list(questions), n)
        rows_kv = batch.cross_kv  # each run of n candidate rows reads its question's image K/V (no copies)
        key = jax.random.key(cfg.seed)
        self._rng = np.random.default_rng(cfg.seed)
        rows = np.arange(len(questions) * n)  # the state row each candidate continues (winners after a step)
        budget = lambda tokens: 1 if self._warming_up else tokens

        def stage_step(state, rows, index: int, stage: str):
            """One stage's N candidates per question, generated to its close tag and scored."""
            return self._step(
                batch,
                state,
                rows,
                rows_kv,
                n,
                jax.random.fold_in(key, index),
                stage=stage,
                stops=(chat.close_tag(stage),),
                budget=budget(cfg.stage_max_new_tokens),
                kind=stage.lower(),
                max_new=cfg.stage_max_new_tokens,
            )

        if method == "stage":
            for index, stage in enumerate(chat.STAGES):
                state, rows = stage_step(state, rows, index, stage)
        elif method == "swires":
            state, rows = swires_lib.run(self, batch, state, rows, stage_step)
        elif method == "sentence":
            used = 0
            period = "." if cfg.sentence_end == "period" else stop_lib.TextEnd(".")
            for index in range(cfg.max_new_tokens):
                if batch.ended.all() or used >= cfg.max_new_tokens:
                    break
                before = int(state.cursor)
                state, rows = self._step(
                    batch,
                    state,
                    rows,
                    rows_kv,
                    n,
                    jax.random.fold_in(key, index),
                    stage=None,
                    stops=(period, chat.close_tag("CONCLUSION")),
                    budget=budget(min(cfg.sentence_max_new_tokens, cfg.max_new_tokens - used)),
                    kind="sentence",
                    max_new=cfg.sentence_max_new_tokens,
                )
                used += int(state.cursor) - before
                for b, text in enumerate(batch.accepted):
                    if chat.close_tag("CONCLUSION") in text:
                        batch.ended[b] = True
                if self._warming_up:
                    break
        else:  # greedy, sample, best_of_n: one step over the whole answer
            state, rows = self._step(
                batch,
                state,
                rows,
                rows_kv,
                n,
                key,
                stage=None,
                stops=(chat.close_tag("CONCLUSION"),),
                budget=budget(cfg.max_new_tokens),
                kind="answer",
                max_new=cfg.max_new_tokens,
            )

        results = []
        for b, q in enumerate(batch.questions):
            text = batch.accepted[b]
            stages = dict(batch.stages[b]) if method in ("stage", "swires") else chat.split_stages(text)
            conclusion = stages.get("CONCLUSION") if "CONCLUSION" in stages else chat.extract_conclusion(text)
            verdicts = {k: sum(step["verdicts"][k] for step in batch.traces[b]) for k in ("read", "fallback")}
            results.append(SearchResult(q, text, stages, conclusion, batch.traces[b], self.syncs, verdicts))
        return results

    # -- pieces ----------------------------------------------------------------------------------------------

    def _sampling(self) -> sampler_lib.Sampling:
        cfg = self.config
        if cfg.method == "greedy":
            return sampler_lib.Sampling(do_sample=False)
        return sampler_lib.Sampling(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)

    def _judge_sampling(self) -> sampler_lib.Sampling:
        cfg = self.config
        if cfg.judge_do_sample:
            return sampler_lib.Sampling(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
        return sampler_lib.Sampling()

    def _prefill(self, inputs: dict, questions: list[str], n: int):
        ids = np.asarray(inputs["input_ids"])
        mask = np.asarray(inputs.get("attention_mask", np.ones_like(ids)))
        b, s = ids.shape
        bucket = sampler_lib.bucket_length(s, minimum=MIN_PROMPT_BUCKET)
        has_images = inputs.get("pixel_values") is not None
        cross_attends = has_images and self.model.cross_attends_images  # LLaVA's image is in the prompt's tokens
        extra = [np.asarray(inputs["cross_attention_mask"])] if cross_attends else []
        ids, mask, _, extras = sampler_lib.left_align(ids, mask, bucket, self.sampler.pad_token_id, *extra)
        cross_kv, num_tiles = None, None
        if has_images:
            images = question_image_arrays(inputs)
            ar_mask = images["aspect_ratio_mask"]
            cross_kv = self.sampler.encode_images(inputs["pixel_values"], images["aspect_ratio_ids"], ar_mask)
            num_tiles = images["num_tiles"]
        max_images = np.shape(inputs["pixel_values"])[1] if has_images else 0
        question_tokens = max(len(self.tokenizer(q, add_special_tokens=False)["input_ids"]) for q in questions)
        shapes = search_shapes(self.config, self.prompts, self.processor, bucket, question_tokens, n, max_images)
        state = self.sampler.prefill(
            ids,
            mask,
            cross_kv,
            extras[0] if cross_attends else None,
            cache_len=shapes.cache_len,
            rows=np.repeat(np.arange(b), n),
        )
        cfg = self.config
        judges = judge_runner_lib.JudgeRunner(
            self.sampler,
            self.processor,
            shapes.judge,
            num_questions=b,
            num_tiles=num_tiles,
            max_images=max_images,
            cross_kv=cross_kv,
            sampling=self._judge_sampling(),
            max_new_tokens=cfg.judge_max_new_tokens,
            bucket_step=cfg.judge_bucket_step,
            cache_step=CACHE_STEP,
            bos=cfg.bos,
        )
        batch = _Batch(
            questions, cross_kv, [""] * b, [{} for _ in range(b)], [[] for _ in range(b)], np.zeros(b, bool), judges
        )
        if has_images:
            batch.images = images
        self._batch = batch
        return batch, state

    def warmup(self, batch_size: int = 1, num_images: int = 1, question_tokens: int | None = None) -> float:
        """Compiles every program a search runs for `batch_size` questions of up to `question_tokens` tokens (default:
        one judge bucket step, 64) with `num_images` images each, by running one such search with a one-token
        budget per step: shapes depend only on the config, the prompt bucket and the question's length in bucket
        steps (see `SearchShapes`), not on what is generated. A server or a notebook calls this once; the first real
        question of that size then runs at warm speed. Returns the seconds it took."""
        start = time.perf_counter()
        question_tokens = question_tokens or self.config.judge_bucket_step
        words = ["warm"] * question_tokens  # one token each in any Llama-style vocabulary; trimmed to fit below
        while (
            len(words) > 1
            and len(self.tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) > question_tokens
        ):
            words.pop()
        question = " ".join(words)
        vision = self.model.config.vision
        image = PIL.Image.fromarray(np.full((vision.image_size, vision.image_size, 3), 128, np.uint8))
        images = [[image] * num_images] * batch_size if num_images else None
        callbacks = self.on_stage, self.on_token
        self._warming_up, self.on_stage, self.on_token = True, None, None
        try:
            self.ask([question] * batch_size, images)
        finally:
            self._warming_up, (self.on_stage, self.on_token) = False, callbacks
        return time.perf_counter() - start

    def _decode_text(self, tokens: np.ndarray) -> str:
        return judge_runner_lib.decode_text(self.tokenizer, tokens)

    def _step(
        self,
        batch: _Batch,
        state,
        rows,
        rows_kv,
        n: int,
        key,
        *,
        stage: str | None,
        stops,
        budget: int,
        kind: str,
        max_new: int,
    ):
        """Sample n candidates per question (candidate row r continuing state row `rows[r]`), run the tournament;
        returns the state and the rows that make each question's winner the prefix of all its candidates."""
        b = len(batch.questions)
        t0 = time.perf_counter()
        active = ~np.repeat(batch.ended, n)
        stream = self.on_token is not None and n == 1
        with sampler_lib.streaming(self.on_token) if stream else contextlib.nullcontext():
            state, out = self.sampler.decode(
                state,
                max_new=max_new,
                budget=budget,
                sampling=self._sampling(),
                seed=key,
                stop_strings=stops,
                eos_ids=self.sampler.eos_token_ids,
                cross_kv=rows_kv,
                keep_last=True,
                active=active,
                stream=stream,
                rows=rows,
            )
        steps = int(out.steps)  # host sync: candidates
        self.syncs += 1
        tokens = np.asarray(out.tokens)[:, :steps]
        num = np.asarray(out.num_tokens)
        finish = np.asarray(out.finish)
        logprob = np.asarray(out.logprob_sum)
        self._tick("decode", t0)

        groups, infos = [], []  # the tournament's view of each candidate, and what the trace records
        for q in range(b):
            cands, info = [], []
            for j in range(n):
                r = q * n + j
                text = self._decode_text(tokens[r, : num[r]])
                written = num[r] - (finish[r] == sampler_lib.FINISH_EOS)
                shown = stage_content(text, stage) if stage else text.strip()
                cands.append(
                    judge_lib.Candidate(
                        text=shown,
                        closed=bool(finish[r] == sampler_lib.FINISH_STOP),
                        mean_logprob=float(logprob[r] / max(written, 1)),
                    )
                )
                info.append(
                    {"text": text, "finish": sampler_lib.FINISH_NAMES[int(finish[r])], "num_tokens": int(num[r])}
                )
            groups.append(cands)
            infos.append(info)

        live = [q for q in range(b) if not batch.ended[q]]
        t1 = time.perf_counter()
        step = scorer_lib.StepCandidates(
            kind, stage, batch.questions, list(batch.accepted), groups, [[i["text"] for i in g] for g in infos], live
        )
        self._batch = batch  # the scorers' view of the questions being searched (judge runner, images)
        selection = self.scorer.select(step) if n > 1 and live else scorer_lib.Selection([0] * b, [{}] * b)
        winners = selection.winners
        self._tick("judge", t1)

        for q in live:
            win, info = groups[q][winners[q]], infos[q][winners[q]]
            batch.accepted[q] += info["text"]
            if stage:
                batch.stages[q][stage] = win.text
            if info["finish"] == "eos" or stage == "CONCLUSION":
                batch.ended[q] = True  # the model ended its answer (or the last stage is in): nothing more to add
            chosen = dict(selection.trace[q])
            for j, reply in chosen.pop("screen_replies", {}).items():
                infos[q][j]["screen_reply"] = reply
            batch.traces[q].append(
                {
                    "step": stage or kind,
                    "winner": winners[q],
                    "candidates": [
                        dict(i, shown_to_judge=c.text, closed=c.closed, mean_logprob=c.mean_logprob, screen=c.screen)
                        for c, i in zip(groups[q], infos[q])
                    ],
                    "matches": [],
                    "verdicts": {"read": 0, "fallback": 0},
                    "scorer_tokens": {"read": 0, "generated": 0},
                    **chosen,
                }
            )
            if self.on_stage:
                self.on_stage(q, stage or kind, info["text"])
        return state, np.repeat(np.arange(b) * n + np.asarray(winners), n)

    def _tick(self, name: str, t0: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def _hint(self, batch: _Batch, q: int, kind: str) -> str:
        stages = batch.stages[q]
        if kind == "reasoning":
            return stages.get("CAPTION", "")
        if kind == "conclusion":
            return (stages.get("CAPTION", "") + "\n" + stages.get("REASONING", "")).strip()
        if kind == "sentence":
            return batch.accepted[q].strip()
        return ""

    def _screen(self, batch: _Batch, groups, pairs: Sequence[tuple[int, int]]) -> list[tuple[str, bool | None]]:
        """Reasoning screen of candidates (question, index), text only, in one batch: (reply, verdict) each."""
        hints = {q: self._hint(batch, q, "reasoning") for q, _ in pairs}
        texts = [self.prompts.screen_text(batch.questions[q], groups[q][j].text, hints[q]) for q, j in pairs]
        prefixes = {q: self.prompts.screen_prefix(batch.questions[q], hints[q]) for q in hints}
        replies = self._ask_judges(texts, [q for q, _ in pairs], prefixes, batch, with_image=False, kind="screen")
        return [(reply, self.prompts.parse_screen(reply)) for reply in replies]

    def _judge(self, batch: _Batch, step: scorer_lib.StepCandidates, matches: Sequence[judge_lib.Match]):
        texts, owners, prefixes = [], [], {}
        kind, groups, live = step.kind, step.groups, step.live
        for m in matches:
            q = live[m.group]
            a, c = groups[q][m.first], groups[q][m.second]
            hint = self._hint(batch, q, kind)
            texts.append(self.prompts.compare_text(kind, batch.questions[q], a.text, c.text, hint))
            owners.append(q)
            prefixes[q] = self.prompts.compare_prefix(kind, batch.questions[q], hint)
        return self._ask_judges(
            texts,
            owners,
            prefixes,
            batch,
            with_image=self.prompts.compare_with_image,
            kind=kind,
            stops=self.prompts.verdict_phrases,
        )

    def _ask_judges(self, texts, owners, prefixes, batch: _Batch, with_image: bool, kind: str, stops=()) -> list[str]:
        if not texts:  # every question in the batch has already ended (e.g. its last winner emitted EOS)
            return []
        if self._judge_override is not None:  # a scripted judge (tests) sees the same prompt texts
            replies = list(self._judge_override(list(texts), kind))
            if len(replies) != len(texts):
                raise RuntimeError(f"judge_fn returned {len(replies)} replies for {len(texts)} prompts")
        else:
            replies = self._run_judges(texts, owners, prefixes, batch, with_image, kind, stops)
        count = lambda text: len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        for text, reply, q in zip(texts, replies, owners):  # the judge's cost, counted as a search's tokens
            tally = self._judge_tokens.setdefault(q, {"read": 0, "generated": 0})
            tally["read"] += count(text)
            tally["generated"] += count(reply)
        return replies

    def _run_judges(
        self,
        texts: Sequence[str],
        owners: Sequence[int],
        prefixes: dict,
        batch: _Batch,
        with_image: bool,
        kind: str,
        stops: Sequence[str] = (),
    ) -> list[str]:
        """The model's replies to judge prompts, in one batched call (`judge_runner.JudgeRunner.run`)."""
        key = jax.random.key(int(self._rng.integers(2**31)))
        budget = 1 if self._warming_up else self.config.judge_max_new_tokens
        replies = batch.judges.run(
            texts, owners, prefixes, with_image=with_image, kind=kind, key=key, budget=budget, stops=stops
        )
        self.syncs += 1
        return replies


def total_budget(config: SearchConfig) -> int:
    """Tokens a search may add to a question's prompt (every stage's budget, or the whole answer's)."""
    if config.method in ("stage", "swires"):
        return len(chat.STAGES) * config.stage_max_new_tokens
    return config.max_new_tokens


def search_shapes(
    config: SearchConfig,
    prompts: judge_lib.JudgePrompts,
    processor,
    prompt_bucket: int,
    question_tokens: int,
    n: int,
    max_images: int,
) -> SearchShapes:
    """Bounds on every length a search can produce (see `SearchShapes`), from the prompt bucket, the longest
    question's token count rounded up to a judge bucket step, and the generation budgets."""
    cfg = config
    stage = cfg.stage_max_new_tokens
    # judged kind -> (longest hint, longest response) in tokens
    compared = {
        "stage": {
            "summary": (0, stage),
            "caption": (0, stage),
            "reasoning": (stage, stage),
            "conclusion": (2 * stage + 1, stage),
        },
        "best_of_n": {"answer": (0, cfg.max_new_tokens)},
        "sentence": {"sentence": (cfg.max_new_tokens, cfg.sentence_max_new_tokens)},
    }.get(cfg.method, {})
    screened = (stage, stage) if cfg.method == "stage" else None  # the screen shows the caption and one reasoning
    judge = judge_runner_lib.judge_shapes(
        prompts,
        processor,
        compared,
        screened,
        question_tokens=question_tokens,
        num_candidates=n,
        max_images=max_images,
        bucket_step=cfg.judge_bucket_step,
        max_new_tokens=cfg.judge_max_new_tokens,
        cache_step=CACHE_STEP,
        bos=cfg.bos,
    )
    candidates = sampler_lib.bucket_length(prompt_bucket + total_budget(config), step=CACHE_STEP)
    return SearchShapes(prompt_bucket, candidates, judge)
