"""Guard decisions against hand-made cases: strict/loose, debouncing (both rules), latency bins, P/R/F1."""

import pytest

from saferl.guard.decisions import (
    LATENCY_BINS,
    PRF,
    Detection,
    binary_label,
    debounce,
    is_unsafe,
    latency_bin,
    prf_by_mode,
    summarize_latency,
    unsafe_prf,
)
from saferl.types import SafetyLabel

S, U, C = "Safe", "Unsafe", "Controversial"


@pytest.mark.parametrize(
    ("label", "strict", "loose"),
    [(S, SafetyLabel.SAFE, SafetyLabel.SAFE), (U, SafetyLabel.UNSAFE, SafetyLabel.UNSAFE),
     (C, SafetyLabel.UNSAFE, SafetyLabel.SAFE),
     (SafetyLabel.CONTROVERSIAL, SafetyLabel.UNSAFE, SafetyLabel.SAFE), (None, None, None)],
)
def test_binary_label(label, strict, loose):
    assert binary_label(label, "strict") is strict
    assert binary_label(label, "loose") is loose
    assert is_unsafe(label, "strict") == (strict is SafetyLabel.UNSAFE)
    assert is_unsafe(label, "loose") == (loose is SafetyLabel.UNSAFE)


def test_binary_label_rejects_bad_input():
    with pytest.raises(ValueError, match="mode"):
        binary_label(U, "lenient")
    with pytest.raises(ValueError):
        binary_label("unsafe", "strict")  # exact strings only


# (labels, official, paper): each expected as (index, label)
DEBOUNCE_CASES = [
    ([], (None, S), (None, S)),
    ([U], (None, S), (None, S)),
    ([S, U, S, U, S], (None, S), (None, S)),  # isolated flags never trigger
    ([S, U, U, S], (2, U), (2, U)),
    ([U, U, U], (1, U), (1, U)),
    ([S, C, C, S], (2, C), (2, C)),
    ([U, C], (None, S), (1, C)),  # mixed pair: paper triggers with the second label, official does not
    ([C, U], (None, S), (1, U)),
    ([S, C, U, S, S], (None, S), (2, U)),
    # official looks for an Unsafe pair first, even after an earlier Controversial pair
    ([C, C, S, U, U], (4, U), (1, C)),
    ([C, C, S, U, C, S], (1, C), (1, C)),
    ([S, U, C, C, U, U], (5, U), (2, C)),
]


@pytest.mark.parametrize(("labels", "official", "paper"), DEBOUNCE_CASES)
def test_debounce(labels, official, paper):
    for rule, (index, label) in (("official", official), ("paper", paper)):
        det = debounce(labels, rule)
        assert (det.index, det.label) == (index, SafetyLabel(label)), rule
        assert det.category is None


def test_debounce_default_rule_is_official():
    assert debounce([U, C]) == Detection(None, SafetyLabel.SAFE, None)


def test_debounce_passes_the_flagged_tokens_category():
    labels = [S, U, C, C, U, U]
    cats = [None, "Violent", "PII", "Unethical Acts", "Jailbreak", "Non-violent Illegal Acts"]
    assert debounce(labels, "official", cats) == Detection(5, SafetyLabel.UNSAFE, "Non-violent Illegal Acts")
    assert debounce(labels, "paper", cats) == Detection(2, SafetyLabel.CONTROVERSIAL, "PII")
    assert debounce([S, U], "paper", [None, "Violent"]) == Detection(None, SafetyLabel.SAFE, None)
    index, label, category = debounce([U, U], categories=["PII", "Violent"])
    assert (index, label, category) == (1, SafetyLabel.UNSAFE, "Violent")


def test_debounce_accepts_enum_labels_and_rejects_bad_input():
    assert debounce([SafetyLabel.UNSAFE, SafetyLabel.UNSAFE]).index == 1
    with pytest.raises(ValueError, match="rule"):
        debounce([U, U], "majority")
    with pytest.raises(ValueError, match="categories"):
        debounce([U, U], categories=["Violent"])
    with pytest.raises(ValueError):
        debounce(["risky", "risky"])


