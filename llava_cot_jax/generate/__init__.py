"""Generation over a model: `generate(model, **inputs, max_new_tokens=...)` is transformers' generate (sampler.py);
stage_search.py holds the LLaVA-CoT searches."""

from llava_cot_jax.generate.sampler import generate

__all__ = ["generate"]
