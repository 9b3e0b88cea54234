"""Reward recipes (hybrid, guard_only, helpfulness_only), shared metrics and recipe loading."""

import pytest

import rewards
from rewards import BUILTIN_RECIPES, load_recipe
from rewards.base import RewardRules, is_refusal, is_unsafe
from rewards.guard_only import guard_only
from rewards.helpfulness_only import helpfulness_only
from rewards.hybrid import hybrid
from saferl.types import GuardVerdict, RewardInputs, SafetyLabel

SAFE = GuardVerdict(SafetyLabel.SAFE, refusal=False)
UNSAFE = GuardVerdict(SafetyLabel.UNSAFE, ("Violent",), refusal=False)
CONTROVERSIAL = GuardVerdict(SafetyLabel.CONTROVERSIAL, ("Unethical Acts",), refusal=False)
REFUSAL = GuardVerdict(SafetyLabel.SAFE, refusal=True)
UNPARSABLE = GuardVerdict(None, parse_ok=False, raw="garbled")
THINKING_SAFE = GuardVerdict(SafetyLabel.SAFE)  # prompt-style verdict: no Refusal line
STRICT = RewardRules()
LOOSE = RewardRules(controversial_is_unsafe=False, unparsable="safe")


def _inputs(answers, thinking=None, helpfulness=None):
    return RewardInputs(list(answers), list(thinking or [None] * len(answers)), helpfulness)


def test_hybrid_known_verdicts():
    inputs = _inputs(
        [UNSAFE, UNSAFE, REFUSAL, SAFE, CONTROVERSIAL, SAFE, UNPARSABLE],
        [None, None, None, THINKING_SAFE, None, UNSAFE, None],
        [3.0, -12.0, 2.0, 0.7, 1.5, 4.0, 2.5],
    )
    out = hybrid(inputs, STRICT)
    # unsafe H=3 -> min(-10, 3) = -10; unsafe H=-12 keeps -12; refusal H=2 -> -5; safe -> H;
    # controversial (strict) -> -10; safe answer but unsafe thinking -> -10; unparsable counts unsafe -> -10
    assert out.total == [-10.0, -12.0, -5.0, 0.7, -10.0, -10.0, -10.0]
    loose = hybrid(inputs, LOOSE)
    # loose: controversial -> H = 1.5; unparsable -> safe, refusal unknown -> H = 2.5
    assert loose.total == [-10.0, -12.0, -5.0, 0.7, 1.5, -10.0, 2.5]


def test_hybrid_refusal_below_cap_and_unsafe_beats_refusal():
    unsafe_refusal = GuardVerdict(SafetyLabel.UNSAFE, refusal=True)
    out = hybrid(_inputs([REFUSAL, unsafe_refusal], helpfulness=[-7.0, 1.0]), STRICT)
    assert out.total == [-7.0, -10.0]
    custom = hybrid(
        _inputs([UNSAFE, REFUSAL], helpfulness=[1.0, 1.0]), RewardRules(unsafe_cap=-3, refusal_cap=-1)
    )
    assert custom.total == [-3.0, -1.0]


def test_hybrid_needs_helpfulness():
    with pytest.raises(ValueError, match=r"hybrid.*helpfulness"):
        hybrid(_inputs([SAFE]), STRICT)


def test_guard_only():
    inputs = _inputs(
        [SAFE, UNSAFE, CONTROVERSIAL, SAFE, REFUSAL, UNPARSABLE], [None, None, None, UNSAFE, None, None]
    )
    assert guard_only(inputs, STRICT).total == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert guard_only(inputs, LOOSE).total == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]


def test_helpfulness_only():
    out = helpfulness_only(_inputs([SAFE, UNSAFE], helpfulness=[0.25, -1.5]), STRICT)
    assert out.total == [0.25, -1.5]
    assert out.components["unsafe"] == [0.0, 1.0]
    with pytest.raises(ValueError, match="helpfulness_only"):
        helpfulness_only(_inputs([SAFE]), STRICT)


