"""The README's first command: the offline demo runs end to end through the one entry point."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_offline(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llava_cot_jax.main",
            "--config",
            os.path.join(REPO, "configs", "demo.py"),
            f"--workdir={tmp_path}",
            f"--config.compilation_cache={tmp_path}/xla",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trace = json.load(open(tmp_path / "trace.json"))
    stages = ["SUMMARY", "CAPTION", "REASONING", "CONCLUSION"]  # the demo ignores EOS: every stage runs
    assert trace["config"]["method"] == "stage" and list(trace["result"]["stages"]) == stages
    for stage in stages:
        assert f"{stage}:" in result.stdout
    assert os.path.exists(tmp_path / "tiny_random_checkpoint" / "llava_cot_config.json")
    assert len(os.listdir(tmp_path / "xla")) > 5  # compiled programs kept for the next run
