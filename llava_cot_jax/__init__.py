"""LLaVA-CoT in JAX / Flax NNX.

Public entry points are imported lazily so that `import llava_cot_jax` stays cheap and light modules
(data, tools) do not pull in the model stack.
"""

import importlib

_LAZY = {
    "from_hf": "llava_cot_jax.models.mllama.params",
    "MllamaConfig": "llava_cot_jax.models.mllama.config",
    "MllamaForConditionalGeneration": "llava_cot_jax.models.mllama.model",
    "MllamaProcessor": "llava_cot_jax.data.processor",
    "MllamaImageProcessor": "llava_cot_jax.data.image",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llava_cot_jax' has no attribute {name!r}")