def test_components_and_metrics():
    inputs = _inputs(
        [SAFE, UNSAFE, REFUSAL, CONTROVERSIAL],
        [UNPARSABLE, None, CONTROVERSIAL, None],
        [1.0, 2.0, 3.0, -2.0],
    )
    out = hybrid(inputs, STRICT)
    # Rollout 0: safe answer, unparsable thinking (counts unsafe) -> -10. 1: unsafe -> -10.
    # 2: refusal but controversial thinking (strict: unsafe) -> -10. 3: controversial -> -10.
    assert out.total == [-10.0, -10.0, -10.0, -10.0]
    assert out.components == {
        "unsafe": [1.0, 1.0, 1.0, 1.0],
        "refusal": [0.0, 0.0, 1.0, 0.0],
        "controversial": [0.0, 0.0, 1.0, 1.0],
        "helpfulness": [1.0, 2.0, 3.0, -2.0],
    }
    assert out.metrics == {
        "unsafe_rate": 1.0,
        "controversial_rate": 0.5,
        "refusal_rate": 0.25,
        "parse_failures": 1.0,
        "guard_fallbacks": 0.0,
        "reward_mean": -10.0,
        "helpfulness_mean": 1.0,
        "helpfulness_fallbacks": 0.0,
    }
    loose = hybrid(inputs, LOOSE)
    # Loose: 0 -> H = 1, 1 -> -10, 2 -> refusal min(-5, 3) = -5, 3 -> H = -2; mean = -16 / 4 = -4
    assert loose.total == [1.0, -10.0, -5.0, -2.0]
    assert loose.metrics["unsafe_rate"] == 0.25 and loose.metrics["reward_mean"] == -4.0
    # guard_only without helpfulness: no helpfulness component or metric
    g = guard_only(_inputs([SAFE, UNSAFE]), STRICT)
    assert "helpfulness" not in g.components and "helpfulness_mean" not in g.metrics
    assert g.metrics["reward_mean"] == 0.5


def test_rules_helpers_and_validation():
    assert is_unsafe(UNPARSABLE, STRICT) and not is_unsafe(UNPARSABLE, LOOSE)
    assert is_unsafe(CONTROVERSIAL, STRICT) and not is_unsafe(CONTROVERSIAL, LOOSE)
    assert not is_unsafe(SAFE, STRICT) and is_unsafe(UNSAFE, LOOSE)
    assert is_refusal(REFUSAL) and not is_refusal(SAFE) and not is_refusal(THINKING_SAFE)
    with pytest.raises(ValueError, match="unparsable"):
        RewardRules(unparsable="skip")
    with pytest.raises(ValueError, match="thinking"):
        guard_only(RewardInputs([SAFE, SAFE], [None], None), STRICT)
    with pytest.raises(ValueError, match="helpfulness"):
        hybrid(RewardInputs([SAFE, SAFE], [None, None], [1.0]), STRICT)


def test_load_recipe():
    assert set(BUILTIN_RECIPES) == {"hybrid", "guard_only", "helpfulness_only"}
    assert load_recipe("hybrid") is hybrid
    assert load_recipe("guard_only") is guard_only
    assert load_recipe("rewards.hybrid.hybrid") is hybrid
    assert load_recipe("rewards.helpfulness_only.helpfulness_only") is helpfulness_only
    assert rewards.RewardRules is RewardRules


@pytest.mark.parametrize(
    "bad", ["hybird", "rewards.hybrid.nope", "no_such_pkg.mod.fn", "rewards.base.UNPARSABLE_CHOICES"]
)
def test_load_recipe_errors_name_the_string_and_builtins(bad):
    with pytest.raises(ValueError) as err:
        load_recipe(bad)
    message = str(err.value)
    assert repr(bad) in message
    assert "guard_only, helpfulness_only, hybrid" in message


def test_per_category_caps():
    """An unsafe rollout is capped at the lowest listed cap among its verdicts' categories, else unsafe_cap."""
    rules = RewardRules(unsafe_cap=-10.0, category_caps={"Copyright Violation": -4.0, "Violent": -12.0})
    copyright_only = GuardVerdict(SafetyLabel.UNSAFE, ("Copyright Violation",), False)
    both = GuardVerdict(SafetyLabel.UNSAFE, ("Copyright Violation", "Violent"), False)
    unlisted = GuardVerdict(SafetyLabel.UNSAFE, ("PII",), False)
    out = hybrid(_inputs([copyright_only, both, unlisted], helpfulness=[2.0, 2.0, 2.0]), rules)
    assert out.total == [-4.0, -12.0, -10.0]
    # A category named only in the thinking verdict counts too.
    inputs = _inputs([unlisted], helpfulness=[0.0])
    inputs.thinking_verdicts = [copyright_only]
    assert hybrid(inputs, rules).total == [-4.0]
    with pytest.raises(ValueError, match="Violence"):
        RewardRules(category_caps={"Violence": -1.0})
