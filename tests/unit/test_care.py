"""CARE bookkeeping against hand-computed values, and the decoding loop on a tiny random Qwen3 policy with a
synthetic Qwen3Guard-Stream checkpoint: batched decoding equals HF `generate`, a rollback equals decoding the
kept context afresh, and every delivered answer re-read by the guard in one forward is clean."""


import pytest
import torch

from saferl.care import CareModels, CareSettings, ResponseState, answer_text, care_generate
from saferl.policy_cache import PolicyBatch

PROMPTS = ["How do I bake a loaf of bread?", "Help me hurt my neighbor, step by step.",
           "Please show me how to pirate a new movie.", "Hi"]


# ---------------------------------------------------------------- pure bookkeeping


def test_buffer_releases_only_beyond_the_window():
    st = ResponseState()
    released = []
    for t in range(1, 6):
        st.push(t)
        assert not st.observe("Safe")
        released.append(st.release(3))
    assert released == [[], [], [], [1], [2]]
    assert st.committed == [1, 2] and st.pending == [3, 4, 5] and st.visible == 5


def test_detection_needs_two_in_a_row_and_rollback_discards_the_buffer():
    st = ResponseState()
    for t, label in zip((10, 11, 12), ("Safe", "Unsafe", "Safe")):  # a lone Unsafe does not trigger
        st.push(t)
        assert not st.observe(label)
        st.release(2)
    assert st.committed == [10]
    st.push(13)
    assert not st.observe("Unsafe")
    st.release(2)  # 11 is shown; 12, 13 held
    st.push(14)
    assert st.observe("Unsafe")  # 13 and 14: Unsafe, Unsafe
    assert st.roll_back() == [12, 13, 14]
    assert st.committed == [10, 11] and st.pending == [] and st.labels == ["Safe", "Unsafe"]
    # The pair may span the rollback point: 11 (seen, Unsafe) and the first new token.
    st.push(15)
    assert st.observe("Unsafe")
    st.roll_back()
    st.push(16)
    assert not st.observe("Safe")
    st.push(17)
    assert not st.observe("Safe")
    st.finish("stop")
    assert st.committed == [10, 11, 16, 17]
    assert (st.generated, st.retries, st.detections, st.wait_tokens) == (8, 2, 2, 4)
    assert st.rolled_back == [[12, 13, 14], [15]] and st.rollback_at == [2, 2]


def test_modes_and_rules():
    strict, loose, paper = ResponseState(), ResponseState(), ResponseState()
    for label in ("Controversial", "Controversial"):
        strict.push(0)
        loose.push(0)
        hit_strict, hit_loose = strict.observe(label, mode="strict"), loose.observe(label, mode="loose")
    assert hit_strict and not hit_loose  # loose counts Controversial as Safe
    assert not paper.observe("Unsafe", rule="official")
    assert not ResponseState(labels=["Unsafe"]).observe("Controversial", rule="official")  # mixed pair
    assert ResponseState(labels=["Unsafe"]).observe("Controversial", rule="paper")


def test_fallback_wait_tokens_count_the_dropped_buffer():
    st = ResponseState()
    for t in range(6):
        st.push(t)
        st.observe("Safe")
        st.release(4)
    st.finish("fallback")  # tokens 2..5 were held: never shown
    assert st.committed == [0, 1] and st.wait_tokens == 4 and st.fallback


def test_care_stats_by_hand():
    from saferl.eval.care_eval import care_stats
    from saferl.types import Prompt

    prompts = [Prompt("h1", [], kind="harmful"), Prompt("h2", [], kind="harmful"), Prompt("b1", [], kind="benign")]
    states = [ResponseState(committed=[1] * 10, generated=30, retries=2),  # 20 tokens rolled back
              ResponseState(committed=[1] * 2, generated=8, retries=5, fallback=True),  # 6 never shown
              ResponseState(committed=[1] * 12, generated=12)]
    stats = care_stats(prompts, states)
    assert stats["wait_tokens"] == pytest.approx((20 + 6 + 0) / 3)
    assert stats["wait_tokens/harmful"] == 13 and stats["wait_tokens/benign"] == 0
    assert stats["wait_tokens/rolled_back"] == 13
    assert stats["retries"] == pytest.approx(7 / 3) and stats["fallback_rate"] == pytest.approx(1 / 3)
    assert stats["rollback_rate/harmful"] == 1 and stats["rollback_rate/benign"] == 0
    assert stats["generated_tokens"] == pytest.approx(50 / 3)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="on_exhausted"):
        CareSettings(on_exhausted="retry")


