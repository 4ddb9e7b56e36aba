"""How much of LLaVA-CoT's update survives pure-bf16 training (bf16 parameters and AdamW moments, no fp32 master
copy, as their run kept them) at their learning rate, against fp32 master weights.

    /work/venv/bin/python benchmarks/bf16_updates.py [--steps 5] [--lr 1e-5]

Same initial weights (random, Llama's init scale 0.02; norms at 1), same batches, our train step; bf16 compute in
both runs. Reports after each step: the fraction of parameter values a bf16 run changed at all, and the
fraction of the fp32-master run's total movement (sum |w_t - w_0|) the bf16 run achieved. An AdamW step moves
every weight by about lr; bf16 keeps 8 significant bits, so a weight of magnitude 0.02 is stored in steps of
1.2e-4 and an update of 1e-5 rounds away.
"""

from __future__ import annotations

import argparse

import numpy as np

from llava_cot_jax.models.mllama.hf_reference import random_inputs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-5)
    args = parser.parse_args()

    import jax
    from flax import nnx

    from llava_cot_jax import sharding
    from llava_cot_jax.models.mllama.config import MllamaConfig
    from llava_cot_jax.models.mllama.model import MllamaForConditionalGeneration
    from llava_cot_jax.train import config as train_config
    from llava_cot_jax.train import step as step_lib

    base = MllamaConfig.bench()
    model = MllamaForConditionalGeneration(base, rngs=nnx.Rngs(0))
    params = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(args.steps):
        inputs = random_inputs(base, rng, 2, 256, [1, 1], [[4], [2]])
        labels = np.where(inputs["input_ids"] == base.image_token_id, -100, inputs["input_ids"])
        batches.append({k: v[None] for k, v in {**inputs, "labels": labels}.items()})
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])

    def runner(param_dtype, moment_dtype):
        optim_cfg = train_config.default_config().optimizer
        optim_cfg.learning_rate, optim_cfg.moment_dtype = args.lr, moment_dtype
        config = base.replace(param_dtype=param_dtype, dtype="bfloat16")
        spec = step_lib.build_step_spec(config, optim_cfg, (), mesh, 100, 100)
        return step_lib.init_state(spec, params, seed=0), step_lib.jit_train_step(spec)

    def flat(state):
        return np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(state["params"])])

    (state32, step32), (state16, step16) = runner("float32", "float32"), runner("bfloat16", "bfloat16")
    w0_32, w0_16 = flat(state32), flat(state16)
    print(
        f"bench config ({w0_32.size / 1e6:.0f}M parameters), AdamW lr {args.lr:g}, bf16 compute; jax {jax.__version__}"
    )
    print("step  bf16 values changed  bf16 movement / fp32-master movement")
    for step, batch in enumerate(batches, 1):
        device_batch = jax.device_put(batch, step_lib.batch_sharding(mesh))
        state32, _ = step32(state32, device_batch)
        state16, _ = step16(state16, device_batch)
        w32, w16 = flat(state32), flat(state16)
        changed = np.mean(w16 != w0_16)
        ratio = np.abs(w16 - w0_16).sum() / np.abs(w32 - w0_32).sum()
        print(f"{step:4d}  {changed:19.1%}  {ratio:36.1%}", flush=True)


if __name__ == "__main__":
    main()
