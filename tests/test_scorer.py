"""The pluggable scorer (generate/scorer.py), SWIRES's control flow (generate/swires.py) with a scripted model and
scripted rewards, the reward scorer on a tiny random reward model, and the pairwise training objective."""

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from scripted_model import ScriptedModel

from llava_cot_jax.data import chat
from llava_cot_jax.data.image import MllamaImageProcessor
from llava_cot_jax.data.processor import MllamaProcessor
from llava_cot_jax.generate import scorer as scorer_lib
from llava_cot_jax.generate import stage_search as SS
from llava_cot_jax.models import reward
from llava_cot_jax.models.mllama.config import MllamaConfig
from llava_cot_jax.models.mllama.model import MllamaForConditionalGeneration
from llava_cot_jax.train import step as step_lib

ANSWER = (
    "<SUMMARY> Count the cubes. </SUMMARY>\n\n<CAPTION> Two cubes. </CAPTION>\n\n"
    "<REASONING> One and one make two. </REASONING>\n\n<CONCLUSION> B </CONCLUSION>"
)


class ScriptedRewards:
    """A scorer whose rewards are scripted per stage kind: `rewards[kind]` is a list of reward vectors, one per
    call of that kind (the last repeats)."""

    def __init__(self, rewards):
        self.rewards, self.calls = rewards, []

    def select(self, step):
        self.calls.append(step.kind)
        script = self.rewards[step.kind]
        values = script[min(sum(k == step.kind for k in self.calls) - 1, len(script) - 1)]
        b = len(step.groups)
        trace = [{"rewards": list(values), "scorer_tokens": {"read": 7, "generated": 0}} for _ in range(b)]
        winners = [int(np.argmax(values)) if q in step.live else 0 for q in range(b)]
        return scorer_lib.Selection(winners, trace, [list(values)] * b)


@pytest.fixture(scope="module")
def scripted(tiny_tokenizer):
    model = ScriptedModel(tiny_tokenizer, lambda prompt: ANSWER)
    processor = MllamaProcessor(MllamaImageProcessor(size=28, max_image_tiles=4), tiny_tokenizer)
    return model, processor


def _swires(scripted, reasoning_rewards, max_backtracks=2, threshold=0.0):
    model, processor = scripted
    cfg = SS.SearchConfig(
        method="swires",
        scorer="reward",
        num_candidates=2,
        stage_max_new_tokens=32,
        swires_threshold=threshold,
        swires_max_backtracks=max_backtracks,
    )
    flat = {"summary": [[0.0, 1.0]], "caption": [[1.0, 0.0]], "reasoning": reasoning_rewards, "conclusion": [[0, 2]]}
    scorer = ScriptedRewards(flat)
    result = SS.Searcher(model, processor, cfg, scorer=scorer).ask(["How many cubes?"])[0]
    return result, scorer


def test_swires_backtracks_while_the_second_best_reward_is_under_the_threshold(scripted):
    # round 0: second best -1 < 0 (backtrack); round 1: second best 0.5 > 0 (passes)
    result, scorer = _swires(scripted, [[3.0, -1.0], [2.0, 0.5]])
    assert [t["step"] for t in result.trace] == [
        "SUMMARY",
        "CAPTION",
        "REASONING",
        "CAPTION",
        "REASONING",
        "CONCLUSION",
    ]
    assert [t.get("round") for t in result.trace[1:5]] == [0, 0, 1, 1]
    assert scorer.calls.count("caption") == 2 and result.trace[-1]["winner"] == 1
    # the answer holds one caption and one reasoning (the rolled-back round is in the trace only)
    assert result.text.count("<CAPTION>") == 1 and result.text.count("<REASONING>") == 1
    assert result.conclusion == "B" and result.trace[0]["scorer_tokens"] == {"read": 7, "generated": 0}


def test_swires_stops_at_once_when_the_first_round_passes_and_is_bounded_by_max_backtracks(scripted):
    result, _ = _swires(scripted, [[1.0, 1.0]])
    assert [t["step"] for t in result.trace] == ["SUMMARY", "CAPTION", "REASONING", "CONCLUSION"]
    result, scorer = _swires(scripted, [[-1.0, -2.0]], max_backtracks=2)
    assert scorer.calls.count("reasoning") == 3  # the first round and two backtracks, then the conclusion anyway
    assert result.trace[-1]["step"] == "CONCLUSION"


