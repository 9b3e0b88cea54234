"""The typed role handles call methods the role classes have, with the arguments the classes take (pure CPU: a
recording stand-in for ActorGroup, no model loaded)."""

import inspect

import pytest

from saferl.engines import WeightBucket
from saferl.guard.remote import RemoteGuardScorer
from saferl.guard.scorer import GuardScorer
from saferl.handles import GuardGroup, HelpfulnessGroup, RolloutGroup, TrainerGroup, failure_counters
from saferl.helpfulness import HelpfulnessScorer
from saferl.rollout.worker import RolloutWorker
from saferl.serving.client import RemoteHelpfulnessScorer
from saferl.trainer.policy import PolicyTrainer
from saferl.types import ModerationItem, Prompt, TrainBatch


class RecordingGroup:
    """Records (method, args, kwargs) of every call, as ActorGroup would pass them to each actor's method."""

    executor = "local"

    def __init__(self, n=2):
        self.n, self.calls = n, []

    def __len__(self):
        return self.n

    def _record(self, method, *args, **kwargs):
        self.calls.append((method, args, kwargs))

    def call(self, method, *args, **kwargs):
        self._record(method, *args, **kwargs)
        return [b"blob" if method == "state_blob" else {"errors": 1} if method == "stats" else None] * self.n

    def call_later(self, method, *args, **kwargs):
        return self.call(method, *args, **kwargs)

    def wait(self, results):
        return results

    def map(self, method, items, *args, offset_kwarg=None, **kwargs):
        self._record(method, items, *args, **({offset_kwarg: 0} if offset_kwarg else {}), **kwargs)
        return []

    submit = stream = map

    def restarts(self):
        return 3


PROMPTS = [Prompt(id="p", messages=[{"role": "user", "content": "hi"}])]
SAMPLING = dict(temperature=0.7, top_p=0.9, max_new_tokens=8, seed=3)


def _calls(handle_cls, use):
    group = RecordingGroup()
    use(handle_cls(group))
    return group.calls


CASES = [
    (RolloutGroup, lambda h: h.generate(PROMPTS, 2, **SAMPLING), [RolloutWorker]),
    (RolloutGroup, lambda h: h.generate_stream(PROMPTS, 2, **SAMPLING), [RolloutWorker]),
    (RolloutGroup, lambda h: h.load_weights(b"w"), [RolloutWorker]),
    (RolloutGroup, lambda h: (h.packed_modules(), h.begin_weight_update(),
                              h.load_weight_bucket(WeightBucket([], [], [], [])), h.finish_weight_update()),
     [RolloutWorker]),
    (GuardGroup, lambda h: h.moderate([ModerationItem([{"role": "user", "content": "q"}], "a")]),
     [GuardScorer, RemoteGuardScorer]),
    (HelpfulnessGroup, lambda h: h.score([([{"role": "user", "content": "q"}], "a")]),
     [HelpfulnessScorer, RemoteHelpfulnessScorer]),
    (TrainerGroup, lambda h: h.connect(), [PolicyTrainer]),
    (TrainerGroup, lambda h: h.train_step(TrainBatch([[1, 2]], [1], [[0.0]], [1.0])), [PolicyTrainer]),
    (TrainerGroup, lambda h: h.state_blob(), [PolicyTrainer]),
    (TrainerGroup, lambda h: (h.weight_layout(), h.weight_bucket(["lm_head.weight"])), [PolicyTrainer]),
    (TrainerGroup, lambda h: h.save("/tmp/x", "merged"), [PolicyTrainer]),
    (TrainerGroup, lambda h: h.load("/tmp/x"), [PolicyTrainer]),
]


@pytest.mark.parametrize("handle_cls, use, role_classes", CASES,
                         ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(CASES)])
def test_handles_call_methods_the_role_classes_have(handle_cls, use, role_classes):
    """A role method renamed or given another signature without its handle following fails here, on CPU,
    instead of inside a Ray actor mid-run."""
    calls = _calls(handle_cls, use)
    assert calls
    for role_cls in role_classes:
        for method, args, kwargs in calls:
            signature = inspect.signature(getattr(role_cls, method))
            signature.bind(None, *args, **kwargs)  # None stands for self


def test_a_stream_is_a_generator_method_and_the_trainer_connects_at_rank_0():
    assert inspect.isgeneratorfunction(RolloutWorker.generate_stream)
    group = RecordingGroup()
    TrainerGroup(group).connect()
    assert [m for m, _, _ in group.calls] == ["address", "connect"] and group.calls[1][1] == (None,)
    single = RecordingGroup(n=1)
    TrainerGroup(single).connect()  # one rank connects itself when it is built
    assert single.calls == []


def test_failure_counters_sum_over_actors_and_add_restarts():
    assert failure_counters(RecordingGroup(n=2)) == {"errors": 2.0, "restarts": 3.0}
