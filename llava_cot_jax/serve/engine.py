"""The worker side of the server: requests are admitted here (`Engine.submit`) and run on one of two paths.

Plain requests (method greedy or sample, at most one image, a prompt within `serve.slot_prompt_tokens`) run in a
continuous batch (`slots.Scheduler`): `serve.max_batch` slots decoded together `serve.decode_steps` tokens at a
time, with a cache cursor per slot; a request joins free slots between those steps (its prompt prefilled alone and
copied in) and leaves as soon as its answer ends, so a short answer never waits for a long one, and a client that
goes away frees its slots at the next step.

Searches (`search.method` stage, best_of_n, sentence), and plain requests with several images or a longer prompt,
run batch-at-a-time on a second worker thread, as `Searcher` calls. Searches stay off the continuous batch because
a search is not one stream of tokens: each stage (or sentence) ends at a tournament on the host, in which judge
prompts are prefilled and decoded against the question's cache and the winner's row is copied into its losers'
rows, before the next stage's N candidates continue it. Fitting that into shared slots would need the judge calls
and the row copies as slot operations too; on the batch path they are the Searcher's own, tested code. The two
threads share the model; their programs interleave on the device.

The batch worker takes the oldest waiting request; when the last batch held more than one request it waits up to
`serve.batch_window_ms` for more with the same settings (method, sampling, budgets, seed when given, the number of
images); it takes up to `serve.max_batch` questions of them (a request with `n` choices is `n` questions) and runs
them to the end together. A batch is padded to the next power of two (copies of its last question, whose answers
are dropped) so that a handful of compiled programs serve every batch size.

Requests without a seed run with one the engine draws (returned in the response's `search.seed`); with a seed, the
answer of a plain request equals `Searcher.ask` with that seed, whoever shares the batch (each slot samples with
its own key), and so does a search that runs alone.
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
from llava_cot_jax.serve import protocol, slots

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
    future: concurrent.futures.Future  # cancelled by the server when the client goes away
    seed: int = 0  # the request's, or one drawn for it
    prompt_tokens: int = 0


def padded_size(rows: int, max_batch: int) -> int:
    """The batch size `rows` questions run at: the next power of two, at most max_batch."""
    return min(1 << max(0, rows - 1).bit_length(), max(max_batch, rows))


def batch_sizes(max_batch: int) -> list[int]:
    """Every size `padded_size` gives (what a warmup compiles)."""
    return sorted({padded_size(rows, max_batch) for rows in range(1, max_batch + 1)})


class Engine:
    """Admits requests (`submit`), runs plain ones in the continuous batch and the others batch-at-a-time (module
    docstring), and drains on `close`. `continuous`: the `slots.Scheduler` settings (num_slots, steps,
    slot_prompt_tokens, max_new_tokens), or None to run everything batch-at-a-time."""

    def __init__(
        self,
        searcher: stage_search.Searcher,
        max_batch: int,
        window_s: float,
        max_queue: int,
        stream_interval_s: float = 0.0,
        continuous: dict | None = None,
    ):
        self.searcher = searcher
        self.stream_interval_s = stream_interval_s
        self.max_batch, self.window_s, self.max_queue = max_batch, window_s, max_queue
        self._cond = threading.Condition()
        self._waiting: list[_Ticket] = []
        self._admitted = 0  # waiting or running
        self._closed = False  # admitting no more
        self._stopping = False  # the batch worker exits once nothing waits
        self._seeds = random.Random()
        self._last_batch = 0  # requests in the last batch taken
        self._thread = threading.Thread(target=self._loop, name="serve-engine", daemon=True)
        self.stats = {"requests": 0, "batches": 0, "questions": 0, "padded": 0, "busy_s": 0.0}
        self.continuous = None
        if continuous:
            self.continuous = slots.Scheduler(
                searcher, **continuous, answer=self._answer, release=self._release, fallback=self._queue
            )
            self.stats["continuous"] = self.continuous.stats

    def start(self) -> Engine:
        self._thread.start()
        if self.continuous:
            self.continuous.start()
        return self

    @staticmethod
    def _answer(ticket: _Ticket, results: list) -> None:
        ticket.future.set_result(Outcome(results, ticket.seed, ticket.prompt_tokens))

    def _release(self, _ticket) -> None:
        with self._cond:
            self._admitted -= 1

    def _queue(self, ticket: _Ticket) -> None:
        with self._cond:
            self._waiting.append(ticket)
            self._cond.notify_all()

    @property
    def admitted(self) -> int:
        with self._cond:
            return self._admitted

    def submit(self, job: protocol.Job) -> concurrent.futures.Future:
        """Queues a job; its future's result is an `Outcome`. Raises APIError 429 when `max_queue` requests are
        already admitted, 503 once the engine is closing."""
        seed = job.settings.seed if job.explicit_seed else self._seeds.randrange(2**31)
        ticket = _Ticket(job, job.batch_key(), concurrent.futures.Future(), seed)
        continuous = self.continuous is not None and self.continuous.accepts(job)
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
            if continuous:  # under the lock: a close cannot come between the check above and this
                self.continuous.submit(ticket)
            else:
                self._waiting.append(ticket)
                self._cond.notify_all()
        return ticket.future

    def close(self, timeout: float | None = None) -> None:
        """Stops admitting; the workers finish every admitted request, then exit."""
        with self._cond:
            self._closed = True
        if self.continuous:  # first: it may still hand a long prompt to the batch worker
            self.continuous.close(timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- worker ------------------------------------------------------------------------------------------------

    def _take(self) -> list[_Ticket] | None:
        """The next batch: the oldest waiting request and the ones of its settings, within the window."""
        with self._cond:
            while not self._waiting and not self._stopping:
                self._cond.wait()
            if not self._waiting:
                return None  # closed and drained
            key = self._waiting[0].key
            # The window is waited only under concurrency (the last batch held more than one request): a lone
            # client gets no added latency, and concurrent clients, whose requests return together, rejoin.
            deadline = time.monotonic() + (self.window_s if self._last_batch > 1 else 0.0)
            while not self._stopping:
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
            if not ticket.future.cancelled():  # the client went away (a batch runs to its end regardless)
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
