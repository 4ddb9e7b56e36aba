"""Fault injection: for each entry point and tool, bad inputs end in exit code 1 and one `error:` line (or a counted
bad row), and leave no half-written output.

Most cases call the code a tool runs in-process, inside `cli_errors.one_line_errors` (what every tool wraps its
main in), so they cost no interpreter start; one subprocess per tool checks that the real command line prints that
one line and nothing after it. Elsewhere: divergence and resume with other settings (tests/test_train.py -k
diverg), kill -9 and SIGTERM during training (test_train.py -k "sigkill or sigterm") and during an evaluation
(test_eval_mcq.py -k resumes), bad TSV rows (test_eval_mcq.py -k bad_rows), bad training records
(test_sources.py).
"""

import base64
import io
import json
import os
import re
import struct
import subprocess
import sys
import zlib

import ml_collections
import numpy as np
import PIL.Image
import pytest

from llava_cot_jax import checkpoint, cli_errors, config_file
from llava_cot_jax import main as main_lib
from llava_cot_jax.data import image as image_lib
from llava_cot_jax.generate import config as generate_config
from llava_cot_jax.models.mllama.config import MllamaConfig
from llava_cot_jax.models.mllama.hf_reference import build_hf_model, save_hf_checkpoint
from llava_cot_jax.models.mllama.params import safetensors_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(REPO, "tools")
CONFIGS = os.path.join(REPO, "configs")


def stderr_lines(text: str) -> list[str]:
    """stderr's lines less tqdm's progress bars (which a tool may print before it fails)."""
    progress = re.compile(r"\[\d+:\d+(<[^\]]*)?(, [^\]]*)?\]\s*$")
    return [line for line in text.replace("\r", "\n").splitlines() if line.strip() and not progress.search(line)]


