"""`mode = "serve"`: the real server (`python -m llava_cot_jax.main --config configs/serve.py`) on a tiny random
checkpoint, asked over HTTP with OpenAI's own client and with httpx: answers, streaming, n, the search extension,
equality with `Searcher.ask` (also for requests that overlap in the continuous batch), bad inputs, a client that
goes away mid-stream, the queue limit, the page in headless Chromium, and a SIGTERM that lets an in-flight request
finish."""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from llava_cot_jax import config_file  # noqa: E402
from llava_cot_jax.serve import engine as engine_lib  # noqa: E402
from llava_cot_jax.serve import protocol  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "llava-cot"
QUESTION = "How many cubes?"
MAX_QUEUE = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(seed: int = 0, size=(20, 40)) -> bytes:
    pixels = (np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def user(text: str = QUESTION, image: str | None = None) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": image or data_url(png())}}] if image != "" else []
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def overrides(ckpt: str, tmp: str, port: int) -> list[str]:
    """The server's settings (also the in-process searcher's, to compare with)."""
    return [
        f"--config.model.weights={ckpt}",
        f"--config.serve.port={port}",
        f"--config.serve.image_dir={tmp}/images",
        f"--config.serve.max_queue={MAX_QUEUE}",
        "--config.serve.max_batch=2",
        "--config.serve.stream_interval_ms=0",  # every token: the tiny model writes an answer in milliseconds
        "--config.serve.decode_steps=2",  # many scheduling points: requests join and leave mid-answer
        "--config.search.max_new_tokens=160",  # room for an answer long enough to join or leave in the middle of
        "--config.search.stage_max_new_tokens=6",
        "--config.search.judge_max_new_tokens=4",
        "--config.max_prompt_tokens=200",
        f"--config.compilation_cache={tmp}/xla",
    ]


def load_config(args: list[str]):
    config = config_file.load(os.path.join(REPO, "configs", "serve.py"), "runlocal")
    for arg in args:
        key, value = arg[len("--config.") :].split("=", 1)
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = type(node[leaf])(value)
    return config


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("serve"))
    os.makedirs(f"{tmp}/images")
    with open(f"{tmp}/images/cubes.png", "wb") as f:
        f.write(png())
    port = free_port()
    args = overrides(tiny_checkpoint, tmp, port)
    command = [sys.executable, "-m", "llava_cot_jax.main", f"--config={REPO}/configs/serve.py:runlocal", *args]
    log = open(f"{tmp}/server.log", "w")
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 400
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(open(f"{tmp}/server.log").read()[-4000:])
        time.sleep(0.5)
    yield {"url": url, "process": process, "tmp": tmp, "args": args, "log": f"{tmp}/server.log"}
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0, timeout=300)


def post(server, body, **kw) -> httpx.Response:
    return httpx.post(server["url"] + "/v1/chat/completions", json=body, timeout=300, **kw)


