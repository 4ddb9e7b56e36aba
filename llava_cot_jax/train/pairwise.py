"""Pairwise preference training: the Bradley-Terry loss over a reward model's scores (models/reward.py).

A reward model scores a (prompt, response) sequence by the final hidden state of its last real token; trained on
pairs where one response is known to be better (`data/pairs.py`), the loss is -log sigmoid(r_better - r_worse),
the negative log-likelihood of the preference under the Bradley-Terry model. A pairwise batch holds each pair in
two consecutive rows (chosen, then rejected), so any split of the batch into even micro-batches keeps pairs whole.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llava_cot_jax.models.reward import RewardHead, last_token_states  # noqa: F401  (their home; re-exported)


def bradley_terry_loss(r_better: jax.Array, r_worse: jax.Array) -> jax.Array:
    """The mean over pairs of -log sigmoid(r_better - r_worse); log_sigmoid keeps it finite for any margin."""
    return -jnp.mean(jax.nn.log_sigmoid(jnp.asarray(r_better) - jnp.asarray(r_worse)))


def pairwise_accuracy(r_better: jax.Array, r_worse: jax.Array) -> jax.Array:
    """The fraction of pairs the rewards order correctly (a tie counts as wrong)."""
    return jnp.mean(jnp.asarray(r_better) > jnp.asarray(r_worse))


def split_pairs(rewards: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[2P] rewards of interleaved rows (chosen, rejected, chosen, ...) -> ([P] chosen, [P] rejected)."""
    return rewards[0::2], rewards[1::2]


def pairwise_sum(model, inputs: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(summed Bradley-Terry loss, number of pairs, correctly ordered pairs) of one interleaved batch: the sums
    gradient accumulation adds up over micro-batches before dividing once."""
    chosen, rejected = split_pairs(model.reward(**inputs))
    losses = -jax.nn.log_sigmoid(chosen - rejected)
    return jnp.sum(losses), jnp.int32(chosen.shape[0]), jnp.sum(chosen > rejected, dtype=jnp.int32)
