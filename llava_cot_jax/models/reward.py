"""A reward model: any model of this package with a scalar head on the last real token's final hidden state.

`RewardHead` maps the decoder's [B, S, D] final hidden states to [B] rewards; `reward_model_class(Base)` is `Base`
with a `reward_head` attribute, so its parameters are the base model's (same module paths: a reward model's
checkpoint is also a loadable checkpoint of the base model) plus the subtree `reward_head`. Training
(train/pairwise.py, `train.objective = "pairwise"`) and scoring (generate/scorer.py) both build it from here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

HEAD_KEY = "reward_head"  # the parameter subtree of the head in a reward model's checkpoint


def last_token_states(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """[B, S, D] hidden states -> [B, D]: each row's state at its last position the mask marks real, so left and
    right padding both work; a row with no real token takes position 0."""
    mask = jnp.asarray(attention_mask).astype(bool)
    positions = jnp.arange(mask.shape[1])
    last = jnp.max(jnp.where(mask, positions, 0), axis=1)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


class RewardHead(nnx.Module):
    """A scalar reward from the final hidden states: the last real token's state through a Linear D -> 1."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.linear = nnx.Linear(dim, 1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """[B, S, D] hidden states and the [B, S] attention mask -> [B] rewards (float32)."""
        return self.linear(last_token_states(hidden, attention_mask).astype(jnp.float32))[:, 0]


@functools.cache
def reward_model_class(base: type) -> type:
    """`base` (a model class with `last_hidden_state(**inputs)` and `config.text.hidden_size`) with a reward head.
    Cached: one class per base, so graph definitions of equal models compare equal (one compile)."""

    class RewardModel(base):
        def __init__(self, config, *, rngs: nnx.Rngs):
            super().__init__(config, rngs=rngs)
            # The head stays float32: a reward is one number per row, its precision is cheap.
            setattr(self, HEAD_KEY, RewardHead(config.text.hidden_size, rngs=rngs))

        def reward(self, **inputs) -> jax.Array:
            """[B] rewards of a batch given as the base model's keyword inputs (attention_mask required)."""
            hidden = self.last_hidden_state(**inputs)
            return getattr(self, HEAD_KEY)(hidden, inputs["attention_mask"])

    RewardModel.__name__ = RewardModel.__qualname__ = f"Reward{base.__name__}"
    return RewardModel
