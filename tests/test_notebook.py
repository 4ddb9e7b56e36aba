"""notebooks/colab_tpu_demo.ipynb runs end to end on CPU: a tiny HF checkpoint converted in the notebook, an
image, stage-level search, every stage and the judge's verdicts; then QLoRA on images drawn in the notebook, and
the search again with base + adapters. nbclient executes it in a fresh kernel with the
parameters cell's values overridden by a cell inserted after it (papermill's convention)."""

import json
import os
import re

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "colab_tpu_demo.ipynb")


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def test_colab_notebook_runs_on_cpu(tmp_path, tiny_checkpoint):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    [params] = [i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", [])]
    overrides = dict(
        SMALL=False,
        HF_DIR=tiny_checkpoint,
        WORKDIR=str(tmp_path / "work"),
        DTYPE="float32",
        QUANTIZE="int8",  # the one-16-GB-chip path (Colab's v5e-1), on the tiny model
        STAGE_MAX_NEW_TOKENS=6,
        JUDGE_MAX_NEW_TOKENS=3,
        STOP_AT_EOS=False,
        COMPILATION_CACHE=str(tmp_path / "xla"),
        FINETUNE_STEPS=6,
        FINETUNE_BATCH=1,
        FINETUNE_LR=1e-2,
        LORA_RANK=4,
        FINETUNE_SEQ=128,  # a sample is about 90 tokens with the tiny tokenizer
    )
    source = "\n".join(f"{k} = {v!r}" for k, v in overrides.items())
    notebook.cells.insert(params + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))

    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    cells = notebook.cells
    assert os.path.exists(tmp_path / "work" / "checkpoint" / "llava_cot_config.json")  # converted in the notebook
    assert any("image/png" in o.get("data", {}) for c in cells for o in c.get("outputs", []))  # the image shown
    base_stages, tuned_stages = [_text(c) for c in cells if "<SUMMARY>\n" in _text(c)]
    for stages in (base_stages, tuned_stages):
        for stage in ("SUMMARY", "CAPTION", "REASONING", "CONCLUSION"):
            assert f"<{stage}>\n" in stages and "not reached" not in stages
    verdicts = next(_text(c) for c in cells if "== SUMMARY" in _text(c))
    for stage in ("SUMMARY", "CAPTION", "REASONING", "CONCLUSION"):
        assert f"== {stage}: candidate " in verdicts
    assert len(re.findall(r"round 0: [01] vs [01] -> [01] by \w", verdicts)) == 4  # N = 2: one match per stage
    assert verdicts.count("    screen: ") == 2  # both reasoning candidates were screened

    # The fine-tuning section: 12 images with their questions, an adapter-only checkpoint, a falling loss.
    finetune = tmp_path / "work" / "finetune"
    assert len(os.listdir(tmp_path / "work" / "my_images" / "images")) == 12
    step_dir = finetune / "checkpoints" / "6"
    assert "adapters" in os.listdir(step_dir) and "params" not in os.listdir(step_dir)
    with open(finetune / "metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.05, losses
