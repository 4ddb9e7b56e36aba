"""Continuous batching for one-answer requests (`greedy`, `sample`): a fixed number of slots decoded together, a few
steps at a time, with requests joining free slots and leaving finished ones between those steps.

The running batch (`Slots`) is one decode state of `num_slots` rows in which every row has its own cache cursor,
position, budget, sampling settings, PRNG key and stop-string window, and its own image K/V (one image at most;
zeros for a text-only row, which makes the cross-attention layers add exactly nothing, as skipping them does).
Two compiled programs act on it, each donating it:

- `insert`: a newcomer's prompt, prefilled alone by the sampler's own `prefill` into a cache of the slot length,
  is copied into a free row, with its image K/V;
- `advance`: up to `steps` decode steps over every row (free and finished rows take no part), returning the
  tokens each row drew.

A `Scheduler` thread runs between those calls: it retires finished rows and rows whose client went away (the
request's future cancelled), admits waiting requests into free rows (a request with `n` choices takes `n` rows
at once), runs `advance` and sends each streaming row its text. Every row samples with its own key, so what a
request draws does not depend on who shares the batch: with a seed, choice 0 draws what `Searcher.ask` draws
alone (token i from `fold_in(key(seed), i)`), and choice c > 0 from `fold_in(key(seed), c)`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
from flax import nnx

from llava_cot_jax.data import chat
from llava_cot_jax.generate import judge_runner, stage_search
from llava_cot_jax.generate import sampler as sampler_lib
from llava_cot_jax.generate import stop as stop_lib

log = logging.getLogger(__name__)

GREEDY, SAMPLE, NUCLEUS = 0, 1, 2  # how a row picks its token: argmax, top-k sampling, top-k then top-p


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Slots:
    """The running batch. `state.cursor` is [B] (a cursor per row); `cross_kv` holds each row's image K/V."""

    state: sampler_lib.DecodeState
    cross_kv: dict
    keys: jax.Array  # [B, 2] uint32: each row's PRNG key data
    steps: jax.Array  # [B] tokens drawn so far (token i is drawn with fold_in(key, i))
    budget: jax.Array  # [B] at most this many tokens
    mode: jax.Array  # [B] GREEDY / SAMPLE / NUCLEUS
    values: jax.Array  # [B, 2] temperature, top_p
    done: jax.Array  # [B] finished, or a free slot
    finish: jax.Array  # [B] sampler.FINISH_*
    logprob_sum: jax.Array  # [B] as DecodeOutput.logprob_sum
    window: jax.Array  # [B, H] stop-string windows (stop.init_window)
    filled: jax.Array  # [B]


def _row_token(logits, key, values, mode, top_k: int):
    """One row's next token, drawn exactly as the sampler draws it for a batch of one with these settings."""
    row = logits[None]
    greedy = jnp.argmax(logits).astype(jnp.int32)
    plain = sampler_lib.sample_tokens(row, key, (True, top_k, False), values)[0]
    nucleus = sampler_lib.sample_tokens(row, key, (True, top_k, True), values)[0]
    return jnp.select([mode == GREEDY, mode == SAMPLE], [greedy, plain], nucleus)


def _map_rows(fn, *trees: Slots) -> Slots:
    """fn(row axis, *leaves) over the arrays of one or more `Slots` (caches and image K/V keep their rows 4 axes from
    the end, every other array first)."""
    kv = lambda *ts: jax.tree.map(lambda *xs: fn(xs[0].ndim - 4, *xs), *ts)
    field = lambda objs, name: fn(0, *(getattr(o, name) for o in objs))
    states = [t.state for t in trees]
    state_fields = ("key_valid", "cursor", "positions", "logits", "xmask")
    state = sampler_lib.DecodeState(
        cache=kv(*(st.cache for st in states)), **{name: field(states, name) for name in state_fields}
    )
    others = [f.name for f in dataclasses.fields(Slots) if f.name not in ("state", "cross_kv")]
    return Slots(
        state=state, cross_kv=kv(*(t.cross_kv for t in trees)), **{name: field(trees, name) for name in others}
    )


