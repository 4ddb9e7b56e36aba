"""`mode = "serve"`: the FastAPI routes over the engine, and `run(config, workdir)`, the entry point main.py calls.

    POST /v1/chat/completions   OpenAI's chat completions (stream: server-sent events ending `data: [DONE]`)
    GET  /v1/models             the one model served
    GET  /health                liveness and the number of requests admitted
    GET  /                      a page to ask about an image and see the stages (static/index.html)

fastapi and uvicorn are the `serve` extra (`pip install -e .[serve]`); they are imported only in this mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import time

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from llava_cot_jax.serve import engine as engine_lib
from llava_cot_jax.serve import protocol

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


def _error(err: protocol.APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def _sse(data) -> str:
    return "data: " + (data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))) + "\n\n"


def create_app(engine: engine_lib.Engine, config, context: int = 0) -> FastAPI:
    """The routes over a started engine; `context` is the model's max positions (0: not checked)."""

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        # uvicorn has stopped accepting and answered every open request: the engine has nothing left to run.
        await run_in_threadpool(engine.close)

    app = FastAPI(title="llava_cot_jax", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    model_name = config.serve.model_name
    # The request side's own processor (it renders prompts in the model family's template) and tokenizer: the
    # worker's pads batches, which changes a fast tokenizer's state, and a concurrent call on the same Rust object
    # would fail with "Already borrowed".
    processor = copy.deepcopy(engine.searcher.processor)
    tokenizer = processor.tokenizer
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
    started = int(time.time())

    @app.exception_handler(protocol.APIError)
    async def api_error(_request, err: protocol.APIError):
        return _error(err)

    @app.exception_handler(HTTPException)
    async def http_error(_request, err: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return _error(protocol.APIError(str(err.detail), None, code, err.status_code))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, err: RequestValidationError):
        return _error(protocol.APIError(str(err), None, "invalid_request"))

    @app.exception_handler(Exception)
    async def internal_error(_request, err: Exception):  # a failed batch: its requests get the error, others go on
        return _error(protocol.APIError(f"{type(err).__name__}: {err}", None, "internal_error", 500))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "admitted": engine.admitted, "stats": engine.stats}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": started, "owned_by": "llava_cot_jax"}],
        }

    @app.get("/")
    async def page():
        return FileResponse(os.path.join(STATIC, "index.html"), media_type="text/html")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise protocol.APIError(f"the request body is not valid JSON: {err}", None, "invalid_json") from None
        # Images are decoded and the prompt tokenized off the event loop.
        job = await run_in_threadpool(protocol.parse_request, body, config, processor, context)
        cid = protocol.completion_id()
        if not job.stream:
            outcome = await asyncio.wrap_future(engine.submit(job))
            return protocol.completion_body(
                cid, model_name, job, outcome.seed, outcome.results, outcome.prompt_tokens, count
            )

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job.on_text = lambda c, text: loop.call_soon_threadsafe(events.put_nowait, (c, text))
        future = engine.submit(job)  # before the response starts: a full queue is still a 429
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(events.put_nowait, None))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(
            _stream(cid, model_name, job, events, future, include_usage, count), media_type="text/event-stream"
        )

    return app


async def _stream(cid, model_name, job, events, future, include_usage, count):
    """The chunks of a streamed completion: the role, text deltas as they come, each choice's finish, then a
    chunk with no choices that carries the `search` extension (and `usage` when asked), then [DONE]."""
    try:
        async for event in _events(cid, model_name, job, events, future, include_usage, count):
            yield event
    finally:
        # The client went away (the response was cancelled) before the answer: its rows are freed at the next step.
        if not future.done():
            future.cancel()


