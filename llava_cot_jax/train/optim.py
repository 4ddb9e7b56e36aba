"""Optimizer, learning-rate schedule and which parameters train.

The model's parameters are a nested dict keyed by module path (`nnx.to_pure_dict`); its top-level groups are the
vision tower, the projector and the language model. Frozen groups are left out of the differentiated tree and of
the optimizer entirely, so they take no optimizer memory, get no gradient computation, and cannot change.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

# Parameter groups a config can freeze, and the top-level parameter names of each.
GROUPS = {
    "vision": ("vision_model", "vision_tower"),  # Mllama's and LLaVA's names
    "projector": ("multi_modal_projector", "multi_modal_projector_bias"),
    "language": ("language_model",),
    "reward_head": ("reward_head",),  # a reward model's scalar head (models/reward.py; train.objective=pairwise)
}
SCHEDULES = ("step", "cosine", "constant")


def parse_groups(freeze: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """ "vision,projector" (or a sequence) -> ("vision", "projector"), checked against GROUPS."""
    names = [n.strip() for n in (freeze.split(",") if isinstance(freeze, str) else freeze) if n.strip()]
    unknown = sorted(set(names) - set(GROUPS))
    if unknown:
        raise ValueError(f"cannot freeze {unknown}: the parameter groups are {sorted(GROUPS)}")
    if set(names) == set(GROUPS):
        raise ValueError("every parameter group is frozen: nothing would train")
    return tuple(n for n in GROUPS if n in names)


def split_params(params: Mapping, frozen_groups: tuple[str, ...]) -> tuple[dict, dict]:
    """(trainable, frozen) halves of a parameter dict, split at its top level."""
    frozen_keys = {key for group in frozen_groups for key in GROUPS[group]}
    unknown = set(params) - {key for keys in GROUPS.values() for key in keys}
    if unknown:
        raise ValueError(f"parameters outside every group: {sorted(unknown)}")
    trainable = {k: v for k, v in params.items() if k not in frozen_keys}
    frozen = {k: v for k, v in params.items() if k in frozen_keys}
    return trainable, frozen


def learning_rate_schedule(cfg, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """cfg.schedule:
    "step"      LLaVA-CoT's recipe (llama-recipes StepLR, gamma 0.85 per epoch): lr * gamma ** epoch, no warmup;
    "cosine"    linear warmup to lr, then cosine decay to lr * cfg.final_lr_fraction;
    "constant"  lr (after the warmup, if any).
    The warmup lasts cfg.warmup_steps, or, when cfg.warmup_fraction > 0, that fraction of the run's steps
    (LLaVA-1.5's recipe: 3%)."""
    lr = float(cfg.learning_rate)
    warmup_steps = cfg.warmup_steps
    if cfg.get("warmup_fraction", 0.0) > 0:
        warmup_steps = round(cfg.warmup_fraction * total_steps)
    if cfg.schedule == "step":
        decay = optax.exponential_decay(lr, max(steps_per_epoch, 1), cfg.epoch_decay, staircase=True)
        return _with_warmup(decay, lr, warmup_steps)
    if cfg.schedule == "cosine":
        warmup = min(warmup_steps, max(total_steps - 1, 0))
        return optax.warmup_cosine_decay_schedule(
            0.0 if warmup else lr, lr, warmup, max(total_steps, warmup + 1), lr * cfg.final_lr_fraction
        )
    if cfg.schedule == "constant":
        return _with_warmup(optax.constant_schedule(lr), lr, warmup_steps)
    raise ValueError(f"optimizer.schedule={cfg.schedule!r}; choose one of {SCHEDULES}")


def _with_warmup(schedule: optax.Schedule, lr: float, warmup_steps: int) -> optax.Schedule:
    if warmup_steps <= 0:
        return schedule
    ramp = optax.linear_schedule(0.0, lr, warmup_steps)
    return optax.join_schedules([ramp, lambda step: schedule(step + warmup_steps)], [warmup_steps])


def make_optimizer(cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW with optional global-norm clipping, its moments kept in cfg.moment_dtype ("float32" or
    "bfloat16"; "param" keeps them in each parameter's own dtype, as torch's AdamW does)."""
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.moment_dtype != "param":
        adamw = cast_state(adamw, jnp.dtype(cfg.moment_dtype))
    if cfg.grad_clip_norm and cfg.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw)
    return adamw


def cast_state(tx: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """`tx` with every floating-point leaf of its state stored in `dtype` after init and after each update
    (the moments are computed in the promoted dtype and rounded on the way back to the state)."""

    def cast(tree):
        return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def init(params):
        return cast(tx.init(params))

    def update(updates, state, params=None):
        updates, state = tx.update(updates, state, params)
        return updates, cast(state)

    return optax.GradientTransformation(init, update)