def test_swires_needs_the_reward_scorer():
    with pytest.raises(ValueError, match="scorer=reward"):
        SS.SearchConfig(method="swires")
    with pytest.raises(ValueError, match="scorer must be"):
        SS.SearchConfig(scorer="oracle")


def test_stage_search_keeps_the_scripted_argmax(scripted):
    model, processor = scripted
    cfg = SS.SearchConfig(scorer="reward", num_candidates=3, stage_max_new_tokens=32)
    rewards = {k: [[0.0, 2.0, 1.0]] for k in ("summary", "caption", "reasoning", "conclusion")}
    result = SS.Searcher(model, processor, cfg, scorer=ScriptedRewards(rewards)).ask(["How many cubes?"])[0]
    assert [t["winner"] for t in result.trace] == [1, 1, 1, 1]
    assert all(t["rewards"] == [0.0, 2.0, 1.0] and t["scorer_tokens"]["read"] == 7 for t in result.trace)


@pytest.fixture(scope="module")
def tiny_reward_model():
    config = MllamaConfig.tiny(scan_layers=False).replace(dtype="float32", param_dtype="float32")
    return reward.reward_model_class(MllamaForConditionalGeneration)(config, rngs=nnx.Rngs(3))


def test_reward_scorer_scores_in_one_call_as_one_at_a_time_and_picks_the_argmax(tiny_reward_model, tiny_tokenizer):
    rs = scorer_lib.RewardScorer(tiny_reward_model, tiny_tokenizer)
    texts = [["<CAPTION> two cubes </CAPTION>", "<CAPTION> a red ball </CAPTION>", "<CAPTION> x </CAPTION>"]] * 2
    step = scorer_lib.StepCandidates(
        "caption",
        "CAPTION",
        ["How many?", "Which colour?"],
        ["<SUMMARY> s </SUMMARY>\n\n"] * 2,
        [[None] * 3] * 2,
        texts,
        [0, 1],
    )
    selection = rs.select(step)
    for q in range(2):
        alone = [float(rs.score([step.questions[q]], [step.prefixes[q] + t], [q])[0]) for t in texts[q]]
        np.testing.assert_allclose(selection.scores[q], alone, rtol=1e-4, atol=1e-5)
        assert selection.winners[q] == int(np.argmax(alone)) and len(set(np.round(alone, 6))) == 3
        assert selection.trace[q]["scorer_tokens"]["read"] > 0


def constant_adam() -> ml_collections.ConfigDict:
    """Plain Adam at a constant 1e-3: the optimizer settings of the pairwise-step tests."""
    return ml_collections.ConfigDict(
        dict(
            learning_rate=1e-3,
            schedule="constant",
            epoch_decay=1.0,
            warmup_steps=0,
            final_lr_fraction=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            grad_clip_norm=0.0,
            moment_dtype="float32",
        )
    )


def test_pairwise_objective_lowers_the_loss_on_a_fixed_batch():
    config = MllamaConfig.tiny(scan_layers=True).replace(dtype="float32", param_dtype="float32")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    optim = constant_adam()
    spec = step_lib.build_step_spec(config, optim, (), mesh, 10, 10, objective="pairwise")
    model = reward.reward_model_class(MllamaForConditionalGeneration)(config, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert reward.HEAD_KEY in params
    state = step_lib.init_state(spec, params, seed=0)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 200, (1, 4, 16)).astype(np.int32)  # [micro, 2 pairs x (chosen, rejected), seq]
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": np.full_like(ids, chat.IGNORE_INDEX)}
    train = step_lib.jit_train_step(spec)
    losses = []
    for _ in range(5):
        state, metrics = train(state, batch)
        losses.append(float(metrics["loss"]))
    assert metrics["supervised_tokens"] == 2  # pairs
    assert losses[-1] < losses[0] - 0.05, losses


def test_sft_params_gain_a_reward_head_and_base_keys_stay():
    config = MllamaConfig.tiny(scan_layers=True)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    optim = constant_adam()
    spec = step_lib.build_step_spec(config, optim, (), mesh, 1, 1, objective="pairwise")
    base = {k: v for k, v in step_lib.abstract_params(spec).items() if k != reward.HEAD_KEY}
    completed = step_lib.with_reward_head(spec, base, 0)
    assert set(completed) == set(base) | {reward.HEAD_KEY}
    assert completed[reward.HEAD_KEY]["linear"]["kernel"].shape == (config.text.hidden_size, 1)
