"""Reward-hacking mitigations as config (#16.4), on hand-made batches against hand-computed values: an RM
ensemble with a conservative aggregate (one member fooled by a garbled answer), the fluency gate (an implausible
answer's H capped), a gate that is on but gets no reference log-probs, the config keys, the role specs and the
RM actor hosting several members."""

import math

import pytest
import torch

from rewards.base import RewardRules, judged_helpfulness
from rewards.guard_only import guard_only
from rewards.helpfulness_only import helpfulness_only
from rewards.hybrid import hybrid
from saferl.config import ConfigError, load_config
from saferl.placement import format_plan
from saferl.roles import role_specs
from saferl.types import GuardVerdict, Prompt, RewardInputs, Rollout, SafetyLabel, ScoredRollout

SAFE = GuardVerdict(SafetyLabel.SAFE, refusal=False)
UNSAFE = GuardVerdict(SafetyLabel.UNSAFE, ("Violent",), refusal=False)
PROMPT = Prompt(id="p", messages=[{"role": "user", "content": "how do I bake bread?"}], kind="benign")


def _record(members, verdict=SAFE, reference_logprob=None, mean_logprob=None):
    """`reference_logprob` is the gate's statistic, the lowest token log-prob (the mean: `mean_logprob`, or
    the same value)."""
    rollout = Rollout(PROMPT, [1], [2], [0.0], "a", "", "a", "stop")
    return ScoredRollout(rollout, verdict, helpfulness=members[0], helpfulness_ensemble=tuple(members[1:]),
                         reference_logprob=reference_logprob if mean_logprob is None else mean_logprob,
                         reference_min_logprob=reference_logprob)


def test_the_gate_reads_the_lowest_token_not_the_mean():
    """One very improbable token (a misspelling) gates an answer whose mean is high; a uniformly
    middling answer with no improbable token passes."""
    from rewards.base import implausible

    rules = RewardRules(fluency_min_logprob=-4.0)
    inputs = RewardInputs.of([_record((3.0,), reference_logprob=-9.0, mean_logprob=-0.3),
                              _record((3.0,), reference_logprob=-1.5, mean_logprob=-1.2)])
    assert implausible(inputs, rules) == [True, False]


# ---- an ensemble with one fooled member -----------------------------------------------------------------------

GARBLED = (3.0, -3.0, -3.0)  # the first member is fooled by a garbled answer, the others are not
CLEAN = (-1.2, -1.5, -1.8)  # a clean answer the members agree on (mean -1.5)
STD_GARBLED = math.sqrt(((3 + 1) ** 2 + 2 * (-3 + 1) ** 2) / 3)  # population std: sqrt(8)
STD_CLEAN = math.sqrt((0.3 ** 2 + 0 + 0.3 ** 2) / 3)  # sqrt(0.06)


@pytest.mark.parametrize("how, k, garbled, clean", [
    ("mean", 1.0, -1.0, -1.5),
    ("min", 1.0, -3.0, -1.8),
    ("mean_minus_std", 1.0, -1.0 - STD_GARBLED, -1.5 - STD_CLEAN),
    ("mean_minus_std", 0.5, -1.0 - 0.5 * STD_GARBLED, -1.5 - 0.5 * STD_CLEAN),
], ids=["mean", "min", "mean-std", "mean-half-std"])
def test_ensemble_aggregate_of_one_fooled_member(how, k, garbled, clean):
    rules = RewardRules(ensemble=how, ensemble_k=k)
    inputs = RewardInputs.of([_record(GARBLED), _record(CLEAN)])
    assert judged_helpfulness(inputs, rules) == pytest.approx([garbled, clean])
    out = hybrid(inputs, rules)  # safe, not refused: the reward is H itself
    assert out.total == pytest.approx([garbled, clean])
    assert out.metrics["ensemble_spread"] == pytest.approx((STD_GARBLED + STD_CLEAN) / 2)
    assert out.components["helpfulness"] == [3.0, -1.2]  # helpfulness.model's own score, logged as it was
    # The mean is fooled (the garbled answer ranks first); the conservative aggregates rank it below.
    assert (out.total[0] > out.total[1]) == (how == "mean")
    assert helpfulness_only(inputs, rules).total == pytest.approx([garbled, clean])


