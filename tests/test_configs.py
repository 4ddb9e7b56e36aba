"""Every config file loads with each of its arguments into the one schema, and every command the docs show names
only keys its config has (a renamed key would otherwise leave a documented command broken)."""

import glob
import os
import re
import shlex

import pytest

from llava_cot_jax import config_file, config_schema
from llava_cot_jax import main as main_lib
from llava_cot_jax.generate import config as generate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_ARGS = {
    "demo.py": (None, "runlocal"),
    "infer.py": (None, "runlocal"),
    "serve.py": (None, "runlocal"),
    "eval_mcq.py": (None, "runlocal"),
    "sft_tiny.py": (None, "runlocal"),
    "study.py": (None, "runlocal"),
    "sft_llava_cot_11b.py": (None, "tpu", "gpu8", "runlocal"),
    "sft_llava_cot_90b.py": (None, "tpu", "gpu8x4", "runlocal"),
    "llava15_pretrain_7b.py": (None, "tpu", "gpu8", "runlocal"),
    "llava15_finetune_7b.py": (None, "tpu", "gpu8", "runlocal"),
    "llava15_finetune_13b.py": (None, "tpu", "gpu8", "runlocal"),
    "sft_llava_cot_llava15_7b.py": (None, "tpu", "gpu8", "runlocal"),
    "lora_llava_cot_11b.py": (None, "chip", "runlocal"),
}
INFERENCE_MODES = ("infer", "eval", "demo", "study", "serve")


def test_every_config_file_is_covered():
    files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "configs", "*.py")))
    assert files == sorted(CONFIG_ARGS)


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in CONFIG_ARGS.items() for a in args])
def test_config_loads_into_the_shared_schema(name, arg):
    config = config_file.load(os.path.join(REPO, "configs", name), arg)
    assert config.mode in main_lib.MODES
    assert set(config.model) == set(config_schema.model_group()), "the model group is config_schema's"
    assert set(config.mesh) == {"data", "fsdp", "tensor"}
    assert config.compilation_cache == config_schema.DEFAULT_COMPILATION_CACHE
    if config.mode in INFERENCE_MODES:
        assert set(config.search) == set(generate_config.search_group())
        generate_config.search_config(config.search, config.seed)  # a valid SearchConfig
    for key in config_schema.MOVED_KEYS:  # no old key survives anywhere
        assert main_lib._lookup(config, key) is main_lib._MISSING, key


def test_config_rejects_an_unknown_argument():
    with pytest.raises(ValueError, match="unknown config argument"):
        config_file.load(os.path.join(REPO, "configs", "infer.py"), "bogus")


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--config.mesh_tensor=-1", "config key mesh_tensor is now mesh.tensor"),
        ("--config.checkpoint=DIR", "config key checkpoint is now model.weights"),
        ("--config.num_candidates=4", "config key num_candidates is now search.num_candidates"),
        ("--config.search=stage", "--config.search is a group"),
        ("--config.search.nope=1", "unknown config key search.nope"),
    ],
)
def test_override_errors_name_the_key(flag, message):
    argv = ["main", f"--config={REPO}/configs/infer.py", "--config.search.method=stage", flag]
    with pytest.raises(SystemExit, match=re.escape(message)):
        main_lib.check_override_keys(argv)
    main_lib.check_override_keys(argv[:3])  # the valid ones pass


def documented_commands():
    """(file, command) for every `python -m llava_cot_jax.main` / `tools/aot_compile.py` command in the docs."""
    paths = [os.path.join(REPO, "README.md"), *glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True)]
    for path in paths:
        with open(path, encoding="utf-8") as f:
            text = f.read().replace("\\\n", " ")
        for line in text.splitlines():
            if "--config=" in line or "--config " in line:
                if "llava_cot_jax.main" in line or "aot_compile.py" in line:
                    yield os.path.relpath(path, REPO), line.strip().strip("`")


def test_documented_commands_name_existing_keys():
    commands = list(documented_commands())
    assert len(commands) > 5
    problems = []
    for path, command in commands:
        try:
            words = shlex.split(command.split("#")[0])
        except ValueError:
            continue
        config_arg = next((w.split("=", 1)[1] for w in words if w.startswith("--config=")), None)
        if config_arg is None and "--config" in words:
            config_arg = words[words.index("--config") + 1]
        if not config_arg or not config_arg.startswith("configs/"):
            continue
        argv = ["main", f"--config={os.path.join(REPO, config_arg)}"]
        argv += [w for w in words if w.startswith("--config.")]
        try:
            main_lib.check_override_keys(argv)
        except SystemExit as err:
            problems.append(f"{path}: {command}: {err}")
    assert not problems, "\n".join(problems)
