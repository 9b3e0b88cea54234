"""PolicyTrainer beyond one process: data-parallel ranks over gloo (plain DDP and DeepSpeed ZeRO), LoRA, and its
log-probs against vLLM's under top-p."""

import math
import os
import random

import pytest
import torch
from safetensors.torch import load as load_blob
from safetensors.torch import load_file

from saferl.types import TrainBatch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slow


def _batch(n: int, seed: int = 0) -> TrainBatch:
    """Variable-length prompts and responses (one empty response), random advantages."""
    g = random.Random(seed)
    ids, prompt_lens, old, adv = [], [], [], []
    for i in range(n):
        prompt = [g.randrange(10, 500) for _ in range(g.randrange(5, 12))]
        response = [g.randrange(10, 500) for _ in range(0 if i == 3 else g.randrange(1, 15))]
        ids.append(prompt + response)
        prompt_lens.append(len(prompt))
        old.append([0.0] * len(response))
        adv.append(g.gauss(0.0, 1.0))
    return TrainBatch(ids, prompt_lens, old, adv)


@pytest.mark.parametrize("strategy,zero_stage", [("torch", 0), ("deepspeed", 2), ("deepspeed", 3)],
                         ids=["ddp", "zero2", "zero3"])
def test_two_ranks_over_gloo_equal_one_rank(toy_world, strategy, zero_stage):
    """2 PolicyTrainer Ray actors (micro-batches of 2, gradient accumulation, a dummy row on the short rank)
    end one GSPO train_step (2 minibatches, KL on) with the weights of 1 in-process trainer on the same batch,
    and their weight buckets (under ZeRO-3 gathered one bucket at a time) put together are their blob.

    AdamW's first steps move each weight by about lr * sign(grad), which hides a wrong gradient scale, so the
    gradient norm (taken before clipping) is compared too. lr is 1e-5: the weights move by ~2e-5, so a rank
    that dropped or double-counted samples would be off by ~1e-5, while float reordering stays near 4e-7.
    """
    from saferl.actor_group import ActorGroup, start_ray
    from saferl.handles import TrainerGroup
    from saferl.engines import unpack_bucket
    from saferl.trainer.policy import PolicyTrainer, merge_rank_metrics
    from saferl.trainer.weight_sync import plan_buckets

    kwargs = dict(model=str(toy_world.part("policy")), lr=1e-5, minibatches=2, kl_coef=0.1, strategy=strategy,
                  zero_stage=zero_stage, seed=0)
    batch = _batch(13)
    one = ActorGroup(PolicyTrainer, 1, executor="local", kwargs=dict(kwargs, micro_batch_size=64))
    start = load_blob(one.call("state_blob")[0])
    single = one.call("train_step", batch)[0]
    expected = load_blob(one.call("state_blob")[0])
    one.shutdown()

    start_ray(None, 4, os.path.join(ROOT, ".cache", "ray"))
    two = ActorGroup(PolicyTrainer, 2, executor="ray", rank_kwarg="rank", num_cpus=1,
                     kwargs=dict(kwargs, world_size=2, micro_batch_size=2))
    try:
        TrainerGroup(two).connect()
        per_rank = two.call("train_step", batch)
        blobs = two.call("state_blob")
        # The bucketed sync's source: the same layout on every rank (full sizes, also under ZeRO-3), and
        # buckets gathered one at a time that together are the blob, rank 0's alone.
        layouts = two.call("weight_layout")
        plan = plan_buckets(layouts[0], sum(size for _, size in layouts[0]) // 4, {})
        buckets = [two.call("weight_bucket", names) for names in plan]
    finally:
        two.shutdown()
    assert blobs[1] == b""  # only rank 0 sends weights
    got = load_blob(blobs[0])
    assert layouts[0] == layouts[1] and len(plan) > 2
    assert all(rank1 is None for _, rank1 in buckets)
    streamed = {name: t for rank0, _ in buckets for name, t in unpack_bucket(rank0)}
    assert set(streamed) == set(got) and all(torch.equal(streamed[k], got[k]) for k in got)
    assert dict(layouts[0]) == {k: t.nbytes for k, t in got.items()}
    assert set(got) == set(expected)
    moved = max((expected[k] - start[k]).abs().max().item() for k in expected)
    diff = max((expected[k] - got[k]).abs().max().item() for k in expected)
    assert moved > 1e-5 and diff < 1e-6, (moved, diff)
    merged = merge_rank_metrics(per_rank)
    assert merged["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-5)
    assert merged["tokens"] == single["tokens"]
    # Per-token means over ranks holding different numbers of tokens merge to the one-rank value (#14.6).
    assert per_rank[0]["tokens"] != per_rank[1]["tokens"]
    for key in ("entropy", "rollout_logprob_abs_diff"):
        assert merged[key] == pytest.approx(single[key], rel=1e-4), key


def test_lora_trains_adapters_and_exports_merged_or_adapter(toy_world, tmp_path):
    """With LoRA only the adapters move; the KL to the adapter-free base starts at 0; the synced blob has the
    base model's names with the adapters folded in; both exports load back to the same function."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from saferl.trainer.policy import PolicyTrainer

    policy = str(toy_world.part("policy"))
    base = load_file(os.path.join(policy, "model.safetensors"))
    trainer = PolicyTrainer(policy, lora_rank=4, lr=1e-2, kl_coef=0.1, minibatches=1)
    batch = _batch(8)
    first = trainer.train_step(batch)
    assert first["kl"] == 0.0  # B = 0 at start (one minibatch, before the update): policy == reference
    second = trainer.train_step(batch)
    assert second["kl"] > 0
    merged = load_blob(trainer.state_blob())
    assert set(merged) >= set(base) and not any("lora" in k for k in merged)
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (merged[q] - base[q]).abs().max() > 1e-4

    trainer.save(str(tmp_path / "merged"), "merged")
    trainer.save(str(tmp_path / "adapter"), "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    ids = torch.tensor([batch.input_ids[0]])
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.equal(full.state_dict()[q], merged[q])
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(policy), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(full(ids).logits, adapted(ids).logits, atol=1e-4)


def test_entropy_bonus_alone_raises_entropy(toy_world):
    """With all advantages 0 the policy term has no gradient; an entropy bonus alone must raise the entropy."""
    from saferl.trainer.policy import PolicyTrainer

    batch = _batch(8)
    batch.advantages = [0.0] * 8
    trainer = PolicyTrainer(str(toy_world.part("policy")), entropy_coef=1.0, lr=1e-3, minibatches=1)
    first = trainer.train_step(batch)
    second = trainer.train_step(batch)
    assert first["pg_loss"] == 0.0
    assert second["entropy"] > first["entropy"] + 1e-3, (first["entropy"], second["entropy"])


def test_trainer_logprobs_match_vllm_under_top_p(toy_world):
    """With rollout.top_p 0.9 vLLM reports processed log-probs (renormalised over the nucleus): the trainer's pi is
    that same distribution, token for token. Temperature alone (the trainer before #14.2, top_p=1 here) is not."""
    from saferl.data import load_prompts
    from saferl.rollout.worker import RolloutWorker
    from saferl.trainer.policy import PolicyTrainer

    policy = str(toy_world.part("policy"))
    prompts = load_prompts(toy_world.part("heldout"))[::80]
    rollouts = RolloutWorker(policy).generate(prompts, 2, top_p=0.9, seed=7)
    batch = TrainBatch([r.prompt_ids + r.response_ids for r in rollouts], [len(r.prompt_ids) for r in rollouts],
                       [r.logprobs for r in rollouts], [0.0] * len(rollouts))
    trainer = PolicyTrainer(policy, top_p=0.9)

    def abs_diffs() -> list[float]:
        scored = trainer.sequence_logprobs(batch)
        return [abs(a - b) for r, t in zip(rollouts, scored, strict=True) for a, b in zip(r.logprobs, t, strict=True)]

    nucleus = abs_diffs()
    trainer.top_p = 1.0
    tempered = abs_diffs()
    print(f"{len(nucleus)} tokens; |trainer - vLLM| at top_p 0.9: max {max(nucleus):.2e} mean "
          f"{sum(nucleus) / len(nucleus):.2e}; temperature only: max {max(tempered):.2e} "
          f"mean {sum(tempered) / len(tempered):.2e}")
    assert max(nucleus) < 1e-4, max(nucleus)
    assert max(tempered) > 1e-2, max(tempered)  # the nucleus really cut mass: the test can tell the two apart
    # A train step on these samples: finite, and its health metric compares like with like.
    trainer.top_p = 0.9
    batch.advantages = [1.0 if i % 2 else -1.0 for i in range(len(rollouts))]
    metrics = trainer.train_step(batch)
    assert metrics["rollout_logprob_abs_diff"] < 1e-5 and metrics["grad_norm"] > 0
    assert all(map(math.isfinite, metrics.values())), metrics
