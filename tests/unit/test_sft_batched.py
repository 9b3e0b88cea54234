"""SafeRL's batches and heads inside TRL's and transformers' trainers (`saferl.sft_batched`): the same batches as
the hand-written loop, the same loss on them, through a real trl.SFTTrainer and transformers.Trainer."""

import math
import random

import torch

from saferl.config import ModelShape
from saferl.guard.templates import GUARD_CHAT_TEMPLATE, format_verdict, moderation_messages
from saferl.sft import (
    RegressionExample,
    _collate_lm,
    _collate_regression,
    _fit,
    _lm_loss,
    _regression_loss,
    chat_example,
    lr_factor,
    train_causal_lm,
    train_regression,
)
from saferl.sft_batched import (
    batched_rows,
    prefix_bucket,
    target_head_forward,
    train_causal_lm_trl,
    train_regression_hf,
)
from saferl.toyworld import world
from saferl.toyworld.build import new_model
from saferl.toyworld.tokenizer import train_bpe_tokenizer

SHAPE = ModelShape(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64)


def _guard_examples(n=13):
    tok = train_bpe_tokenizer(world.corpus_texts()[:400], 400)
    tok.chat_template = GUARD_CHAT_TEMPLATE
    out = []
    for i, p in enumerate(world.make_prompts("train")[:: 1920 // n][:n]):
        text = None if i % 3 == 0 else world.responses_for(p)["refusal"][0]  # two prompt layouts: two buckets
        v = world.response_verdict(p, "refusal")
        out.append(chat_example(tok, moderation_messages(p.messages, text),
                                format_verdict(v.safety, v.categories, None if text is None else v.refusal)))
    return tok, out


def test_batched_rows_are_the_hand_written_loops_batches_in_order():
    _, examples = _guard_examples()
    seen = []

    def record(batch, pad):
        seen.append([examples.index(e) for e in batch])
        return {}

    model = torch.nn.Linear(1, 1)
    _fit(model, examples, record, lambda m, b: m.weight.sum() * 0.0, pad_id=0, steps=9, batch_size=4, lr=0.1,
         warmup_steps=1, seed=3, label="t", log_every=0, bucket=prefix_bucket)
    rows = batched_rows(examples, steps=9, batch_size=4, seed=3, bucket=prefix_bucket)
    assert [[examples.index(e) for e in b] for b in rows] == seen
    assert len({len(b) for b in rows}) > 1 and all(len({prefix_bucket(e) for e in b}) == 1 for b in rows)


def test_target_head_is_trls_output_contract_with_the_hand_written_loss():
    tok, examples = _guard_examples()
    model = new_model(SHAPE, tok, head="lm", seed=0)
    batch = _collate_lm([e for e in examples if prefix_bucket(e) == prefix_bucket(examples[1])], tok.pad_token_id,
                        share_prefix=True)
    assert int(batch["shared_prefix"]) > 20  # the moderation instruction
    out = target_head_forward(model, model.forward)(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
        shared_prefix=batch["shared_prefix"], fused_lm_head=True)
    mask = batch["labels"][:, 1:] != -100
    assert torch.equal(out.label_mask, mask) and out.log_probs[~mask].abs().sum() == 0
    assert abs(out.loss.item() - _lm_loss(model, batch).item()) < 1e-5
    assert abs(-out.log_probs.sum().item() / mask.sum().item() - out.loss.item()) < 1e-5
    assert out.entropy[mask].min() > 0 and set(out.is_top1.unique().tolist()) <= {0.0, 1.0}
    plain = target_head_forward(model, model.forward)(input_ids=batch["input_ids"])  # generation: unchanged
    assert plain.logits.shape == (*batch["input_ids"].shape, len(tok))


def test_sft_trainer_trains_on_the_first_batch_with_the_hand_written_loss():
    """The first logged loss of trl.SFTTrainer (logging every step) is `_lm_loss` on the first batch of
    `batched_rows` from the same initial weights, and training lowers it."""
    tok, examples = _guard_examples()
    model = new_model(SHAPE, tok, head="lm", seed=0)
    first = batched_rows(examples, steps=1, batch_size=4, seed=0, bucket=prefix_bucket)[0]
    with torch.no_grad():
        want = _lm_loss(model, _collate_lm(first, tok.pad_token_id, share_prefix=True)).item()
    losses = train_causal_lm_trl(model, tok, examples, steps=8, batch_size=4, lr=1e-2, warmup_steps=1, seed=0,
                                 share_prefix=True, log_every=1)
    assert len(losses) == 8 and abs(losses[0] - want) < 1e-4
    assert losses[-1] < losses[0]
    assert not model.training


def test_trainer_fits_scores_with_the_hand_written_regression_loss():
    tok = train_bpe_tokenizer(world.corpus_texts()[:400], 400)
    rng = random.Random(0)
    examples = [RegressionExample(tok(world.corpus_texts()[i])["input_ids"][:24], rng.choice([-3.0, 0.0, 3.0]),
                                  i // 4) for i in range(24)]
    model = new_model(SHAPE, tok, head="score", seed=0)
    first = batched_rows(examples, steps=1, batch_size=len(examples), seed=0, bucket=lambda e: e.group // 2)[0]
    with torch.no_grad():
        want = _regression_loss(model, _collate_regression(first, tok.pad_token_id), pair_weight=1.0).item()
    losses = train_regression_hf(model, examples, pad_id=tok.pad_token_id, steps=10, batch_size=8, lr=1e-2,
                                 warmup_steps=1, seed=0, pair_weight=1.0, group_size=4, log_every=1)
    assert len(losses) == 10 and abs(losses[0] - want) < 1e-4
    assert losses[-1] < losses[0]


def test_lr_factor_warms_up_from_lr_over_warmup_then_decays_to_a_tenth():
    # by hand: warm-up 4 of 14 steps -> 1/4, 2/4, 3/4, 1 ; then 0.1 + 0.45 (1 + cos(pi (s - 4) / 10))
    f = [lr_factor(s, warmup_steps=4, steps=14) for s in range(14)]
    assert f[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert abs(f[9] - 0.55) < 1e-12  # halfway through the decay: cos(pi / 2) = 0
    assert abs(f[13] - (0.1 + 0.45 * (1 + math.cos(0.9 * math.pi)))) < 1e-12 and f[13] > 0.1


def _regression_examples(tok):
    rng = random.Random(0)
    return [RegressionExample(tok(world.corpus_texts()[i])["input_ids"][:24], rng.choice([-3.0, 0.0, 3.0]), i // 4)
            for i in range(24)]


def test_trainer_steps_at_the_hand_written_lr_with_the_hand_written_losses(monkeypatch):
    """transformers.Trainer under `train_regression_hf` takes the hand-written loop's optimizer steps: the lr at
    every step is `lr * sft.lr_factor` (step 0 at lr / warm-up, not the Trainer's own warm-up from 0), so the whole
    loss trajectory and the final scores match `sft.train_regression` from the same initial weights."""
    from transformers import Trainer

    tok = train_bpe_tokenizer(world.corpus_texts()[:400], 400)
    examples = _regression_examples(tok)
    args = dict(pad_id=tok.pad_token_id, steps=10, batch_size=8, lr=1e-2, warmup_steps=3, seed=0, pair_weight=1.0,
                group_size=4)
    ours, theirs = new_model(SHAPE, tok, head="score", seed=0), new_model(SHAPE, tok, head="score", seed=0)
    want = train_regression(ours, examples, log_every=0, **args)
    seen: list[float] = []
    original = Trainer.training_step

    def spy(self, *a, **k):
        seen.append(self.optimizer.param_groups[0]["lr"])
        return original(self, *a, **k)

    monkeypatch.setattr(Trainer, "training_step", spy)
    got = train_regression_hf(theirs, examples, log_every=1, **args)
    assert seen == [1e-2 * lr_factor(s, warmup_steps=3, steps=10) for s in range(10)]
    assert len(got) == 10 and max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4
    batch = _collate_regression(examples, tok.pad_token_id)
    with torch.no_grad():
        a = ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(a, b, atol=1e-4)


def test_sft_trainer_steps_at_the_hand_written_lr_with_the_hand_written_losses():
    """trl.SFTTrainer under `train_causal_lm_trl`: the hand-written loop's losses step by step (see above)."""
    tok, examples = _guard_examples()
    ours, theirs = new_model(SHAPE, tok, head="lm", seed=0), new_model(SHAPE, tok, head="lm", seed=0)
    args = dict(steps=8, batch_size=4, lr=1e-2, warmup_steps=3, seed=0, share_prefix=True)
    want = train_causal_lm(ours, examples, pad_id=tok.pad_token_id, log_every=0, **args)
    got = train_causal_lm_trl(theirs, tok, examples, log_every=1, **args)
    assert len(got) == 8 and max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4