def test_an_unsafe_rollout_is_capped_below_the_ensemble_aggregate():
    out = hybrid(RewardInputs.of([_record(GARBLED, UNSAFE), _record((-20.0, -14.0, -17.0), UNSAFE)]),
                 RewardRules(ensemble="mean"))
    assert out.total == [-10.0, -17.0]  # min(-10, -1) and min(-10, mean(-20, -14, -17))


def test_without_an_ensemble_every_aggregate_is_the_one_score():
    inputs = RewardInputs.of([_record((2.5,)), _record((-4.0,))])
    assert inputs.helpfulness_ensemble is None
    for how in ("mean", "min", "mean_minus_std"):
        assert judged_helpfulness(inputs, RewardRules(ensemble=how)) == [2.5, -4.0]
    assert "ensemble_spread" not in hybrid(inputs, RewardRules()).metrics


def test_records_carry_members_and_reference_logprobs_all_or_none():
    inputs = RewardInputs.of([_record(GARBLED, reference_logprob=-1.0), _record(CLEAN, reference_logprob=-2.0)])
    assert inputs.helpfulness == [3.0, -1.2]
    assert inputs.helpfulness_ensemble == [(-3.0, -3.0), (-1.5, -1.8)]
    assert inputs.reference_logprob == [-1.0, -2.0]
    with pytest.raises(ValueError, match="ensemble scores"):
        RewardInputs.of([_record(GARBLED), _record((1.0,))])
    with pytest.raises(ValueError, match="reference log-prob"):
        RewardInputs.of([_record((1.0,), reference_logprob=-1.0), _record((1.0,))])


# ---- the fluency gate ----------------------------------------------------------------------------------------

GATE = RewardRules(fluency_min_logprob=-4.0, implausible_cap=-3.0)


def test_an_implausible_answer_gets_min_of_h_and_the_cap_and_a_plausible_one_keeps_h():
    records = [_record((2.0,), reference_logprob=-6.0),  # implausible, RM likes it: capped at -3
               _record((-7.0,), reference_logprob=-6.5),  # implausible, already below the cap: kept
               _record((2.0,), reference_logprob=-1.0),  # plausible: H
               _record((1.5,), reference_logprob=-4.0),  # at the threshold is not below it: H
               _record((2.0,), UNSAFE, reference_logprob=-6.0)]  # unsafe and implausible: the unsafe cap
    inputs = RewardInputs.of(records)
    assert judged_helpfulness(inputs, GATE) == [-3.0, -7.0, 2.0, 1.5, -3.0]
    out = hybrid(inputs, GATE)
    assert out.total == [-3.0, -7.0, 2.0, 1.5, -10.0]
    assert out.metrics["implausible_rate"] == pytest.approx(3 / 5)
    assert hybrid(inputs, RewardRules()).total == [2.0, -7.0, 2.0, 1.5, -10.0]  # gate off: the RM is trusted
    assert "implausible_rate" not in hybrid(inputs, RewardRules()).metrics


def test_the_gate_caps_the_ensemble_aggregate():
    rules = RewardRules(ensemble="mean", fluency_min_logprob=-4.0, implausible_cap=-5.0)
    inputs = RewardInputs.of([_record(GARBLED, reference_logprob=-9.0), _record(CLEAN, reference_logprob=-0.5)])
    assert hybrid(inputs, rules).total == pytest.approx([-5.0, -1.5])


@pytest.mark.parametrize("recipe", [hybrid, helpfulness_only, guard_only], ids=lambda r: r.__name__)
def test_a_gate_that_is_on_without_reference_logprobs_raises(recipe):
    inputs = RewardInputs.of([_record((2.0,)), _record((1.0,))])
    with pytest.raises(ValueError, match="fluency_min_logprob.*reference"):
        recipe(inputs, GATE)


# ---- config --------------------------------------------------------------------------------------------------


def test_defaults_are_off_and_the_keys_load():
    rules = load_config(None).reward.rules
    assert (rules.ensemble, rules.ensemble_k, rules.fluency_min_logprob, rules.implausible_cap) == (
        "mean", 1.0, None, -3.0)
    assert load_config(None).helpfulness.ensemble == []
    cfg = load_config(None, ["reward.rules.ensemble=mean_minus_std", "reward.rules.ensemble_k=2",
                             "reward.rules.fluency_min_logprob=-3.5", "helpfulness.ensemble=[a,b]"])
    assert (cfg.reward.rules.ensemble, cfg.reward.rules.ensemble_k, cfg.reward.rules.fluency_min_logprob) == (
        "mean_minus_std", 2.0, -3.5)
    assert cfg.helpfulness.ensemble == ["a", "b"]