async def _events(cid, model_name, job, events, future, include_usage, count):
    chunk = lambda choices, **extra: _sse(protocol.chunk_body(cid, model_name, job, choices, **extra))
    texts = [protocol.StreamText(job.stops) for _ in range(job.n)]
    yield chunk(
        [{"index": c, "delta": {"role": "assistant", "content": ""}, "finish_reason": None} for c in range(job.n)]
    )
    while (item := await events.get()) is not None:
        c, text = item
        delta = texts[c].update(text)
        if delta:
            yield chunk([{"index": c, "delta": {"content": delta}, "finish_reason": None}])
    error = future.exception()
    if error is not None:
        err = error if isinstance(error, protocol.APIError) else protocol.APIError(str(error), None, None, 500)
        yield _sse(err.body())
        yield _sse("[DONE]")
        return
    outcome = future.result()
    completion = 0
    for c, result in enumerate(outcome.results):
        delta = texts[c].finish(result.text)
        if delta:
            yield chunk([{"index": c, "delta": {"content": delta}, "finish_reason": None}])
        completion += count(texts[c].sent)
        reason = protocol.finish_reason(result, texts[c].stopped)
        yield chunk([{"index": c, "delta": {}, "finish_reason": reason}])
    extra = {"search": protocol.search_extension(job, outcome.seed, outcome.results)}
    if include_usage:
        prompt = outcome.prompt_tokens
        extra["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    yield chunk([], **extra)
    yield _sse("[DONE]")


def build_engine(config):
    """The searcher a config names (as `infer` builds it), warmed up, inside a started engine; and the model's
    context length."""
    import dataclasses

    from llava_cot_jax.generate import cli
    from llava_cot_jax.generate import config as generate_config

    searcher = cli.build_searcher(config)
    serve = config.serve
    base = generate_config.search_config(config.search, config.seed)
    use_continuous = serve.continuous and searcher.sampler.mesh is None
    if serve.continuous and not use_continuous:
        # The slots' arrays carry no sharding rules yet: on a mesh, plain requests run batch-at-a-time.
        print("serve.continuous: off on a device mesh (one device only); plain requests run batch-at-a-time")
    # Plain requests run batch-at-a-time only without the continuous batch (or with several images, or a long
    # prompt: those compile when first asked).
    methods = [serve.plain_method] if serve.warmup and not use_continuous else []
    methods += [base.method] if serve.warmup_search else []
    for method in methods:
        searcher.config = dataclasses.replace(base, method=method)
        for size in engine_lib.batch_sizes(serve.max_batch):
            seconds = searcher.warmup(batch_size=size, num_images=1)
            print(f"warmup: {method}, batch {size}, one image: {seconds:.1f} s", flush=True)
    searcher.config = base
    continuous = None
    if use_continuous:
        continuous = {
            "num_slots": serve.max_batch,
            "steps": serve.decode_steps,
            "slot_prompt_tokens": serve.slot_prompt_tokens,
            "max_new_tokens": config.search.max_new_tokens,
        }
    engine = engine_lib.Engine(
        searcher,
        serve.max_batch,
        serve.batch_window_ms / 1000,
        serve.max_queue,
        serve.stream_interval_ms / 1000,
        continuous=continuous,
    )
    if engine.continuous and serve.warmup:
        seconds = engine.continuous.warmup()
        print(f"warmup: continuous batch of {serve.max_batch} slots, one image: {seconds:.1f} s", flush=True)
    return engine.start(), cli.model_context(config)


def run(config, workdir: str = "") -> int:
    """Loads the model, warms it up and serves until SIGTERM / Ctrl-C; in-flight requests finish first."""
    import uvicorn

    serve = config.serve
    if serve.plain_method not in ("greedy", "sample"):
        raise ValueError(f"serve.plain_method must be greedy or sample, got {serve.plain_method!r}")
    if serve.max_batch < 1 or serve.max_queue < 1 or serve.decode_steps < 1:
        raise ValueError("serve.max_batch, serve.max_queue and serve.decode_steps must be >= 1")
    engine, context = build_engine(config)
    app = create_app(engine, config, context)
    server = uvicorn.Server(uvicorn.Config(app, host=serve.host, port=serve.port, log_level="warning"))
    print(f"serving {serve.model_name} on http://{serve.host}:{serve.port}", flush=True)
    try:
        # On SIGTERM / SIGINT uvicorn stops accepting, answers every open request, runs the lifespan's shutdown
        # (which closes the engine) and then re-raises the signal, so the process ends with the signal's status.
        server.run()
    finally:
        engine.close()
    return 0
