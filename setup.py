"""llava_cot_jax: LLaVA-CoT (Llama-3.2-Vision with staged reasoning) in JAX / Flax NNX."""

from setuptools import find_packages, setup

setup(
    name="llava_cot_jax",
    version="0.1.0",
    description="LLaVA-CoT in JAX/Flax NNX: Mllama port, HF<->Orbax conversion, SFT and stage-level beam search",
    packages=find_packages(include=["llava_cot_jax", "llava_cot_jax.*"]),
    package_data={"llava_cot_jax.serve": ["static/*"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "grain",
        "transformers>=4.45",
        "pillow",
        "tensorflow-datasets",
        "ml-collections",
        "safetensors",
        "numpy",
        "tqdm",
        "absl-py",
        "tensorboardX",
        "matplotlib",  # the demo's loss curve and the study's figures
    ],
    extras_require={
        # torch is pinned: unpinned it pulls a multi-GB CUDA build (docs/design.md#pinned-torch-in-the-test-extra).
        # nbclient, nbformat, ipykernel: tests/test_notebook.py executes the Colab notebook.
        # fastapi, uvicorn, openai, httpx: tests/test_serve.py runs the server and asks it with OpenAI's client;
        # playwright drives Debian's chromium (installed by .ci/run) through the page.
        # peft: tests/test_lora.py checks our LoRA against peft's on transformers' Mllama and loads our export in it.
        # ruff is pinned so that CI's lint step (.ci/run) judges with the rule set the tree was checked against.
        "test": [
            "pytest",
            "ruff==0.17.6",
            "torch==2.13.0",
            "tokenizers",
            "quicktok-v1",
            "tiktoken",
            "nbclient",
            "nbformat",
            "ipykernel",
            "fastapi",
            "uvicorn",
            "openai",
            "httpx",
            "playwright",
            "peft==0.21.2",
        ],
        "serve": ["fastapi", "uvicorn"],  # mode = "serve" (docs/serving.md)
        "tpu": ["jax[tpu]"],
        "gpu": ["jax[cuda12]"],
    },
)
