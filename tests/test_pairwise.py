"""The Bradley-Terry pairwise loss, last-token pooling and the reward head."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_cot_jax.train import pairwise


def test_loss_matches_hand_computed_value():
    # Margins 1, -2, 0: -log sigmoid(m) = log(1 + exp(-m)).
    better, worse = jnp.array([2.0, 0.0, 0.5]), jnp.array([1.0, 2.0, 0.5])
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(2.0)) + math.log(2.0)) / 3
    assert abs(float(pairwise.bradley_terry_loss(better, worse)) - expected) < 1e-6


def test_loss_is_finite_for_huge_margins():
    loss = pairwise.bradley_terry_loss(jnp.array([1e4, -1e4]), jnp.array([0.0, 0.0]))
    assert np.isfinite(float(loss)) and abs(float(loss) - 1e4 / 2) < 1e-2


def test_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        better, worse = jnp.asarray(rng.normal(size=5)), jnp.asarray(rng.normal(size=5))
        assert better.dtype == jnp.float64
        grad_better, grad_worse = jax.grad(pairwise.bradley_terry_loss, argnums=(0, 1))(better, worse)
        # Analytically d/d r_better = -sigmoid(r_worse - r_better) / n, and the opposite for r_worse.
        np.testing.assert_allclose(grad_better, -jax.nn.sigmoid(worse - better) / 5, rtol=1e-12)
        np.testing.assert_allclose(grad_worse, -grad_better, rtol=1e-12)
        eps = 1e-6
        for i in range(5):
            step = jnp.zeros(5).at[i].set(eps)
            central = (
                pairwise.bradley_terry_loss(better + step, worse) - pairwise.bradley_terry_loss(better - step, worse)
            ) / (2 * eps)
            assert abs(float(central) - float(grad_better[i])) < 1e-8


def test_last_token_pooling_on_padded_batch():
    hidden = jnp.arange(3 * 5 * 2, dtype=jnp.float32).reshape(3, 5, 2)
    mask = jnp.array(
        [
            [1, 1, 1, 0, 0],  # right-padded: last real token at 2
            [0, 0, 1, 1, 1],  # left-padded: at 4
            [1, 1, 1, 1, 1],  # no padding: at 4
        ]
    )
    pooled = pairwise.last_token_states(hidden, mask)
    np.testing.assert_array_equal(pooled, np.stack([hidden[0, 2], hidden[1, 4], hidden[2, 4]]))


def test_reward_head_scores_the_last_real_token():
    head = pairwise.RewardHead(4, rngs=nnx.Rngs(0))
    hidden = jax.random.normal(jax.random.key(1), (2, 6, 4))
    mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    rewards = head(hidden, mask)
    assert rewards.shape == (2,)
    # What padding holds does not change the reward, the last real token's state does.
    changed_pad = hidden.at[0, 4:].set(100.0)
    np.testing.assert_allclose(head(changed_pad, mask), rewards, rtol=1e-6)
    changed_last = hidden.at[0, 3].add(1.0)
    assert abs(float(head(changed_last, mask)[0] - rewards[0])) > 1e-4
    kernel, bias = head.linear.kernel[...], head.linear.bias[...]
    np.testing.assert_allclose(
        rewards, hidden[:, [3, 5]].diagonal(axis1=0, axis2=1).T @ kernel[:, 0] + bias[0], rtol=1e-5
    )


def test_reward_head_learns_a_preference():
    # A few gradient steps on the loss order two fixed sequences the way the pairs say.
    head = pairwise.RewardHead(3, rngs=nnx.Rngs(0))
    better = jax.random.normal(jax.random.key(2), (4, 5, 3))
    worse = jax.random.normal(jax.random.key(3), (4, 5, 3))
    mask = jnp.ones((4, 5), jnp.int32)

    def loss(model):
        return pairwise.bradley_terry_loss(model(better, mask), model(worse, mask))

    @nnx.jit
    def descend(model):
        grads = nnx.grad(loss)(model)
        nnx.update(model, jax.tree.map(lambda p, g: p - 0.5 * g, nnx.state(model, nnx.Param), grads))

    start = float(loss(head))
    for _ in range(30):
        descend(head)
    assert float(loss(head)) < start
    assert float(pairwise.pairwise_accuracy(head(better, mask), head(worse, mask))) == 1.0