def one_line(capsys, fn, *args, **kwargs):
    """(exit code, stderr lines) of `fn(*args)` run as a tool runs its main."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        with cli_errors.one_line_errors(program=False):
            fn(*args, **kwargs)
    return exited.value.code, stderr_lines(capsys.readouterr().err)


def assert_one_error(capsys, message, fn, *args, **kwargs):
    code, lines = one_line(capsys, fn, *args, **kwargs)
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert message in lines[0], lines


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height in its header and holds no pixels: enough to be refused unread."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    config = MllamaConfig.tiny()
    path = str(tmp_path_factory.mktemp("hf") / "model")
    save_hf_checkpoint(build_hf_model(config, seed=1), config, path)
    return path


@pytest.fixture(scope="module")
def converted(hf_model, tmp_path_factory):
    return checkpoint.convert_hf_to_orbax(hf_model, str(tmp_path_factory.mktemp("orbax") / "ckpt"), progress=False)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


# ------------------------------------------------------------------------------------------ the one entry point


def test_config_file_mistakes_are_one_line(capsys):
    assert_one_error(capsys, "no such config file: configs/nope.py", main_lib.load_config_arg, "configs/nope.py")
    demo = os.path.join(CONFIGS, "demo.py")
    assert_one_error(capsys, "unknown config argument 'bogus'", main_lib.load_config_arg, f"{demo}:bogus")


def _infer_config(**values):
    config = generate_config.default_config()
    config.question = "What is in the image?"
    for key, value in values.items():
        config[key] = value
    return config


def test_infer_refuses_bad_inputs_before_loading_a_model(tmp_path, capsys):
    from llava_cot_jax.generate import cli

    text = tmp_path / "notes.png"
    text.write_text("not an image")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header(20_000, 20_000))
    cases = [
        ({"question": ""}, "--config.question is required"),
        ({"image": str(tmp_path / "missing.png")}, "image file not found"),
        ({"image": str(tmp_path)}, "is a directory"),
        ({"image": str(text)}, "cannot decode image"),
        ({"image": str(empty)}, "cannot decode image"),
        ({"image": str(huge)}, "over the pixel budget"),
        ({"question": "x" * (generate_config.MAX_PROMPT_CHARS + 1)}, "over max_prompt_chars"),
    ]
    for values, message in cases:
        # model.weights points nowhere: loading it would fail differently, so each refusal came first
        config = _infer_config(**values)
        config.model.weights = str(tmp_path / "no_model")
        assert_one_error(capsys, message, cli.run, config)


def test_prompt_limits_count_tokens_against_the_configured_maximum_and_the_context(tiny_tokenizer):
    config = _infer_config(max_prompt_tokens=8)
    short, long = "a cube", " ".join(["cube"] * 50)
    assert generate_config.prompt_limit_reason(short, config, tiny_tokenizer) is None
    assert "over max_prompt_tokens=8" in generate_config.prompt_limit_reason(long, config, tiny_tokenizer)
    config.max_prompt_tokens = 0
    context = config.search.max_new_tokens + 10  # room for 10 prompt tokens
    assert "the model's context" in generate_config.prompt_limit_reason(long, config, tiny_tokenizer, context)


def test_image_pixel_budget_is_checked_before_decoding():
    with pytest.raises(image_lib.ImageTooLarge, match="over the pixel budget .*400000000 pixels"):
        image_lib.load_image(png_header(20_000, 20_000))  # PIL's own check, at open
    with pytest.raises(image_lib.ImageTooLarge, match="10000 x 10000 = 100,000,000 pixels, over the pixel budget"):
        image_lib.load_image(png_header(10_000, 10_000))  # ours, between PIL's warning and its error
    small = io.BytesIO()
    PIL.Image.new("RGB", (8, 6)).save(small, "PNG")
    with pytest.raises(image_lib.ImageTooLarge, match="48 pixels, over the pixel budget of 40"):
        image_lib.load_image(small.getvalue(), max_pixels=40)
    assert image_lib.load_image(small.getvalue()).size == (8, 6)


# ------------------------------------------------------------------------------------------ eval


def _png_base64() -> str:
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.full((20, 30, 3), 120, np.uint8)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _write_tsv(path, rows):
    columns = ["index", "question", "A", "B", "answer", "image"]
    lines = ["\t".join(columns)] + ["\t".join(str(row[c]) for c in columns) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_eval_oversized_row_is_a_bad_row_and_a_failed_start_claims_nothing(tiny_checkpoint, hf_model, tmp_path):
    from llava_cot_jax.eval import run as eval_run

    image = _png_base64()
    rows = [
        {"index": i, "question": f"Is this {i}?", "A": "yes", "B": "no", "answer": "A", "image": image} for i in "123"
    ]
    rows.insert(1, dict(rows[0], index="big", question="x" * 200_000))  # the 10 MB cell, smaller
    tsv = _write_tsv(tmp_path / "bench.tsv", rows)
    config = config_file.load(os.path.join(CONFIGS, "eval_mcq.py"), "runlocal")
    config.tsv, config.batch_size, config.compilation_cache = tsv, 2, ""
    config.search.max_new_tokens = 4
    workdir = tmp_path / "run"

    # A checkpoint that fails to load (a truncated safetensors header): no answer, so no claim on the workdir.
    broken = _copy(hf_model, tmp_path / "broken")
    (shard,) = safetensors_files(broken)
    with open(shard, "r+b") as f:
        f.truncate(4)
    config.model.weights = broken
    with pytest.raises(Exception):  # noqa: B017 -- which error the loader raises is test_conversion's business
        eval_run.run(config, str(workdir))
    assert not (workdir / eval_run.RUN_FILE).exists() and not (workdir / eval_run.PROGRESS).exists()

    config.model.weights = tiny_checkpoint  # fixed: the same workdir is not refused
    assert eval_run.run(config, str(workdir)) == 0
    result = json.loads((workdir / eval_run.ACCURACY).read_text())
    assert result["num_evaluated"] == 3, result  # the oversized row's batch-mates were answered
    assert [(b["index"], b["reason"].split(" over ")[1]) for b in result["bad_rows"]] == [
        ("big", "max_prompt_chars=65,536")
    ]

    other = config_file.load(os.path.join(CONFIGS, "eval_mcq.py"), "runlocal")
    other.tsv, other.model.weights, other.prompt = tsv, tiny_checkpoint, "yorn"
    with pytest.raises(ValueError, match="changed: prompt.*delete .*eval_run.json, .*progress.jsonl") as refused:
        eval_run.run(other, str(workdir))
    for name in ("eval_run.json", "progress.jsonl", "predictions.tsv", "accuracy.json"):
        assert name in str(refused.value)


# ------------------------------------------------------------------------------------------ conversion and export


def test_convert_bad_inputs_leave_no_output(hf_model, tmp_path, capsys):
    out = tmp_path / "out"
    unknown_family = _copy(hf_model, tmp_path / "llava")
    config_path = os.path.join(unknown_family, "config.json")
    with open(config_path) as f:
        hf_config = json.load(f)
    with open(config_path, "w") as f:
        json.dump({**hf_config, "model_type": "qwen2_vl"}, f)
    header = _copy(hf_model, tmp_path / "header")
    (shard,) = safetensors_files(header)
    with open(shard, "r+b") as f:
        f.truncate(12)  # inside the header
    empty_config = _copy(hf_model, tmp_path / "empty_config")
    open(os.path.join(empty_config, "config.json"), "w").close()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    cases = [
        (str(tmp_path / "missing"), str(out), "missing"),
        (unknown_family, str(out), "model_type 'qwen2_vl' is not one this package reads"),
        (header, str(out), "truncated or corrupt"),
        (empty_config, str(out), "config.json"),
        (hf_model, str(taken), "already exists"),
    ]
    for hf_dir, target, message in cases:
        assert_one_error(capsys, message, checkpoint.convert_hf_to_orbax, hf_dir, target, progress=False)
        assert not out.exists() and not [p for p in os.listdir(tmp_path) if ".partial-" in p]
    assert os.listdir(taken) == ["keep.txt"]


def test_export_bad_inputs_leave_no_output(converted, tmp_path, capsys):
    out = tmp_path / "hf"
    taken = tmp_path / "taken"
    taken.mkdir()
    metadata = _copy(converted, tmp_path / "metadata")
    params = os.path.join(metadata, checkpoint.PARAMS_DIR)
    for root, _, names in os.walk(params):
        for name in names:
            if name.endswith("METADATA"):
                with open(os.path.join(root, name), "w") as f:
                    f.write("{not json")
    chunked = _copy(converted, tmp_path / "chunk")
    os.remove(os.path.join(chunked, checkpoint.PARAMS_DIR, "language_model.embed_tokens", "0.0"))
    cases = [
        (str(tmp_path / "missing"), str(out), "missing"),
        (str(tmp_path), str(out), "not a llava_cot_jax checkpoint"),
        (chunked, str(out), "embed_tokens has 0 of its 1 chunk files"),
        (metadata, str(out), "metadata of params/ is missing or corrupt"),
        (converted, str(taken), "already exists"),
    ]
    for ckpt, target, message in cases:
        assert_one_error(capsys, message, checkpoint.export_to_hf, ckpt, target, progress=False)
        assert not out.exists() and not [p for p in os.listdir(tmp_path) if ".partial-" in p]
    assert os.listdir(taken) == []


# ------------------------------------------------------------------------------------------ prepare_data


def _prepare_data():
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_data_tool", os.path.join(TOOLS, "prepare_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_data_bad_inputs(tmp_path, capsys):
    tool = _prepare_data()
    images = tmp_path / "images"
    images.mkdir()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    base = ["--image_root", str(images), "--out_dir", str(tmp_path / "out")]
    cases = [
        (["--jsonl", str(tmp_path / "missing.jsonl"), *base], 1, "missing.jsonl"),
        (["--jsonl", str(tmp_path), *base], 1, ""),  # a directory where the JSONL file is expected
        (["--jsonl", str(empty), *base], 1, ""),
        (["--image_root", str(images)], 2, "required"),  # argparse's own mistakes: one line too
    ]
    for argv, expected, message in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            tool.main(argv)
        lines = stderr_lines(capsys.readouterr().err)
        assert exited.value.code == expected and len(lines) == 1 and lines[0].startswith("error: "), (argv, lines)
        assert message in lines[0], lines
        assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out"), argv


# ------------------------------------------------------------------------------------------ the real command lines


def test_each_command_line_prints_one_error_line_and_nothing_after(converted, tmp_path):
    """One subprocess per tool, started together: exit code 1 (2 for a bad argparse flag) and a single line."""
    taken = tmp_path / "taken"
    taken.mkdir()
    commands = {
        "main": (
            [sys.executable, "-m", "llava_cot_jax.main", "--config=configs/nope.py"],
            "no such config file: configs/nope.py",
        ),
        "convert": (
            [sys.executable, f"{TOOLS}/convert_hf_to_orbax.py", f"--hf_dir={tmp_path}/nope", f"--out={tmp_path}/o"],
            "nope",
        ),
        "export": (
            [sys.executable, f"{TOOLS}/export_to_hf.py", f"--ckpt={converted}", f"--out={taken}"],
            "already exists",
        ),
        "prepare": ([sys.executable, f"{TOOLS}/prepare_data.py", "--out_dir", str(tmp_path)], "required"),
        "aot": ([sys.executable, f"{TOOLS}/aot_compile.py", "--config=configs/infer.py"], "--topology"),
    }
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    running = {
        name: subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, (cmd, _) in commands.items()
    }
    for name, process in running.items():
        _, err = process.communicate(timeout=300)
        lines = stderr_lines(err)
        assert process.returncode in (1, 2) and len(lines) == 1, (name, err[-3000:])
        assert lines[0].startswith("error: ") and commands[name][1] in lines[0], (name, lines)
    assert not os.path.exists(tmp_path / "o") and not os.listdir(taken)


def test_verbose_shows_the_traceback(capsys):
    with pytest.raises(FileNotFoundError):
        with cli_errors.one_line_errors(verbose=True, program=False):
            main_lib.load_config_arg("configs/nope.py")
    assert cli_errors.verbose_requested(["prog", "--verbose"]) and not cli_errors.verbose_requested(["prog"])


def test_prompt_limits_are_in_the_infer_and_eval_configs():
    # The prompt limits live in the infer and eval configs alike (one definition, generate/config.py).
    from llava_cot_jax.eval import config as eval_config

    for config in (generate_config.default_config(), eval_config.default_config()):
        assert isinstance(config, ml_collections.ConfigDict)
        assert config.max_prompt_chars == generate_config.MAX_PROMPT_CHARS
        assert config.max_prompt_tokens == generate_config.MAX_PROMPT_TOKENS


def _with_file_size_limit(limit_kib: int, command: list[str]) -> list[str]:
    """`command` in a shell where any file write past `limit_kib` KiB fails with EFBIG ("File too large"), as a
    write on a full disk fails with ENOSPC: the closest to a full disk an unprivileged test can make. SIGXFSZ is
    ignored (inherited through exec), so the write fails instead of killing the process; set in the shell, not in
    a preexec_fn, because forking a multithreaded (JAX) process to run Python is unsafe."""
    import shlex

    return ["bash", "-c", f"trap '' XFSZ; ulimit -f {limit_kib}; exec {shlex.join(command)}"]


def test_a_full_disk_mid_write_ends_in_one_error_line_and_leaves_no_output(hf_model, converted, tmp_path):
    """Conversion and export write tensors bigger than the limit: each ends with one error line naming the failed
    write, and neither a destination nor a partial directory is left behind. Known noise: when Orbax's write fails,
    TensorStore's threads print "Event loop is closed" tracebacks (from C++, past any Python hook) before the
    failure reaches us; they are allowed here only before the error line."""
    commands = {
        "convert": [f"{TOOLS}/convert_hf_to_orbax.py", f"--hf_dir={hf_model}", f"--out={tmp_path}/orbax"],
        "export": [f"{TOOLS}/export_to_hf.py", f"--ckpt={converted}", f"--out={tmp_path}/hf"],
    }
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for name, command in commands.items():
        done = subprocess.run(
            _with_file_size_limit(16, [sys.executable, *command]),
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        lines = stderr_lines(done.stderr)
        errors = [line for line in lines if line.startswith("error: ")]
        assert done.returncode == 1 and len(errors) == 1 and lines[-1] == errors[0], (name, done.stderr[-3000:])
        assert "File too large" in errors[0] or "No space" in errors[0], (name, errors)
        assert sorted(os.listdir(tmp_path)) == [], (name, os.listdir(tmp_path))