@functools.partial(
    jax.jit, static_argnames=("graphdef", "steps", "top_k", "pad_id", "width"), donate_argnames=("slots",)
)
def advance(graphdef, params, slots: Slots, stop_table, eos_ids, *, steps: int, top_k: int, pad_id: int, width: int):
    """Up to `steps` decode steps of the live rows among the first `width` (the others are free: the scheduler fills
    rows from the first); returns (slots, tokens [width, steps], pad where a row drew none). Stops early when no row
    is live. A row ends as the sampler's rows do: at an EOS id (not written), at a stop string (written) or at its
    budget. `width` (a power of two) keeps a lightly loaded batch from computing every free slot."""
    part = _map_rows(lambda axis, x: jax.lax.slice_in_dim(x, 0, width, axis=axis), slots)
    part, tokens = _advance(nnx.merge(graphdef, params), part, stop_table, eos_ids, steps, top_k, pad_id)
    put = lambda axis, whole, rows: jax.lax.dynamic_update_slice_in_dim(whole, rows, 0, axis)
    return _map_rows(put, slots, part), tokens


def _advance(model, slots: Slots, stop_table, eos_ids, steps: int, top_k: int, pad_id: int):
    b = slots.steps.shape[0]
    rows = jnp.arange(b)
    xmask = slots.state.xmask

    def body(carry):
        i, s, tokens = carry
        st = s.state
        keys = jax.vmap(lambda data, n: jax.random.fold_in(jax.random.wrap_key_data(data), n))(s.keys, s.steps)
        token = jax.vmap(functools.partial(_row_token, top_k=top_k))(st.logits, keys, s.values, s.mode)
        token = jnp.where(s.done, pad_id, token)
        is_eos = jnp.any(token[:, None] == eos_ids[None, :], axis=-1) & ~s.done
        window, filled, hit = stop_lib.step(stop_table, s.window, s.filled, token)
        hit_any = jnp.any(hit, axis=-1) & ~s.done & ~is_eos
        last = (s.steps + 1 >= s.budget) & ~s.done & ~is_eos & ~hit_any
        finish = jnp.where(
            is_eos,
            sampler_lib.FINISH_EOS,
            jnp.where(hit_any, sampler_lib.FINISH_STOP, jnp.where(last, sampler_lib.FINISH_BUDGET, s.finish)),
        )
        done = s.done | is_eos | hit_any | last
        write = ~s.done & ~is_eos  # EOS ends a row without entering its context
        logp = jax.nn.log_softmax(st.logits, axis=-1)
        logprob = jnp.where(write, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0], 0.0)

        def run_model(st):
            # Rows that do not write still run (fixed shapes); their slot at the cursor is marked empty.
            key_valid = st.key_valid.at[rows, st.cursor].set(write)
            logits, cache = model.forward_cached(
                token[:, None], st.positions[:, None], st.cache, st.cursor, key_valid, s.cross_kv, xmask
            )
            return sampler_lib.DecodeState(
                cache=cache,
                key_valid=key_valid,
                cursor=st.cursor + write.astype(jnp.int32),
                positions=st.positions + write.astype(jnp.int32),
                logits=jnp.where(write[:, None], logits[:, 0], st.logits),
                xmask=st.xmask,
            )

        st = jax.lax.cond(jnp.any(~done), run_model, lambda st: st, st)
        s = dataclasses.replace(
            s,
            state=st,
            steps=s.steps + (~s.done).astype(jnp.int32),
            done=done,
            finish=finish,
            logprob_sum=s.logprob_sum + logprob,
            window=window,
            filled=filled,
        )
        return i + 1, s, tokens.at[:, i].set(token)

    cond = lambda carry: (carry[0] < steps) & ~jnp.all(carry[1].done)
    tokens = jnp.full((b, steps), pad_id, jnp.int32)
    _, slots, tokens = jax.lax.while_loop(cond, body, (jnp.int32(0), slots, tokens))
    return slots, tokens


