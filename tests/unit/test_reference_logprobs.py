"""Reference log-probs (#16.4): each response token's log-prob under the frozen starting policy at temperature
1 and top-p 1, against a hand computation with the HF model, for a frozen copy and for LoRA's adapter-off base,
before and after an update; the ranks' shares put back in order; records filled in by one call, with the
gate's minimum and the monitor's mean."""

import random
import types

import pytest
import torch

from saferl.handles import TrainerGroup
from saferl.scoring import with_reference_logprobs
from saferl.types import GuardVerdict, Prompt, Rollout, SafetyLabel, ScoredRollout, TrainBatch


@pytest.fixture(scope="module")
def policy_dir(tiny_policy):
    return tiny_policy


def _batch(vocab: int) -> TrainBatch:
    """Five sequences of different prompt and response lengths (the last response empty)."""
    g = random.Random(0)
    ids, lens = [], []
    for n_prompt, n_response in ((4, 6), (7, 2), (3, 9), (5, 1), (6, 0)):
        ids.append([g.randrange(3, vocab) for _ in range(n_prompt + n_response)])
        lens.append(n_prompt)
    return TrainBatch(ids, lens, [[0.0] * (len(i) - p) for i, p in zip(ids, lens)], [1.0, -1.0, 0.5, -0.5, 0.0])


def _by_hand(model_dir: str, batch: TrainBatch) -> list[list[float]]:
    """Per response token, log softmax(logits) at the next token, one unpadded sequence at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids, p in zip(batch.input_ids, batch.prompt_lens):
            if len(ids) == p:
                out.append([])
                continue
            logits = model(torch.tensor([ids])).logits[0]
            lp = torch.log_softmax(logits[p - 1:-1].double(), -1).gather(-1, torch.tensor(ids[p:])[:, None])
            out.append(lp[:, 0].tolist())
    return out


def _flat(rows):
    assert all(isinstance(row, list) for row in rows)  # one list per sequence, not a summary
    return [x for row in rows for x in row] + [len(row) for row in rows]


def _trainer(model_dir: str, **kwargs):
    from saferl.trainer.policy import PolicyTrainer

    # The sampler's temperature and top-p are set on purpose: the reference must not use them.
    base = dict(temperature=0.7, top_p=0.8, micro_batch_size=2, minibatches=1, lr=5e-2, seed=0)
    return PolicyTrainer(model_dir, **{**base, **kwargs})


@pytest.mark.parametrize("lora_rank", [0, 4], ids=["frozen-copy", "lora-base"])
def test_reference_logprobs_equal_the_hand_computation_before_and_after_an_update(policy_dir, lora_rank):
    model_dir, vocab = policy_dir
    batch = _batch(vocab)
    expected = _by_hand(model_dir, batch)
    trainer = _trainer(model_dir, reference_scoring=True, lora_rank=lora_rank)
    assert _flat(trainer.reference_logprobs(batch)) == pytest.approx(_flat(expected), abs=1e-5)
    before = trainer.sequence_logprobs(batch)
    trainer.train_step(batch)
    after = trainer.sequence_logprobs(batch)
    assert max(abs(a - b) for x, y in zip(before, after) for a, b in zip(x, y)) > 1e-3  # the policy moved
    assert _flat(trainer.reference_logprobs(batch)) == pytest.approx(_flat(expected), abs=1e-5)  # the reference did not


def test_reference_logprobs_need_the_reference(policy_dir):
    model_dir, vocab = policy_dir
    batch = _batch(vocab)
    with pytest.raises(RuntimeError, match="reference_scoring"):
        _trainer(model_dir).reference_logprobs(batch)
    # kl_coef > 0 loads it too: the same model serves the KL term and the fluency measure.
    kl = _trainer(model_dir, kl_coef=0.1)
    assert _flat(kl.reference_logprobs(batch)) == pytest.approx(_flat(_by_hand(model_dir, batch)), abs=1e-5)


class TwoRanks:
    """A stand-in ActorGroup whose `call` runs the method on two trainers set up as ranks 0 and 1 of 2."""

    executor = "local"

    def __init__(self, trainers):
        self.trainers = trainers

    def __len__(self):
        return len(self.trainers)

    def call(self, method, *args):
        return [getattr(t, method)(*args) for t in self.trainers]


def test_the_ranks_share_the_sequences_and_the_handle_puts_them_back_in_order(policy_dir):
    model_dir, vocab = policy_dir
    batch = _batch(vocab)
    ranks = [_trainer(model_dir, reference_scoring=True, micro_batch_size=1) for _ in range(2)]
    forwards = []
    for rank, trainer in enumerate(ranks):
        trainer.rank, trainer.world_size = rank, 2  # as the ranks of a 2-worker trainer see themselves
        original = trainer._reference_forward
        trainer._reference_forward = lambda *a, _f=original, _r=rank, **k: forwards.append(_r) or _f(*a, **k)
    assert len(ranks[0].reference_logprobs(batch)) == 3 and len(ranks[1].reference_logprobs(batch)) == 2
    # The short rank runs a dummy micro-batch so that both run the same forwards (ZeRO-3 gathers together).
    assert forwards.count(0) == forwards.count(1) == 3
    merged = TrainerGroup(TwoRanks(ranks)).reference_logprobs(batch)
    assert _flat(merged) == pytest.approx(_flat(_by_hand(model_dir, batch)), abs=1e-5)


def test_with_reference_logprobs_fills_each_record_from_one_call():
    calls = []

    class Trainer:
        def reference_logprobs(self, batch):
            calls.append(batch)  # response of n tokens: -n for every token but the last, -10 n for it
            return [[-float(len(ids) - p)] * (len(ids) - p - 1) + [-10.0 * (len(ids) - p)]
                    for ids, p in zip(batch.input_ids, batch.prompt_lens)]

    verdict = GuardVerdict(SafetyLabel.SAFE, refusal=False)
    prompt = Prompt(id="p", messages=[{"role": "user", "content": "q"}])
    records = [ScoredRollout(Rollout(prompt, [1, 2], [3] * (i + 1), [-0.1] * (i + 1), "t", "", "t", "stop"),
                             verdict, helpfulness=float(i)) for i in range(3)]
    out = with_reference_logprobs(records, types.SimpleNamespace(reference_logprobs=Trainer().reference_logprobs))
    assert len(calls) == 1 and calls[0].input_ids == [[1, 2, 3], [1, 2, 3, 3], [1, 2, 3, 3, 3]]
    assert [r.reference_logprob for r in out] == [-10.0, -11.0, -12.0]
    assert [r.reference_min_logprob for r in out] == [-10.0, -20.0, -30.0]
    assert [r.reference_token_logprobs for r in out] == [(-10.0,), (-2.0, -20.0), (-3.0, -3.0, -30.0)]
    # The train batch built from them carries the tokens for the unlikelihood term; from bare records, none.
    assert TrainBatch.of(out, [0.0] * 3).reference_logprobs == [[-10.0], [-2.0, -20.0], [-3.0, -3.0, -30.0]]
    assert TrainBatch.of(records, [0.0] * 3).reference_logprobs is None
    assert [r.helpfulness for r in out] == [0.0, 1.0, 2.0] and all(r.reference_logprob is None for r in records)
