"""The worker that owns the model: requests wait in one queue, and a single thread takes them in batches and runs
each batch as one `Searcher` call.

Batching is batch-at-a-time, not continuous. The worker takes the oldest waiting request; when the last batch held
more than one request it waits up to `serve.batch_window_ms` for more with the same settings (method, sampling,
budgets, seed when given, the number of images); it takes up to `serve.max_batch` questions of them (a request
with `n` choices is `n` questions) and runs them to the end together; requests that arrive meanwhile wait for the
next batch. A batch is padded to the next power of two (copies of its last question, whose answers are dropped)
so that a handful of compiled programs serve every batch size. Searches (`search.method` stage, best_of_n,
sentence) share the queue and the worker with plain requests: there is one model and one device, and a search is
itself a batched program over questions x candidates, so searches of equal settings batch together like plain
requests do.

Why not continuous: the sampler's decode is one `lax.while_loop` per call over a fixed set of rows, with one
shared cache cursor (sampler.py), so rows cannot join or leave between steps. Continuous batching would need a
decode program that runs a few steps at a time over fixed slots with a cursor per row, a prefill that writes a new
request into a free slot of the running cache, and a scheduler between those calls (docs/serving.md).

Requests without a seed run with a seed the engine draws per batch (returned in the response's `search.seed`);
with a seed, the answer of a request that runs alone equals `Searcher.ask` with that seed. Rows of one batch draw
different tokens, so `n` choices differ.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import random
import threading
import time

import numpy as np

from llava_cot_jax.generate import judge_runner, stage_search
from llava_cot_jax.serve import protocol

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Outcome:
    """What a request gets back: a SearchResult per choice, the seed that ran and the prompt's token count."""

    results: list[stage_search.SearchResult]
    seed: int
    prompt_tokens: int


@dataclasses.dataclass
class _Ticket:
    job: protocol.Job
    key: tuple
    future: concurrent.futures.Future


def padded_size(rows: int, max_batch: int) -> int:
    """The batch size `rows` questions run at: the next power of two, at most max_batch."""
    return min(1 << max(0, rows - 1).bit_length(), max(max_batch, rows))


def batch_sizes(max_batch: int) -> list[int]:
    """Every size `padded_size` gives (what a warmup compiles)."""
    return sorted({padded_size(rows, max_batch) for rows in range(1, max_batch + 1)})