def test_health_models_and_page(server, client):
    assert httpx.get(server["url"] + "/health").json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == [MODEL]
    page = httpx.get(server["url"] + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/v1/chat/completions" in page.text
    missing = httpx.get(server["url"] + "/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_openai_client_chat(client):
    reply = client.chat.completions.create(model=MODEL, messages=user(), max_tokens=8, seed=3)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == MODEL
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    search = reply.model_extra["search"]
    assert search["method"] == "sample" and search["seed"] == 3
    assert len(search["choices"][0]["trace"]) == 1  # one step: the whole answer
    again = client.chat.completions.create(model=MODEL, messages=user(), max_tokens=8, seed=3)
    assert again.choices[0].message.content == choice.message.content  # a seed makes it reproducible


def test_stream_concatenates_to_the_answer(client):
    kwargs = dict(model=MODEL, messages=user(), max_tokens=16, seed=5, temperature=0.9)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) > 1, "streamed in more than one piece"
    assert "".join(deltas) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-1].model_extra["search"]["seed"] == 5

    stop = whole[4:7]  # a stop string the answer is known to contain
    cut = client.chat.completions.create(**kwargs, stop=[stop])
    assert cut.choices[0].message.content == whole[: whole.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(**kwargs, stop=[stop], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == whole[: whole.find(stop)]


def test_n_choices(client):
    reply = client.chat.completions.create(model=MODEL, messages=user(), max_tokens=8, n=2, seed=1, temperature=1.0)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].message.content != reply.choices[1].message.content
    streamed = client.chat.completions.create(
        model=MODEL, messages=user(), max_tokens=8, n=2, seed=1, temperature=1.0, stream=True
    )
    texts = ["", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in reply.choices]


def test_stage_search_extension(server, client):
    """A search runs batch-at-a-time (not in the continuous batch), with its trace in the `search` field."""
    health = lambda: httpx.get(server["url"] + "/health").json()["stats"]
    before = health()
    reply = client.chat.completions.create(
        model=MODEL, messages=user(), seed=7, extra_body={"search": {"method": "stage", "num_candidates": 2}}
    )
    search = reply.model_extra["search"]
    assert search["method"] == "stage" and search["num_candidates"] == 2
    result = search["choices"][0]
    assert [step["step"] for step in result["trace"]] == ["SUMMARY", "CAPTION", "REASONING", "CONCLUSION"]
    assert all(len(step["candidates"]) == 2 for step in result["trace"])
    assert all("winner" in step and "matches" in step for step in result["trace"])
    accepted = "".join(step["candidates"][step["winner"]]["text"] for step in result["trace"])
    assert reply.choices[0].message.content == accepted
    after = health()
    assert after["batches"] == before["batches"] + 1
    assert after["continuous"]["requests"] == before["continuous"]["requests"]
    streamed = client.chat.completions.create(
        model=MODEL,
        messages=user(),
        seed=7,
        stream=True,
        extra_body={"search": {"method": "stage", "num_candidates": 2}},
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == accepted
    assert chunks[-1].model_extra["search"]["choices"][0]["trace"] == result["trace"]


@pytest.fixture(scope="module")
def searcher(server):
    """The server's searcher, built in this process from the same settings."""
    from llava_cot_jax.generate import cli

    return cli.build_searcher(load_config(server["args"]))


def expected_answer(searcher, question, images, **settings) -> str:
    searcher.config = dataclasses.replace(searcher.config, **settings)
    return searcher.ask([question], [images] if images else None)[0].text


def test_answer_equals_searcher_ask(server, client, searcher):
    """A sampled request with a seed answers what `Searcher.ask` answers with that seed and settings."""
    image_path = os.path.join(server["tmp"], "images", "cubes.png")
    reply = client.chat.completions.create(
        model=MODEL, messages=user(image=image_path), max_tokens=12, seed=11, temperature=0.8
    )
    image = PIL.Image.open(image_path).convert("RGB")
    expected = expected_answer(
        searcher, QUESTION, [image], method="sample", max_new_tokens=12, seed=11, temperature=0.8
    )
    assert reply.choices[0].message.content == expected


def stream_lines(server, body):
    """An open streamed completion: (the response context, its `data:` payloads as they come)."""
    response = httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body, timeout=300)
    opened = response.__enter__()
    payloads = (line[len("data: ") :] for line in opened.iter_lines() if line.startswith("data: "))
    return response, payloads


def first_text(payloads) -> str:
    """Reads a stream up to its first piece of answer text."""
    for payload in payloads:
        chunk = json.loads(payload)
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            return chunk["choices"][0]["delta"]["content"]
    raise AssertionError("the stream ended without text")


def continuous_stats(server) -> dict:
    return httpx.get(server["url"] + "/health").json()["stats"]["continuous"]


def test_overlapping_greedy_requests_equal_searcher_ask(server, searcher):
    """A short text-only request joins the continuous batch while a long one with an image is mid-answer and leaves
    before it; both answers equal `Searcher.ask` greedy, each run alone."""
    long_question, short_question = "Describe every cube on the table, one by one.", "Hi?"
    joined = continuous_stats(server)["joined_mid_decode"]
    body = {"model": MODEL, "messages": user(long_question), "max_tokens": 160, "temperature": 0, "stream": True}
    response, payloads = stream_lines(server, body)
    try:
        texts = [first_text(payloads)]  # the long answer is being decoded
        short = post(
            server, {"model": MODEL, "messages": user(short_question, image=""), "max_tokens": 5, "temperature": 0}
        )
        for payload in payloads:
            chunk = json.loads(payload) if payload != "[DONE]" else {"choices": []}
            texts += [c["delta"].get("content") or "" for c in chunk["choices"]]
    finally:
        response.__exit__(None, None, None)
    assert continuous_stats(server)["joined_mid_decode"] > joined
    image = PIL.Image.open(io.BytesIO(png())).convert("RGB")
    assert "".join(texts) == expected_answer(searcher, long_question, [image], method="greedy", max_new_tokens=160)
    assert short.json()["choices"][0]["message"]["content"] == expected_answer(
        searcher, short_question, None, method="greedy", max_new_tokens=5
    )


def test_disconnect_mid_stream_frees_the_slot(server):
    """A client that closes its stream mid-answer gives its slot back: afterwards as many requests as there are
    slots are served at once."""
    cancelled = continuous_stats(server)["cancelled"]
    body = {"model": MODEL, "messages": user(), "max_tokens": 160, "seed": 1, "stream": True}
    response, payloads = stream_lines(server, body)
    first_text(payloads)
    response.__exit__(None, None, None)  # hang up mid-answer
    deadline = time.monotonic() + 60
    while continuous_stats(server)["cancelled"] == cancelled or httpx.get(server["url"] + "/health").json()["admitted"]:
        assert time.monotonic() < deadline, continuous_stats(server)
        time.sleep(0.05)
    assert continuous_stats(server)["busy_slots"] == 0
    short = {"model": MODEL, "messages": user(), "max_tokens": 4}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # serve.max_batch = 2 slots
        assert [r.status_code for r in pool.map(lambda _: post(server, short), range(2))] == [200, 200]


@pytest.mark.parametrize(
    "change,status,param,code",
    [
        ({"messages": user(image="data:image/png;base64,aGVsbG8=")}, 400, "messages[0].content[0].image_url", None),
        ({"messages": user(image="data:image/png;base64,@@@")}, 400, "messages[0].content[0].image_url", None),
        ({"messages": user(image="/etc/passwd")}, 400, "messages[0].content[0].image_url", None),
        ({"messages": user(image="https://example.com/a.png")}, 400, "messages[0].content[0].image_url", None),
        ({"model": "gpt-4o"}, 404, "model", "model_not_found"),
        ({"messages": user(text="cube " * 400)}, 400, "messages", "context_length_exceeded"),
        ({"frequency_penalty": 0.5}, 400, "frequency_penalty", "unsupported_parameter"),
        ({"temperature": 5}, 400, "temperature", None),
        ({"top_p": 0}, 400, "top_p", None),
        ({"max_tokens": 10_000}, 400, "max_tokens", None),
        ({"n": 0}, 400, "n", None),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
        ({"search": {"method": "magic"}}, 400, "search.method", None),
        ({"search": {"beams": 3}}, 400, "search.beams", None),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages", None),
    ],
)
def test_bad_input_is_a_4xx_and_the_server_goes_on(server, change, status, param, code):
    body = {"model": MODEL, "messages": user(), "max_tokens": 4, **change}
    response = post(server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if code:
        assert error["code"] == code
    good = post(server, {"model": MODEL, "messages": user(), "max_tokens": 2})
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"] is not None


def test_malformed_json(server):
    response = httpx.post(server["url"] + "/v1/chat/completions", content=b"{nope", timeout=60)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


def test_queue_limit_gives_429(server):
    body = {"model": MODEL, "messages": user(), "seed": 2, "search": {"method": "stage", "num_candidates": 2}}
    with concurrent.futures.ThreadPoolExecutor(2 * MAX_QUEUE) as pool:
        statuses = sorted(pool.map(lambda _: post(server, body).status_code, range(2 * MAX_QUEUE)))
    assert set(statuses) == {200, 429} and statuses.count(200) >= MAX_QUEUE, statuses
    rejected = post(server, {"model": MODEL, "messages": user(), "max_tokens": 2})
    assert rejected.status_code == 200  # the queue drained


def test_page_script_parses(server, tmp_path):
    """The page's script is valid JavaScript (checked with node where it is installed)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    page = httpx.get(server["url"] + "/").text
    script = tmp_path / "page.js"
    script.write_text(re.search(r"<script>(.*)</script>", page, re.S).group(1))
    checked = subprocess.run([node, "--check", str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


# A stand-in for the browser: just the DOM calls the page makes, FileReader, and fetch against the live server.
PAGE_DRIVER_HEAD = """
class El {
  constructor(tag) { this.tag = tag; this.children = []; this.className = ""; this.textContent = ""; this.value = "";
    this.checked = false; this.disabled = false; this.files = []; this.listeners = {}; }
  set innerHTML(_) { this.children = []; this.textContent = ""; }
  get innerHTML() { return ""; }
  appendChild(child) { this.children.push(child); return child; }
  addEventListener(type, fn) { this.listeners[type] = fn; }
}
const nodes = {};
globalThis.document = { getElementById: (id) => (nodes[id] ||= new El("div")), createElement: (t) => new El(t) };
const realFetch = globalThis.fetch;
globalThis.fetch = (url, options) => realFetch(process.env.BASE + url, options);
globalThis.FileReader = class { readAsDataURL() { this.result = process.env.IMAGE; this.onload(); } };
"""
PAGE_DRIVER_TAIL = """
(async () => {
  while (!$("model").textContent) await new Promise((r) => setTimeout(r, 20));
  $("file").files = [{}];
  $("file").listeners.change();
  Object.assign($("question"), { value: process.env.QUESTION });
  Object.assign($("method"), { value: "stage" });
  Object.assign($("candidates"), { value: "2" });
  Object.assign($("temperature"), { value: "0.6" });
  Object.assign($("seed"), { value: "9" });
  Object.assign($("stream"), { checked: true });
  await $("ask").listeners.submit({ preventDefault() {} });
  const text = (el) => [el.textContent, ...el.children.map(text)].join("");
  console.log(JSON.stringify({
    status: $("status").textContent, statusClass: $("status").className, raw: $("raw").textContent,
    stages: $("stages").children.map((c) => c.children[0].textContent),
    steps: $("trace").children.filter((c) => c.tag === "details").map((d) => d.children.length),
    trace: text($("trace")),
  }));
})();
"""


def test_page_asks_and_shows_the_search(server, tmp_path):
    """The page's own script, run by node against the live server with a stand-in DOM: a streamed stage search
    fills the four stages and one panel per stage with both candidates, and the text it shows is the answer."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    page = httpx.get(server["url"] + "/").text
    script = tmp_path / "page_driver.js"
    script.write_text(PAGE_DRIVER_HEAD + re.search(r"<script>(.*)</script>", page, re.S).group(1) + PAGE_DRIVER_TAIL)
    env = dict(os.environ, BASE=server["url"], IMAGE=data_url(png()), QUESTION=QUESTION)
    run = subprocess.run([node, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    shown = json.loads(run.stdout.strip().splitlines()[-1])
    assert shown["statusClass"] == "muted" and shown["status"].endswith(" s"), shown["status"]
    body = {"model": MODEL, "messages": user(), "seed": 9, "temperature": 0.6}
    reply = post(server, {**body, "search": {"method": "stage", "num_candidates": 2}}).json()
    assert shown["raw"] == reply["choices"][0]["message"]["content"]
    assert shown["stages"] == ["SUMMARY", "CAPTION", "REASONING", "CONCLUSION"]
    # a summary line, then per stage: its heading, two candidates and the judge's matches
    assert len(shown["steps"]) == 4 and all(n >= 3 for n in shown["steps"]), shown["steps"]
    assert "stage, N = 2, seed 9" in shown["trace"]
    kept = re.findall(r"candidate (\d) kept", shown["trace"])
    assert len(kept) == 4 and re.findall(r"→ #(\d)", shown["trace"]) == kept  # N = 2: one match, its winner kept


CHROMIUM = "/usr/bin/chromium"
# Headless, and nothing that reaches for the network (closed here): no background services, updates or sync.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_page_in_a_browser(server, tmp_path):
    """The page in headless Chromium (Debian's package): upload an image, ask for a streamed stage search, and find
    the four stages on the screen with the answer the API gives for the same request, and one trace panel each."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium package (.ci/run does)")
    image = tmp_path / "cubes.png"
    image.write_bytes(png())
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(server["url"] + "/")
            sync_api.expect(page.locator("#model")).to_have_text(MODEL)
            page.set_input_files("#file", str(image))
            sync_api.expect(page.locator("#preview img")).to_have_count(1)
            page.fill("#question", QUESTION)
            page.select_option("#method", "stage")
            page.fill("#candidates", "2")
            page.fill("#temperature", "0.6")
            page.fill("#seed", "9")
            page.check("#stream")
            page.click("#go")
            sync_api.expect(page.locator("#status")).to_have_text(re.compile(r" s$"), timeout=120_000)
            headings = page.locator("#stages .stage h3").all_text_contents()
            shown = page.locator("#stages .stage p").all_text_contents()
            raw = page.locator("#raw").text_content()
            panels = page.locator("#trace details").count()
        finally:
            browser.close()
    assert headings == ["SUMMARY", "CAPTION", "REASONING", "CONCLUSION"]
    body = {"model": MODEL, "messages": user(), "seed": 9, "temperature": 0.6}
    reply = post(server, {**body, "search": {"method": "stage", "num_candidates": 2}}).json()
    assert raw == reply["choices"][0]["message"]["content"]
    stages = reply["search"]["choices"][0]["stages"]
    assert [text.strip() for text in shown] == [stages[name].strip() for name in headings]
    assert panels == 4


def test_helpers():
    assert [engine_lib.padded_size(r, 8) for r in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert engine_lib.padded_size(3, 3) == 3 and engine_lib.batch_sizes(6) == [1, 2, 4, 6]
    text = protocol.StreamText(["END"])
    assert text.update("abcdE") == "abc"  # "dE" could still begin the stop string
    assert text.update("abcdEND and more") == "d" and text.stopped
    assert text.finish("abcdEND and more") == ""


def test_request_settings(tiny_tokenizer):
    """What a request turns into, without a model: methods, budgets and N from the request and the config."""
    from llava_cot_jax.data.image import MllamaImageProcessor
    from llava_cot_jax.data.processor import MllamaProcessor

    config = load_config([])
    processor = MllamaProcessor(MllamaImageProcessor(size=28, max_image_tiles=4), tiny_tokenizer)

    def job(**body):
        return protocol.parse_request({"messages": user(image=""), **body}, config, processor, 0)

    plain = job()
    assert plain.settings.method == "sample" and plain.settings.temperature == 0.6 and not plain.explicit_seed
    assert job(temperature=0).settings.method == "greedy"
    assert job(max_tokens=20, seed=5).settings.max_new_tokens == 20 and job(seed=5).settings.seed == 5
    stage = job(max_tokens=20, search={"method": "stage"})
    assert stage.settings.stage_max_new_tokens == 5 and stage.settings.num_candidates == 2  # runlocal's N
    assert job(search={"method": "best_of_n", "num_candidates": 3}).settings.num_candidates == 3
    assert job(stop="x").stops == ("x",) and job(n=2).n == 2
    assert job().batch_key() == job().batch_key() != job(seed=1).batch_key()
    system = [{"role": "system", "content": "Be brief."}, *user(image="")]
    assert protocol.parse_request({"messages": system}, config, processor, 0).question == QUESTION
    with pytest.raises(protocol.APIError, match="system message together with an image"):
        protocol.parse_request({"messages": [system[0], *user()]}, config, processor, 0)


def test_bad_serve_settings_are_one_line_errors():
    from llava_cot_jax import main as main_lib

    config = load_config(["--config.serve.plain_method=stage", "--config.compilation_cache="])
    with pytest.raises(ValueError, match="serve.plain_method must be greedy or sample"):
        main_lib.dispatch(config)


def test_sigterm_drains_in_flight_requests(server):
    """SIGTERM while a request runs: it is answered, then the server exits (run last: it stops the server)."""
    body = {"model": MODEL, "messages": user(), "seed": 4, "search": {"method": "stage", "num_candidates": 2}}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, server, body)
        deadline = time.monotonic() + 60
        while httpx.get(server["url"] + "/health").json()["admitted"] == 0:
            assert time.monotonic() < deadline and not pending.done()
            time.sleep(0.01)
        server["process"].send_signal(signal.SIGTERM)
        response = pending.result(timeout=300)
    assert response.status_code == 200 and json.loads(response.text)["choices"][0]["message"]["content"]
    # uvicorn re-raises the signal once it has drained: the exit status is SIGTERM's, as for any process it ends.
    assert server["process"].wait(timeout=120) in (0, -signal.SIGTERM), open(server["log"]).read()[-3000:]
