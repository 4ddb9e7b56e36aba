"""`mode = "demo"`: the whole inference path offline on a laptop CPU, with nothing to download.

Builds (once, in the workdir) a tiny random Mllama checkpoint with the tiny tokenizer and an image processor,
draws a synthetic CLEVR-like scene with a verifiable question, and runs the chosen search on it through the
same code as `mode = "infer"`. The weights are random, so the text is noise: the demo shows the machinery
(stages, candidates, judge verdicts, the trace), not answers. Point configs/infer.py at a converted
LLaVA-CoT checkpoint for real ones.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np


def build_demo_checkpoint(path: str, seed: int = 0) -> str:
    """A tiny random model saved as a llava_cot_jax checkpoint, with tokenizer and processor files."""
    import jax.numpy as jnp
    from flax import nnx

    from llava_cot_jax import checkpoint
    from llava_cot_jax.data.image import MllamaImageProcessor
    from llava_cot_jax.data.tokenizer import save_tiny_tokenizer
    from llava_cot_jax.models.mllama.config import MllamaConfig
    from llava_cot_jax.models.mllama.model import MllamaForConditionalGeneration

    config = MllamaConfig.tiny()
    model = MllamaForConditionalGeneration(config, rngs=nnx.Rngs(seed))
    # Random init leaves the cross-attention gates at zero (as a fresh Llama-3.2-Vision would); open them so
    # the image actually reaches the text.
    cross = model.language_model.cross_layers
    cross.cross_attn_attn_gate[...] = jnp.full_like(cross.cross_attn_attn_gate[...], 0.5)
    cross.cross_attn_mlp_gate[...] = jnp.full_like(cross.cross_attn_mlp_gate[...], 0.5)
    with tempfile.TemporaryDirectory() as side:
        save_tiny_tokenizer(side)
        MllamaImageProcessor(
            size=config.vision.image_size, max_image_tiles=config.vision.max_num_tiles
        ).save_pretrained(side)
        checkpoint.save_model(path, model, side_files_from=side, overwrite=True)
    return path


def run(config, workdir: str = "") -> int:
    from llava_cot_jax.data import synthetic
    from llava_cot_jax.generate import cli

    workdir = workdir or os.path.join(tempfile.gettempdir(), "llava_cot_jax_demo")
    os.makedirs(workdir, exist_ok=True)
    ckpt = os.path.join(workdir, "tiny_random_checkpoint")
    if not os.path.isdir(ckpt):
        print(f"building a tiny random checkpoint in {ckpt}")
        build_demo_checkpoint(ckpt, seed=config.seed)

    rng = np.random.default_rng(config.seed)
    objects = synthetic.random_scene(rng)
    sample = synthetic.make_sample(rng, objects)
    image_path = os.path.join(workdir, "scene.png")
    synthetic.render_scene(objects, 224).save(image_path)
    print(f"image: {image_path}\nquestion: {sample.question}\nreference conclusion: {sample.conclusion}")
    print(f"search: {config.search} with {config.num_candidates} candidates (random weights: expect noise)\n")

    infer = config.infer
    infer.checkpoint, infer.image, infer.question = ckpt, image_path, sample.question
    infer.search, infer.num_candidates, infer.seed = config.search, config.num_candidates, config.seed
    infer.trace = os.path.join(workdir, "trace.json")
    code = cli.run(infer)
    with open(infer.trace) as f:
        trace = json.load(f)
    print(f"\ntrace of every candidate and judge verdict: {infer.trace} ({len(json.dumps(trace))} bytes)")
    return code