class Engine:
    """Admits requests (`submit`), batches and runs them on one worker thread, and drains on `close`."""

    def __init__(
        self,
        searcher: stage_search.Searcher,
        max_batch: int,
        window_s: float,
        max_queue: int,
        stream_interval_s: float = 0.0,
    ):
        self.searcher = searcher
        self.stream_interval_s = stream_interval_s
        self.max_batch, self.window_s, self.max_queue = max_batch, window_s, max_queue
        self._cond = threading.Condition()
        self._waiting: list[_Ticket] = []
        self._admitted = 0  # waiting or running
        self._closed = False
        self._seeds = random.Random()
        self._last_batch = 0  # requests in the last batch taken
        self._thread = threading.Thread(target=self._loop, name="serve-engine", daemon=True)
        self.stats = {"requests": 0, "batches": 0, "questions": 0, "padded": 0, "busy_s": 0.0}

    def start(self) -> Engine:
        self._thread.start()
        return self

    @property
    def admitted(self) -> int:
        with self._cond:
            return self._admitted

    def submit(self, job: protocol.Job) -> concurrent.futures.Future:
        """Queues a job; its future's result is an `Outcome`. Raises APIError 429 when `max_queue` requests are
        already admitted, 503 once the engine is closing."""
        ticket = _Ticket(job, job.batch_key(), concurrent.futures.Future())
        with self._cond:
            if self._closed:
                raise protocol.APIError("the server is shutting down", None, "shutting_down", 503)
            if self._admitted >= self.max_queue:
                raise protocol.APIError(
                    f"too many requests: {self._admitted} are queued or running (serve.max_queue); retry later",
                    None,
                    "queue_full",
                    429,
                )
            self._admitted += 1
            self.stats["requests"] += 1
            self._waiting.append(ticket)
            self._cond.notify_all()
        return ticket.future

    def close(self, timeout: float | None = None) -> None:
        """Stops admitting; the worker finishes every admitted request, then exits."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- worker ------------------------------------------------------------------------------------------------

    def _take(self) -> list[_Ticket] | None:
        """The next batch: the oldest waiting request and the ones of its settings, within the window."""
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if not self._waiting:
                return None  # closed and drained
            key = self._waiting[0].key
            # The window is waited only under concurrency (the last batch held more than one request): a lone
            # client gets no added latency, and concurrent clients, whose requests return together, rejoin.
            deadline = time.monotonic() + (self.window_s if self._last_batch > 1 else 0.0)
            while not self._closed:
                rows = sum(t.job.n for t in self._waiting if t.key == key)
                left = deadline - time.monotonic()
                if rows >= self.max_batch or left <= 0:
                    break
                self._cond.wait(left)
            taken, rows = [], 0
            for ticket in list(self._waiting):
                if ticket.key == key and rows + ticket.job.n <= self.max_batch:
                    taken.append(ticket)
                    rows += ticket.job.n
                    self._waiting.remove(ticket)
            self._last_batch = len(taken)
            return taken

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._run(batch)
            except Exception as err:  # every request of the batch learns of it; the worker goes on
                log.exception("batch failed")
                for ticket in batch:
                    if not ticket.future.done():
                        ticket.future.set_exception(err)
            finally:
                with self._cond:
                    self._admitted -= len(batch)

    def _run(self, batch: list[_Ticket]) -> None:
        start = time.perf_counter()
        first = batch[0].job
        seed = first.settings.seed if first.explicit_seed else self._seeds.randrange(2**31)
        settings = dataclasses.replace(first.settings, seed=seed)
        owners = [(ticket, c) for ticket in batch for c in range(ticket.job.n)]
        size = padded_size(len(owners), self.max_batch)
        rows = owners + [owners[-1]] * (size - len(owners))
        prompts = [ticket.job.prompt for ticket, _ in rows]
        questions = [ticket.job.question for ticket, _ in rows]
        images = [ticket.job.images for ticket, _ in rows] if first.images else None

        searcher = self.searcher
        inputs = searcher.processor(images=images, text=prompts, padding=True, bos=settings.bos)
        on_token, on_stage = self._streams(owners, settings)
        searcher.config, searcher.on_token, searcher.on_stage = settings, on_token, on_stage
        try:
            results = searcher(inputs, questions)
        finally:
            searcher.on_token = searcher.on_stage = None
        prompt_tokens = np.asarray(inputs["attention_mask"]).sum(axis=1)
        row = 0
        for ticket in batch:
            n = ticket.job.n
            ticket.future.set_result(Outcome(results[row : row + n], seed, int(prompt_tokens[row])))
            row += n
        self.stats["batches"] += 1
        self.stats["questions"] += len(owners)
        self.stats["padded"] += size - len(owners)
        self.stats["busy_s"] += time.perf_counter() - start

    def _streams(self, owners, settings):
        """Callbacks that send each streaming row's text as it comes: tokens (one-answer methods) or accepted steps
        (searches: each stage, sentence or answer once the judge has kept it). None when nobody streams."""
        streaming = {r: (ticket.job, c) for r, (ticket, c) in enumerate(owners) if ticket.job.stream}
        if not streaming:
            return None, None
        tokenizer = self.searcher.tokenizer
        if settings.method in ("greedy", "sample"):
            tokens = {r: [] for r in streaming}
            last = [0.0]

            def on_token(step_tokens, active):
                # Runs inside the decode loop (a host callback), so it is kept cheap: the text is re-decoded (the
                # whole row, so that it equals the final text) at most once per stream interval; the answer's end
                # is sent from the result.
                for r in streaming:
                    if active[r]:
                        tokens[r].append(int(step_tokens[r]))
                now = time.perf_counter()
                if now - last[0] < self.stream_interval_s:
                    return
                last[0] = now
                for r, (job, c) in streaming.items():
                    if active[r]:
                        job.on_text(c, judge_runner.decode_text(tokenizer, np.asarray(tokens[r])))

            return on_token, None
        accepted = {r: "" for r in streaming}

        def on_stage(q, _stage, text):
            if q in streaming:
                job, c = streaming[q]
                accepted[q] += text
                job.on_text(c, accepted[q])

        return None, on_stage
