"""SWIRES: stage-wise search with a reward model and backtracking (LLaVA-CoT's latest paper version; theirs:
PKU-YuanGroup/LLaVA-CoT `inference/VLMEvalKit/swires.py`, `llama_vision.swires`).

Their procedure: write the summary; then in rounds, sample 4 captions, keep the 2 the reward model ranks first,
sample 2 reasonings after each, score them; stop when the second-best reasoning reward so far is above the cutoff
(their reward mean + 0.2533 std), else resample the captions (a backtrack), at most 4 times; write a conclusion
after each of the 3 best reasonings and keep the one the reward model ranks first.

Here, over the searcher's KV-cache steps (one question at a time): every stage samples N candidates and keeps the
highest reward (`scorer.RewardScorer`, one batched call per stage); after the reasoning, a round passes when its
second-best reward is above `swires_threshold` (the best, with N = 1); otherwise the caption and reasoning are
resampled from the kept summary, at most `swires_max_backtracks` times; the conclusion (N candidates, kept by
reward) continues the round whose best reasoning scored highest. Differences from theirs: the summary is also
chosen by reward among N (theirs: one sample), one caption is kept per round (theirs: two), and the conclusion
continues the single best reasoning of all rounds (theirs: one conclusion after each of the three best).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def fork(state):
    """A copy of a decode state (decoding donates its input; a kept state must survive it)."""
    return jax.tree.map(jnp.copy, state)


def run(searcher, batch, state, rows, step: Callable):
    """SWIRES over one question; `step(state, rows, index, stage)` runs one stage (sample, keep by reward) and
    returns (state, rows) as `Searcher._step` does. Returns the final (state, rows)."""
    cfg = searcher.config
    if len(batch.questions) != 1:
        raise ValueError("method swires searches one question at a time (batch_size=1)")
    state, rows = step(state, rows, 0, "SUMMARY")
    if batch.ended[0]:
        return state, rows
    base = (fork(state), rows, batch.accepted[0], dict(batch.stages[0]))
    best = None
    for round_index in range(cfg.swires_max_backtracks + 1):
        state, rows = (fork(base[0]) if round_index < cfg.swires_max_backtracks else base[0]), base[1]
        batch.accepted[0], batch.stages[0], batch.ended[0] = base[2], dict(base[3]), False
        for offset, stage in enumerate(("CAPTION", "REASONING")):
            state, rows = step(state, rows, 1 + 2 * round_index + offset, stage)
            batch.traces[0][-1]["round"] = round_index
            if batch.ended[0]:
                break
        rewards = sorted(batch.traces[0][-1].get("rewards") or [float("inf")], reverse=True)
        if best is None or rewards[0] > best[0]:
            best = (rewards[0], state, rows, batch.accepted[0], dict(batch.stages[0]), bool(batch.ended[0]))
        if batch.ended[0] or rewards[min(1, len(rewards) - 1)] > cfg.swires_threshold:
            break
    _, state, rows, batch.accepted[0], batch.stages[0], batch.ended[0] = best
    if not batch.ended[0]:
        state, rows = step(state, rows, 2 * cfg.swires_max_backtracks + 3, "CONCLUSION")
    return state, rows