@functools.partial(jax.jit, donate_argnames=("slots",))
def insert(slots: Slots, row, state: sampler_lib.DecodeState, cross_kv, keys, budget, mode, values) -> Slots:
    """Row `row` of `slots` becomes the one-row prefilled `state` (cursor: its prompt bucket) with `cross_kv` (None:
    no image, zeros), its key data [2], budget, mode and [temperature, top_p]."""
    put = lambda whole, part, axis=0: jax.lax.dynamic_update_index_in_dim(whole, part.astype(whole.dtype), row, axis)
    put_kv = lambda whole, part: jax.tree.map(lambda w, p: put(w, p[..., 0, :, :, :], w.ndim - 4), whole, part)
    if cross_kv is None:
        cross = jax.tree.map(
            lambda w: put(w, jnp.zeros(w.shape[:-4] + w.shape[-3:], w.dtype), w.ndim - 4), slots.cross_kv
        )
        xmask = jnp.zeros(slots.state.xmask.shape[1:], slots.state.xmask.dtype)
    else:
        cross, xmask = put_kv(slots.cross_kv, cross_kv), state.xmask[0]
    old = slots.state
    new = sampler_lib.DecodeState(
        cache=put_kv(old.cache, state.cache),
        key_valid=put(old.key_valid, state.key_valid[0]),
        cursor=put(old.cursor, state.cursor),
        positions=put(old.positions, state.positions[0]),
        logits=put(old.logits, state.logits[0]),
        xmask=put(old.xmask, xmask),
    )
    zero = lambda x: put(x, jnp.zeros(x.shape[1:], x.dtype))
    return Slots(
        state=new,
        cross_kv=cross,
        keys=put(slots.keys, keys),
        steps=zero(slots.steps),
        budget=put(slots.budget, budget),
        mode=put(slots.mode, mode),
        values=put(slots.values, values),
        done=put(slots.done, jnp.bool_(False)),
        finish=zero(slots.finish),
        logprob_sum=zero(slots.logprob_sum),
        window=zero(slots.window),
        filled=zero(slots.filled),
    )


def empty_slots(sampler: sampler_lib.Sampler, num_slots: int, slot_len: int, stop_table) -> Slots:
    """Every row free: no valid cache slot, done, zero image K/V for one image of the model's largest tiling."""
    model, vision = sampler.model, sampler.model.config.vision
    pixels = jax.ShapeDtypeStruct(
        (num_slots, 1, vision.max_num_tiles, 3, vision.image_size, vision.image_size), jnp.float32
    )
    ratio_ids = jax.ShapeDtypeStruct((num_slots, 1), jnp.int32)
    ratio_mask = jax.ShapeDtypeStruct((num_slots, 1, vision.max_num_tiles), jnp.int32)
    shapes = jax.eval_shape(
        functools.partial(sampler_lib.encode, sampler.graphdef), sampler.params, pixels, ratio_ids, ratio_mask
    )
    window, filled = stop_lib.init_window(num_slots, stop_table)
    vocab = model.config.text.vocab_size
    return Slots(
        state=sampler_lib.DecodeState(
            cache=model.init_cache(num_slots, slot_len),
            key_valid=jnp.zeros((num_slots, slot_len), bool),
            cursor=jnp.zeros((num_slots,), jnp.int32),
            positions=jnp.zeros((num_slots,), jnp.int32),
            logits=jnp.zeros((num_slots, vocab), jnp.float32),
            xmask=jnp.zeros((num_slots, 1, 1, vision.max_num_tiles), jnp.int32),
        ),
        cross_kv=jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes),
        keys=jnp.zeros((num_slots, 2), jnp.uint32),
        steps=jnp.zeros((num_slots,), jnp.int32),
        budget=jnp.zeros((num_slots,), jnp.int32),
        mode=jnp.zeros((num_slots,), jnp.int32),
        values=jnp.ones((num_slots, 2), jnp.float32),
        done=jnp.ones((num_slots,), bool),
        finish=jnp.zeros((num_slots,), jnp.int32),
        logprob_sum=jnp.zeros((num_slots,), jnp.float32),
        window=window,
        filled=filled,
    )


