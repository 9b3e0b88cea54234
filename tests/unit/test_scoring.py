"""Scoring hands back one record per rollout: each rollout's own answer and thinking verdicts, RM score and
fallback flag, also when groups finish out of order (#15.1)."""

from saferl.scoring import generate_and_score, score_rollouts
from saferl.types import GuardVerdict, Prompt, Rollout, SafetyLabel

SAMPLING = dict(temperature=1.0, top_p=1.0, max_new_tokens=8, seed=0)


class Done:
    """A call that has already finished (what a handle's pending call looks like)."""

    def __init__(self, value):
        self.value = value

    def done(self):
        return True

    def result(self):
        return self.value


class EchoGuard:
    """A verdict whose raw text is the text it judged: tells which verdict went to which rollout."""

    def moderate(self, items):
        return Done([GuardVerdict(SafetyLabel.SAFE, raw=item.response) for item in items])


class LengthRM:
    """Scores an answer by its length; answers ending in '!' get the fallback flag."""

    def score(self, pairs):
        return Done([((float(len(answer)),), answer.endswith("!")) for _, answer in pairs])


def _rollout(group, answer, thinking=""):
    prompt = Prompt(f"p{group}", [{"role": "user", "content": f"q{group}"}])
    return Rollout(prompt, [1], [2], [0.0], answer, thinking, answer, "stop", group=group)


def _view(records):
    return [(s.rollout.answer, s.answer_verdict.raw, s.thinking_verdict.raw if s.thinking_verdict else None,
             s.helpfulness, s.helpfulness_fallback, s.reward) for s in records]


def test_each_rollout_gets_its_own_verdicts_and_score():
    """Thinking verdicts follow their rollouts when only some rollouts think (the old code split the guard's
    reply at n and scattered the tail by index)."""
    rollouts = [_rollout(0, "a", "think-a"), _rollout(0, "bb"), _rollout(1, "ccc!", "think-c")]
    assert _view(score_rollouts(rollouts, EchoGuard(), LengthRM())) == [
        ("a", "a", "think-a", 1.0, False, None),
        ("bb", "bb", None, 2.0, False, None),
        ("ccc!", "ccc!", "think-c", 4.0, True, None)]
    without_rm = score_rollouts(rollouts, EchoGuard(), None)
    assert [(s.helpfulness, s.helpfulness_fallback) for s in without_rm] == [(None, False)] * 3


class OutOfOrder:
    """Streams group 1 before group 0, as engines on Ray may finish them."""

    in_process = False

    def generate_stream(self, prompts, n, **sampling):
        yield [_rollout(1, "late!", "t-late"), _rollout(1, "later")]
        yield [_rollout(0, "x", "t-x"), _rollout(0, "yy")]


def test_streamed_groups_come_back_in_group_order_with_their_records():
    records = generate_and_score(OutOfOrder(), [], 2, EchoGuard(), LengthRM(), **SAMPLING)
    assert _view(records) == [("x", "x", "t-x", 1.0, False, None), ("yy", "yy", None, 2.0, False, None),
                              ("late!", "late!", "t-late", 5.0, True, None),
                              ("later", "later", None, 5.0, False, None)]