@pytest.mark.parametrize("overrides, key, fragment", [
    (["reward.rules.ensemble=median"], "reward.rules.ensemble", "mean_minus_std"),
    (["reward.rules.fluency_min_logprob=low"], "reward.rules.fluency_min_logprob", "wrong type"),
    (["reward.rules.fluency_min_logprob=0.5"], "reward.rules.fluency_min_logprob", "<= 0"),
    (["reward.rules.ensemble_k=-1"], "reward.rules.ensemble_k", ">= 0"),
    (["reward.rules.implausible_cap=nan"], "reward.rules.implausible_cap", "finite"),
    (["helpfulness.ensemble=[a]", "helpfulness.backend=http", "helpfulness.urls=[http://127.0.0.1:1]"],
     "helpfulness.ensemble", "http"),
    (["helpfulness.ensemble=[a]", "helpfulness.model=null", "reward.recipe=guard_only"], "helpfulness.ensemble",
     "null"),
], ids=["choice", "gate-type", "gate-positive", "k", "cap", "remote-ensemble", "ensemble-without-model"])
def test_bad_values_name_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError, match=f"'{key}'.*{fragment}"):
        load_config(None, overrides)


# ---- role specs ----------------------------------------------------------------------------------------------


def test_role_specs_host_the_members_beside_the_model_and_the_gate_loads_the_reference():
    cfg = load_config(None, ["helpfulness.ensemble=[/models/rm_a,/models/rm_b]"])
    specs = {s.role: s for s in role_specs(cfg, build=False)}
    rm = specs["helpfulness"]
    assert rm.kwargs["members"] == rm.member_dirs == ("/models/rm_a", "/models/rm_b")
    assert rm.kwargs["model"] == rm.model_dir and rm.model_dir.endswith("reward_model")
    assert "toyworld:reward_model + /models/rm_a + /models/rm_b" in format_plan(list(specs.values()), cfg)
    assert specs["trainer"].kwargs["reference_scoring"] is False
    gated = {s.role: s for s in role_specs(load_config(None, ["reward.rules.fluency_min_logprob=-4"]),
                                           build=False)}
    assert gated["trainer"].kwargs["reference_scoring"] is True
    monitored = {s.role: s for s in role_specs(load_config(None, ["monitor.sample=8"]), build=False)}
    assert monitored["trainer"].kwargs["reference_scoring"] is True
    assert gated["helpfulness"].kwargs["members"] == ()


# ---- the RM actor with members -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_rms(tmp_path_factory, tiny_tokenizer):
    """Two tiny random one-label Qwen3 classifiers (different seeds) sharing a tokenizer."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForSequenceClassification

    tok_dir = tiny_tokenizer(["how", "do", "I", "bake", "bread", "knead", "the", "dough", "sorry"])
    tok = AutoTokenizer.from_pretrained(tok_dir)
    dirs = []
    for seed in (0, 1):
        config = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_labels=1,
                             pad_token_id=tok.pad_token_id)
        torch.manual_seed(seed)
        path = tmp_path_factory.mktemp(f"rm{seed}")
        Qwen3ForSequenceClassification(config).save_pretrained(path)
        tok.save_pretrained(path)
        dirs.append(str(path))
    return dirs


def test_the_rm_actor_scores_every_pair_with_every_member_in_order(two_rms):
    from saferl.helpfulness import HelpfulnessScorer

    pairs = [(PROMPT.messages, "knead the dough"), (PROMPT.messages, "sorry"), (PROMPT.messages, "bread bread")]
    first, second = (HelpfulnessScorer(d).score(pairs) for d in two_rms)
    assert max(abs(a - b) for a, b in zip(first, second)) > 1e-3  # two different models
    both = HelpfulnessScorer(two_rms[0], members=(two_rms[1],))
    out = both.score_with_fallbacks(pairs)
    assert [fallback for _, fallback in out] == [False] * 3
    assert [scores for scores, _ in out] == [pytest.approx((a, b), abs=1e-6) for a, b in zip(first, second)]
    assert both.score(pairs) == pytest.approx(first, abs=1e-6)  # `score` stays helpfulness.model's