def answer_result(
    question: str, text: str, finish: int, num_tokens: int, logprob_sum: float
) -> stage_search.SearchResult:
    """The SearchResult `Searcher` returns for a one-answer method: one step, the whole answer, one candidate."""
    written = num_tokens - (finish == sampler_lib.FINISH_EOS)
    candidate = {
        "text": text,
        "finish": sampler_lib.FINISH_NAMES[finish],
        "num_tokens": num_tokens,
        "shown_to_judge": text.strip(),
        "closed": finish == sampler_lib.FINISH_STOP,
        "mean_logprob": logprob_sum / max(written, 1),
        "screen": None,
    }
    step = {
        "step": "answer",
        "winner": 0,
        "candidates": [candidate],
        "matches": [],
        "verdicts": {"read": 0, "fallback": 0},
        "scorer_tokens": {"read": 0, "generated": 0},
    }
    stages = chat.split_stages(text)
    conclusion = stages["CONCLUSION"] if "CONCLUSION" in stages else chat.extract_conclusion(text)
    return stage_search.SearchResult(question, text, stages, conclusion, [step], 0, {"read": 0, "fallback": 0})


@dataclasses.dataclass
class _Row:
    """A slot's occupant: choice `choice` of `ticket`'s request, and the tokens it has drawn."""

    ticket: object  # engine._Ticket
    choice: int
    tokens: list = dataclasses.field(default_factory=list)