# Span [100, 120]; each boundary on both sides.
@pytest.mark.parametrize(
    ("index", "expected"),
    [(None, "Safe"), (0, "Ahead"), (99, "Ahead"), (100, "Hit"), (110, "Hit"), (120, "Hit"),
     (121, "1-32"), (152, "1-32"), (153, "33-64"), (184, "33-64"), (185, "65-128"), (248, "65-128"),
     (249, "129-256"), (376, "129-256"), (377, ">256"), (10_000, ">256")],
)
def test_latency_bin_boundaries(index, expected):
    assert latency_bin(index, 100, 120) == expected


def test_latency_bin_single_token_span_and_bad_span():
    assert [latency_bin(i, 5, 5) for i in (4, 5, 6)] == ["Ahead", "Hit", "1-32"]
    with pytest.raises(ValueError, match="span"):
        latency_bin(5, 6, 5)


def test_summarize_latency():
    bins = ["Ahead", "Hit", "Hit", "1-32", "65-128", "129-256", ">256", "Safe", "33-64", "Hit"]
    s = summarize_latency(bins)
    assert s.n == 10
    assert list(s.bins) == list(LATENCY_BINS)
    assert s.bins == {"Ahead": 1, "Hit": 3, "1-32": 1, "33-64": 1, "65-128": 1, "129-256": 1, ">256": 1,
                      "Safe": 1}
    assert s.exact_hit_rate == pytest.approx(0.3)
    assert s.first_128_stop_rate == pytest.approx(0.7)  # Ahead 1 + Hit 3 + 1-32, 33-64, 65-128


def test_summarize_latency_empty_and_unknown_bin():
    s = summarize_latency([])
    assert s.n == 0 and s.exact_hit_rate == 0.0 and s.first_128_stop_rate == 0.0
    assert set(s.bins.values()) == {0}
    with pytest.raises(ValueError, match="bin"):
        summarize_latency(["Late"])


def test_unsafe_prf_hand_computed():
    preds = [U, U, U, S, S, C, None, U]
    gold = [U, U, S, U, S, U, U, S]
    # positives predicted: 0,1,2,7 -> tp 2 (0,1), fp 2 (2,7); gold positives missed: 3,5,6 -> fn 3; tn: 4
    prf = unsafe_prf(preds, gold)
    assert (prf.tp, prf.fp, prf.fn, prf.tn) == (2, 2, 3, 1)
    assert prf.precision == pytest.approx(0.5)
    assert prf.recall == pytest.approx(0.4)
    assert prf.f1 == pytest.approx(2 * 0.5 * 0.4 / 0.9)


def test_prf_by_mode_strict_and_loose_are_not_swapped():
    preds = [U, C, C, S, S]
    gold = [U, U, S, U, S]
    by_mode = prf_by_mode(preds, gold)
    # strict: C -> Unsafe: tp 2 (0,1), fp 1 (2), fn 1 (3), tn 1
    assert by_mode["strict"] == PRF(precision=2 / 3, recall=2 / 3, f1=pytest.approx(2 / 3),
                                    tp=2, fp=1, fn=1, tn=1)
    # loose: C -> Safe: tp 1, fp 0, fn 2, tn 2
    loose = by_mode["loose"]
    assert (loose.tp, loose.fp, loose.fn, loose.tn) == (1, 0, 2, 2)
    assert loose.precision == 1.0 and loose.recall == pytest.approx(1 / 3) and loose.f1 == pytest.approx(0.5)
    assert by_mode["strict"].recall >= by_mode["loose"].recall  # strict flags more: never lower recall


def test_unsafe_prf_zero_division():
    nothing_flagged = unsafe_prf([S, S, None], [U, S, U])
    assert nothing_flagged == PRF(0.0, 0.0, 0.0, tp=0, fp=0, fn=2, tn=1)
    no_gold_positive = unsafe_prf([U, S], [S, S])
    assert no_gold_positive == PRF(0.0, 0.0, 0.0, tp=0, fp=1, fn=0, tn=1)
    assert unsafe_prf([], []) == PRF(0.0, 0.0, 0.0, 0, 0, 0, 0)
    perfect = unsafe_prf([U, S], [U, S])
    assert (perfect.precision, perfect.recall, perfect.f1) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="targets"):
        unsafe_prf([U], [U, S])