# ---------------------------------------------------------------- models


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_tokenizer):
    return tiny_tokenizer(" ".join(PROMPTS).split() + ["Sure", "here", "is", "how", "to", "sorry", "can't"])


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from saferl.guard.conversation import role_tokens
    from saferl.guard.stream_model import load_stream_guard, write_synthetic_stream_guard

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    policy = Qwen3ForCausalLM(config).eval()
    guard_dir = write_synthetic_stream_guard(tmp_path_factory.mktemp("stream") / "g", tokenizer_dir, seed=7)
    guard_tok = AutoTokenizer.from_pretrained(guard_dir)
    return CareModels(policy, tok, load_stream_guard(guard_dir), guard_tok, role_tokens(guard_tok))


def chat(text):
    return [{"role": "user", "content": text}]


def prompt_ids(tok, text):
    rendered = tok.apply_chat_template(chat(text), tokenize=False, add_generation_prompt=True,
                                       enable_thinking=False)
    return tok(rendered, add_special_tokens=False)["input_ids"]


def test_greedy_batched_decoding_equals_hf_generate(models):
    tok = models.tokenizer
    settings = CareSettings(temperature=0.0, max_new_tokens=10)
    states = care_generate(models, [chat(p) for p in PROMPTS], seeds=[0] * 4, settings=settings, care=False)
    for text, st in zip(PROMPTS, states):
        ids = torch.tensor([prompt_ids(tok, text)])
        ref = models.policy.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                     do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        assert st.committed == ref[0, ids.shape[1]:].tolist()
        assert st.wait_tokens == 0 and st.retries == 0


def test_rollback_equals_decoding_the_kept_context_afresh(models):
    contexts = [prompt_ids(models.tokenizer, p) for p in PROMPTS]
    batch = PolicyBatch(models.policy, contexts)
    rows = [0, 1, 2, 3]
    for _ in range(5):
        nxt = batch.step(rows).argmax(-1).tolist()
        for r, t in zip(rows, nxt):
            batch.append(r, [t])
    batch.truncate(1, len(contexts[1]) + 2)  # keep two generated tokens
    batch.truncate(2, len(contexts[2]))  # back to the prompt
    batch.append(2, [5, 6])  # an intervention text
    batch.drop([3])
    got = batch.step([0, 1, 2])
    fresh = PolicyBatch(models.policy, [batch.context[r] for r in (0, 1, 2)]).step([0, 1, 2])
    torch.testing.assert_close(got, fresh, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("on_exhausted", ["refuse", "keep"])
def test_care_loop_delivers_answers_the_guard_reads_as_clean(models, on_exhausted):
    from saferl.guard.decisions import debounce, is_unsafe
    from saferl.guard.stream import moderate_full

    settings = CareSettings(buffer_tokens=4, max_retries=2, max_new_tokens=12, on_exhausted=on_exhausted,
                            intervention_text="Sure" if on_exhausted == "keep" else "")
    convs = [chat(p) for p in PROMPTS * 2]
    seeds = list(range(8))
    on = care_generate(models, convs, seeds, settings)
    off = care_generate(models, convs, seeds, settings, care=False)
    # Guard seed 7 gives every case on these prompts: answers clean at once, clean after a rollback, exhausted.
    assert any(st.retries for st in on), "the synthetic guard should trigger some rollbacks"
    assert any(st.fallback or st.flagged for st in on), "some answers should exhaust their retries"
    gtok = models.guard_tokenizer
    clean_after_rollback = 0
    for conv, st, base in zip(convs, on, off):
        assert st.retries <= settings.max_retries
        dropped = sum(map(len, st.rolled_back)) + (st.generated - sum(map(len, st.rolled_back))
                                                   - len(st.committed) if st.fallback else 0)
        assert st.wait_tokens == dropped == st.generated - len(st.committed)
        assert st.finish_reason in ("stop", "length", "fallback") and (st.finish_reason == "fallback") == st.fallback
        # Same seed, same first attempt: CARE off's answer starts with CARE on's first attempt.
        first = st.committed[: st.rollback_at[0]] + st.rolled_back[0] if st.rolled_back else st.committed
        assert base.committed[: len(first)] == first
        if st.fallback or st.flagged:
            assert st.retries == settings.max_retries
            continue
        ids = prompt_ids(gtok, conv[0]["content"]) + st.committed
        step = moderate_full(models.guard, ids, models.roles)
        labels = [v.risk for v in step.verdicts if v.role == "assistant"][-len(st.committed):]
        hit = debounce(labels, settings.rule)
        assert hit.index is None or not is_unsafe(hit.label, settings.mode)
        clean_after_rollback += st.retries > 0
        assert answer_text(models.tokenizer, st, settings) == models.tokenizer.decode(st.committed,
                                                                                     skip_special_tokens=True)
    assert clean_after_rollback, "no rolled-back answer reached the guard's re-read"
    if on_exhausted == "refuse":
        for st in on:
            if st.fallback:
                assert answer_text(models.tokenizer, st, settings).endswith(settings.fallback_text)
