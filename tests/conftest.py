"""Fixtures shared by several test modules: the tokenizers, a tiny HF checkpoint directory, a compilation cache."""

import jax
import pytest

from llava_cot_jax.data.tokenizer import build_llama3_tokenizer, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """The small test vocabulary with Llama 3's special tokens at their real ids."""
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def llama3_tokenizer():
    """Llama 3's real 128k vocabulary (skipped where its optional dependencies are missing)."""
    pytest.importorskip("quicktok")
    pytest.importorskip("tiktoken")
    return build_llama3_tokenizer()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A tiny random HF checkpoint with the tiny tokenizer and image processor files: what a mode or a notebook
    loads as a checkpoint directory (torch builds it in seconds; a jax random init compiles for much longer)."""
    from llava_cot_jax.data.image import MllamaImageProcessor
    from llava_cot_jax.data.processor import MllamaProcessor
    from llava_cot_jax.models.mllama.config import MllamaConfig
    from llava_cot_jax.models.mllama.hf_reference import build_hf_model, save_hf_checkpoint

    config = MllamaConfig.tiny()
    path = str(tmp_path_factory.mktemp("tiny_checkpoint") / "hf")
    save_hf_checkpoint(build_hf_model(config), config, path)
    image_processor = MllamaImageProcessor(size=config.vision.image_size, max_image_tiles=config.vision.max_num_tiles)
    MllamaProcessor(image_processor, build_tiny_tokenizer()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    """One persistent compilation cache for this module's processes: the same train step compiles once."""
    path = str(tmp_path_factory.mktemp("xla"))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield path
    jax.config.update("jax_compilation_cache_dir", None)
