from saferl.rollout.worker import split_thinking


def test_split_thinking():
    assert split_thinking("<think>\nplan it\n</think>\n\nThe answer.") == ("plan it", "The answer.")
    assert split_thinking("plain answer ") == ("", "plain answer")
    # Non-thinking generation starts after the template's empty think block: all answer.
    assert split_thinking("\n\nOnly answer") == ("", "Only answer")
    # Reasoning cut off before </think> stays in the answer, so the guard still judges all of it.
    assert split_thinking("<think>\nunfinished") == ("", "<think>\nunfinished")


# ---- the HF engine: seeding, decoding and log-probs on a tiny random Qwen3 -----------------------------------

import pytest  # noqa: E402
import torch  # noqa: E402

from saferl.engines import HFEngine, Sampling  # noqa: E402
from saferl.types import Prompt  # noqa: E402

WORDS = "how do I bake bread at home tell me a story about the sea please write short poem".split()


@pytest.fixture(scope="module")
def tiny_policy(tiny_tokenizer):
    """A randomly initialised 2-layer Qwen3 with the toy chat template: near-uniform next-token
    distributions, so any change in the random stream changes the sample."""
    from transformers import AutoTokenizer

    from saferl.config import ModelShape
    from saferl.toyworld.build import new_model

    path = tiny_tokenizer(WORDS)
    tok = AutoTokenizer.from_pretrained(path)
    shape = ModelShape(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                       intermediate_size=128)
    new_model(shape, tok, head="lm", seed=0).save_pretrained(path)
    return path


def prompts_of(*texts):
    return [Prompt(id=t, messages=[{"role": "user", "content": t}], kind="benign") for t in texts]


PROMPTS = prompts_of("how do I bake bread", "tell me a story about the sea please", "write a poem",
                     "bread at home", "a short story")


def samples(rollouts):
    return [(r.prompt.id, r.response_ids) for r in rollouts]


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_hf_sample_reproduces_however_prompts_are_sharded(tiny_policy, top_p):
    """rollout/worker.py's promise: prompt i is sampled with seed `seed + first_group + i`, so its samples are
    the same whether it is generated alone, in a batch, with other neighbours, in another engine chunk."""
    from saferl.rollout.worker import RolloutWorker

    worker = RolloutWorker(tiny_policy, backend="hf")
    kw = dict(temperature=1.0, top_p=top_p, max_new_tokens=12, seed=5)
    full = worker.generate(PROMPTS, 2, **kw)
    assert len({tuple(r.response_ids) for r in full}) == len(full)  # every sample differs (seeds do matter)
    for first, shard in ((2, PROMPTS[2:3]), (2, PROMPTS[2:4]), (3, PROMPTS[3:])):  # alone / shards
        part = worker.generate(shard, 2, first_group=first, **kw)
        assert samples(part) == samples(full[2 * first: 2 * (first + len(shard))])
        for r, f in zip(part, full[2 * first:]):
            assert r.logprobs == pytest.approx(f.logprobs, abs=1e-5)
    # Another neighbour in front, so prompt 2 sits at batch row 2 instead of 4 and its seed comes from the offset.
    moved = worker.generate([PROMPTS[4], PROMPTS[2]], 2, first_group=1, **kw)
    assert samples(moved[2:]) == samples(full[4:6])
    # Engine chunks (one prompt per forward pass) draw the same samples as one batch.
    ids = [worker.prompt_ids(p) for p in PROMPTS]
    sampling = Sampling(n=2, temperature=1.0, top_p=top_p, max_tokens=12)
    seeds = [5 + i for i in range(len(ids))]
    one_by_one = worker.engine.generate(ids, sampling, seeds, batch_size=1)
    assert [s.token_ids for group in one_by_one for s in group] == [r.response_ids for r in full]
    # A different seed gives different samples.
    assert samples(worker.generate(PROMPTS, 2, **{**kw, "seed": 6})) != samples(full)


def test_hf_engine_greedy_equals_generate_and_logprobs_are_the_models(tiny_policy):
    """Batched, left-padded decoding gives HF `generate`'s greedy tokens for each prompt alone, and the
    sampled tokens' log-probs are the tempered model's, recomputed from the whole sequence."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_policy)
    model = AutoModelForCausalLM.from_pretrained(tiny_policy).eval()
    engine = HFEngine(tiny_policy, stop_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    ids = [tok.apply_chat_template(p.messages, add_generation_prompt=True, return_dict=True)["input_ids"]
           for p in PROMPTS]
    assert len(set(map(len, ids))) > 1  # rows of different lengths: the batch is padded
    greedy = engine.generate(ids, Sampling(temperature=0.0, max_tokens=10), seeds=[0] * len(ids))
    with torch.no_grad():
        for p, [s] in zip(ids, greedy):
            out = model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            assert s.token_ids == out[0, len(p):].tolist()
    from saferl.trainer.gspo import token_logprobs

    for top_p in (1.0, 0.8):  # pi_old as the trainer scores it (tempered, renormalised over the nucleus)
        sampling = Sampling(n=2, temperature=0.7, top_p=top_p, max_tokens=10)
        sampled = engine.generate(ids, sampling, seeds=list(range(len(ids))))
        with torch.no_grad():
            for p, group in zip(ids, sampled):
                for s in group:
                    seq = torch.tensor([p + s.token_ids])
                    expected = token_logprobs(model(seq).logits, seq, 0.7, top_p)[0, len(p) - 1:]
                    assert s.logprobs == pytest.approx(expected.tolist(), abs=1e-4)
                    assert s.finish_reason == ("stop" if s.token_ids[-1] == tok.eos_token_id else "length")


def test_processed_logprobs_temperature_and_nucleus():
    from saferl.engines import processed_logprobs

    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    assert processed_logprobs(logits, 1.0, 1.0).exp()[0].tolist() == pytest.approx([0.5, 0.3, 0.2])
    # Temperature 2 takes square roots before renormalising.
    roots = torch.tensor([0.5, 0.3, 0.2]).sqrt()
    assert processed_logprobs(logits, 2.0, 1.0).exp()[0].tolist() == pytest.approx((roots / roots.sum()).tolist())
    # top_p 0.75: 0.2 is the least likely mass <= 0.25, so it goes; the rest is renormalised.
    kept = processed_logprobs(logits, 1.0, 0.75).exp()[0].tolist()
    assert kept == pytest.approx([0.625, 0.375, 0.0])
    # A top_p below the largest probability keeps the most likely token alone.
    assert processed_logprobs(logits, 1.0, 0.1).exp()[0].tolist() == pytest.approx([1.0, 0.0, 0.0])