class Scheduler:
    """Runs one-answer requests in a continuous batch of `num_slots` rows on its own thread (module docstring).

    `submit(ticket)` queues an engine ticket whose job `accepts` (greedy or sample, at most one image; the engine
    runs the others batch-at-a-time); `answer(ticket, results)` sets its future's result (a SearchResult per
    choice), `release(ticket)` is called once per ticket when it is answered, failed or cancelled, and
    `fallback(ticket)` hands a prompt too long for a slot to the batch-at-a-time path."""

    def __init__(
        self,
        searcher,
        num_slots: int,
        steps: int,
        slot_prompt_tokens: int,
        max_new_tokens: int,
        *,
        answer,
        release,
        fallback,
    ):
        self.sampler = searcher.sampler
        # Own copies: the batch worker pads with its processor, and a fast tokenizer's state is not shared safely.
        self.processor = copy.deepcopy(searcher.processor)
        self.tokenizer = self.processor.tokenizer
        self.num_slots, self.steps = num_slots, steps
        self.answer, self.release, self.fallback = answer, release, fallback
        self.prompt_len = sampler_lib.bucket_length(slot_prompt_tokens, minimum=stage_search.MIN_PROMPT_BUCKET)
        self.slot_len = sampler_lib.bucket_length(self.prompt_len + max_new_tokens, step=stage_search.CACHE_STEP)
        self.stop_table = self.sampler.stop_table((chat.close_tag("CONCLUSION"),))  # as Searcher's one-answer step
        self.eos_ids = self.sampler.eos_array(self.sampler.eos_token_ids)
        self.top_k = searcher.config.top_k
        self.slots = empty_slots(self.sampler, num_slots, self.slot_len, self.stop_table)
        self.rows: list[_Row | None] = [None] * num_slots
        self._left: dict[int, int] = {}  # id(ticket) -> choices still decoding
        self._results: dict[int, list] = {}
        self._cond = threading.Condition()
        self._waiting: list = []
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="serve-slots", daemon=True)
        self.stats = {"requests": 0, "chunks": 0, "joined_mid_decode": 0, "cancelled": 0, "busy_slots": 0}

    @staticmethod
    def accepts(job) -> bool:
        return job.settings.method in ("greedy", "sample") and len(job.images) <= 1

    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def submit(self, ticket) -> None:
        with self._cond:
            self._waiting.append(ticket)
            self.stats["requests"] += 1
            self._cond.notify_all()

    def close(self, timeout: float | None = None) -> None:
        """Stops taking work once every queued and running request is answered."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def warmup(self) -> float:
        """Compiles what a one-image request of a prompt in the first bucket runs (prefill, insert, advance at every
        width)."""
        start = time.perf_counter()
        vision = self.sampler.model.config.vision
        image = np.full((vision.image_size, vision.image_size, 3), 128, np.uint8)
        prompt = self.processor.render_prompt(chat.user_turn("warm", num_images=1))
        inputs = self.processor(images=[[PIL.Image.fromarray(image)]], text=[prompt], padding=True)
        self._insert(0, inputs, seed=0, choice=0, budget=1, mode=NUCLEUS, values=(1.0, 0.9))
        for width in sorted({min(1 << n.bit_length(), self.num_slots) for n in range(self.num_slots)}):
            self._advance(width)
        self.slots = dataclasses.replace(self.slots, done=jnp.ones((self.num_slots,), bool))
        jax.block_until_ready(self.slots)
        return time.perf_counter() - start

    # -- the thread --------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not any(self.rows) and not self._closed:
                    self._cond.wait()
                if self._closed and not self._waiting and not any(self.rows):
                    return
                newcomers, dropped = self._admit()
            for ticket in dropped:  # outside the lock: release takes the engine's
                self.release(ticket)
            self._retire_cancelled()
            live = any(self.rows)
            for ticket in newcomers:
                try:
                    self._start(ticket, joined_running=live)
                except Exception as err:  # that request learns of it; the others go on
                    log.exception("prefill failed")
                    self._drop([ticket], err)
            if any(self.rows):
                try:
                    self._step()
                except Exception as err:  # every request in the batch learns of it; the thread goes on
                    log.exception("continuous batch failed")
                    tickets = [row.ticket for row in self.rows if row]
                    self.rows = [None] * self.num_slots  # the batch was donated to the failed call: start afresh
                    self.slots = empty_slots(self.sampler, self.num_slots, self.slot_len, self.stop_table)
                    self._drop(tickets, err)

    def _admit(self) -> tuple[list, list]:
        """(waiting tickets that fit the free rows now, oldest first: a request needs a row per choice; cancelled
        waiting tickets, dropped)."""
        free = self.rows.count(None)
        taken, dropped = [], []
        for ticket in list(self._waiting):
            if ticket.future.cancelled():
                self._waiting.remove(ticket)
                self.stats["cancelled"] += 1
                dropped.append(ticket)
            elif ticket.job.n <= free:
                self._waiting.remove(ticket)
                taken.append(ticket)
                free -= ticket.job.n
            else:
                break  # first come, first served: a wide request is not overtaken
        return taken, dropped

    def _start(self, ticket, joined_running: bool) -> None:
        """Prefills a request once and copies it into a free row per choice; a prompt longer than a slot's prompt
        part goes to the batch-at-a-time path (`fallback`)."""
        job = ticket.job
        settings = job.settings
        images = [job.images] if job.images else None
        inputs = self.processor(images=images, text=[job.prompt], padding=True, bos=settings.bos)
        if sampler_lib.bucket_length(np.shape(inputs["input_ids"])[1], minimum=stage_search.MIN_PROMPT_BUCKET) > (
            self.prompt_len
        ):
            self.fallback(ticket)
            return
        mode = GREEDY if settings.method == "greedy" else (NUCLEUS if settings.top_p < 1.0 else SAMPLE)
        free = [r for r, row in enumerate(self.rows) if row is None][: job.n]
        ticket.prompt_tokens = int(np.asarray(inputs["attention_mask"]).sum())
        self._left[id(ticket)] = job.n
        self._results[id(ticket)] = [None] * job.n
        prefilled = None
        for choice, r in enumerate(free):
            self.rows[r] = _Row(ticket, choice)  # before the insert: a failure frees it with the others
            prefilled = self._insert(
                r,
                inputs,
                seed=ticket.seed,
                choice=choice,
                budget=settings.max_new_tokens,
                mode=mode,
                values=(settings.temperature, settings.top_p),
                prefilled=prefilled,
            )
        self.stats["joined_mid_decode"] += joined_running

    def _insert(self, row, inputs, *, seed, choice, budget, mode, values, prefilled=None):
        """Prefills the prompt alone (or reuses `prefilled`) and copies it into `row`; returns (state, cross_kv)."""
        if prefilled is None:
            ids = np.asarray(inputs["input_ids"])
            mask = np.asarray(inputs.get("attention_mask", np.ones_like(ids)))
            bucket = sampler_lib.bucket_length(ids.shape[1], minimum=stage_search.MIN_PROMPT_BUCKET)
            images = inputs.get("pixel_values") is not None
            extra = [np.asarray(inputs["cross_attention_mask"])] if images else []
            ids, mask, _, extras = sampler_lib.left_align(ids, mask, bucket, self.sampler.pad_token_id, *extra)
            cross_kv = None
            if images:
                arrays = stage_search.question_image_arrays(inputs)
                cross_kv = self.sampler.encode_images(
                    inputs["pixel_values"], inputs["aspect_ratio_ids"], arrays["aspect_ratio_mask"]
                )
            state = self.sampler.prefill(ids, mask, cross_kv, extras[0] if images else None, cache_len=self.slot_len)
        else:
            state, cross_kv = prefilled
        key = jax.random.key(seed)
        key = key if choice == 0 else jax.random.fold_in(key, choice)
        budget = min(budget, self.slot_len - int(state.cursor))
        self.slots = insert(
            self.slots,
            np.int32(row),
            state,
            cross_kv,
            jax.random.key_data(key),
            np.int32(budget),
            np.int32(mode),
            np.asarray(values, np.float32),
        )
        return state, cross_kv

    def _advance(self, width: int | None = None) -> np.ndarray:
        with self.sampler.on_mesh():
            self.slots, tokens = advance(
                self.sampler.graphdef,
                self.sampler.params,
                self.slots,
                self.stop_table,
                self.eos_ids,
                steps=self.steps,
                top_k=self.top_k,
                pad_id=int(self.sampler.pad_token_id),
                width=width or self._width(),
            )
        return tokens

    def _width(self) -> int:
        """The rows `advance` computes: the next power of two past the last busy row (rows fill from the first)."""
        last = max((r for r, row in enumerate(self.rows) if row is not None), default=0)
        return min(1 << last.bit_length(), self.num_slots)

    def _step(self) -> None:
        before = np.asarray(self.slots.steps)
        tokens = np.asarray(self._advance())
        steps, done = np.asarray(self.slots.steps), np.asarray(self.slots.done)
        finish, logprob = np.asarray(self.slots.finish), np.asarray(self.slots.logprob_sum)
        self.stats["chunks"] += 1
        streamed = set()
        for r, row in enumerate(self.rows):
            if row is None:
                continue
            row.tokens.extend(tokens[r, : steps[r] - before[r]].tolist())
            job = row.ticket.job
            if done[r]:
                text = judge_runner.decode_text(self.tokenizer, np.asarray(row.tokens, np.int32))
                result = answer_result(job.question, text, int(finish[r]), len(row.tokens), float(logprob[r]))
                self._finish_row(r, result)
            elif job.stream and job.on_text and not row.ticket.future.cancelled():
                job.on_text(row.choice, judge_runner.decode_text(self.tokenizer, np.asarray(row.tokens, np.int32)))
                streamed.add(r)
        self.stats["busy_slots"] = sum(row is not None for row in self.rows)

    def _finish_row(self, r: int, result) -> None:
        row, self.rows[r] = self.rows[r], None
        ticket = row.ticket
        self._results[id(ticket)][row.choice] = result
        self._left[id(ticket)] -= 1
        if self._left[id(ticket)] == 0:
            results = self._results.pop(id(ticket))
            del self._left[id(ticket)]
            if not ticket.future.cancelled():
                self.answer(ticket, results)
            self.release(ticket)

    def _retire_cancelled(self) -> None:
        """Frees the rows of requests whose client went away (their future cancelled)."""
        cancelled = {id(row.ticket): row.ticket for row in self.rows if row and row.ticket.future.cancelled()}
        self.stats["cancelled"] += len(cancelled)
        self._drop(cancelled.values())

    def _drop(self, tickets, err: Exception | None = None) -> None:
        """Frees every row of `tickets`; with `err`, their futures fail with it."""
        tickets = {id(t): t for t in tickets}
        if not tickets:
            return
        freed = np.zeros(self.num_slots, bool)
        for r, row in enumerate(self.rows):
            if row and id(row.ticket) in tickets:
                self.rows[r], freed[r] = None, True
        self.slots = dataclasses.replace(self.slots, done=self.slots.done | freed)
        self.stats["busy_slots"] = sum(row is not None for row in self.rows)
        for key, ticket in tickets.items():
            self._left.pop(key, None)
            self._results.pop(key, None)
            if err is not None and not ticket.future.done():
                ticket.future.set_exception(err)
            self.release(ticket)
