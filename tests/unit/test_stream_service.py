"""Streams that join a running `StreamBatch`, roll back and get packed read as if fed alone from the start;
`StreamService` (the state behind `saferl serve stream-guard`) in-process: verdicts, decisions, text, bounds.

A synthetic 2-layer Stream guard with random heads (labels vary along a sequence) on a tiny BPE tokenizer.
"""

import time

import pytest
import torch

from saferl.guard import stream
from saferl.guard.conversation import encode_prompt, find_user_turn, role_tokens
from saferl.guard.decisions import debounce
from saferl.guard.stream import StreamBatch, moderate_full
from saferl.guard.stream_model import load_stream_guard, write_synthetic_stream_guard
from saferl.guard.stream_service import StreamError, StreamService

WORDS = ["user", "assistant", "how", "do", "I", "bake", "bread", "at", "home", "hello", "you", "dragon"]
USER = [{"role": "user", "content": "how do I bake bread at home"}]


@pytest.fixture(scope="module")
def guard(tmp_path_factory, tiny_tokenizer):
    from transformers import AutoTokenizer

    path = write_synthetic_stream_guard(tmp_path_factory.mktemp("stream_guard"), tiny_tokenizer(WORDS), seed=0,
                                        hidden_size=64, num_hidden_layers=2, guard_inner_size=32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return load_stream_guard(path), tokenizer, role_tokens(tokenizer)


def answer_ids(tokenizer, n: int, seed: int = 0) -> list[int]:
    words = [WORDS[(seed * 7 + 3 * i) % len(WORDS)] for i in range(n)]
    return tokenizer(" ".join(words), add_special_tokens=False)["input_ids"][:n]


def reference(model, roles, prefix, answer):
    """Response logits and labels of `answer` after `prefix`, from one full forward."""
    full = moderate_full(model, prefix + answer, roles)
    return full.logits.risk_level[len(prefix):], [v.risk for v in full.verdicts[-len(answer):]]


def test_joined_rolled_back_and_packed_streams_read_as_fed_alone(guard, monkeypatch):
    monkeypatch.setattr(stream, "CACHE_BLOCK", 8)  # many re-allocations and packs
    model, tokenizer, roles = guard
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": c}]) for c in
               ("how do I bake bread", "hello you", "how do I bake bread at home hello dragon")]
    answers = [answer_ids(tokenizer, 30, seed=s) for s in range(3)]
    batch = StreamBatch(model, roles, pad_id=tokenizer.pad_token_id)
    first = batch.add([prompts[0]])
    got: dict[int, list[torch.Tensor]] = {0: [], 1: [], 2: []}
    for t in range(30):
        if t == 5:  # a stream joins a running batch
            assert list(batch.add([prompts[1], prompts[2]])) == [1, 2]
        chunks = {i: answers[i][t - (5 if i else 0): t - (5 if i else 0) + 1] for i in batch.active}
        if t in (12, 20):  # a wrong token, then rolled back: as if it had never been sent
            wrong = {i: [(c[0] + 5) % len(tokenizer)] for i, c in chunks.items() if c}
            batch.feed(wrong)
            for i in wrong:
                batch.rollback(i, 1)
        for i, step in batch.feed(chunks).items():
            got[i].append(step.logits.risk_level)
    assert first[0].verdicts[0].role == "user"
    assert batch.mask.shape[1] < 2 * max(batch.lengths) + 8  # packed: holes do not pile up
    for i, n in ((0, 30), (1, 25), (2, 25)):
        want, _ = reference(model, roles, prompts[i], answers[i][:n])
        torch.testing.assert_close(torch.cat(got[i]), want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="cannot roll back"):
        batch.rollback(0, batch.lengths[0])


def test_a_feed_carrying_few_streams_forwards_only_their_rows_and_reads_the_same(guard, monkeypatch):
    monkeypatch.setattr(stream, "CACHE_BLOCK", 8)  # the cache grows inside gathered feeds too
    model, tokenizer, roles = guard
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": " ".join(WORDS[i : i + 3 + i % 4])}])
               for i in range(8)]
    answers = [answer_ids(tokenizer, 24, seed=s) for s in range(8)]
    schedule = []  # per feed: {stream: chunk}; all streams, one, two, chunks of 1-3 tokens
    sent = [0] * 8
    for t in range(30):
        who = range(8) if t % 3 == 0 else [t % 8] if t % 3 == 1 else [t % 8, (t * 5 + 1) % 8]
        chunk = {}
        for i in who:
            k = 1 + (t + i) % 3
            if sent[i] < 24:
                chunk[i], sent[i] = answers[i][sent[i] : sent[i] + k], sent[i] + k
        schedule.append(chunk)

    def run(fraction):
        monkeypatch.setattr(stream, "GATHER_FRACTION", fraction)
        batch = StreamBatch(model, roles, pad_id=tokenizer.pad_token_id)
        batch.add(prompts)
        gathered = []
        forward_rows = batch._forward_rows
        monkeypatch.setattr(batch, "_forward_rows",
                            lambda rows, *a: gathered.append(rows) or forward_rows(rows, *a))
        got = {i: [] for i in range(8)}
        for t, chunks in enumerate(schedule):
            if t == 10:  # a wrong token on one stream, rolled back in a gathered feed's batch
                batch.feed({3: [(answers[3][0] + 5) % len(tokenizer)]})
                batch.rollback(3, 1)
            for i, step in batch.feed(chunks).items():
                got[i].append(step)
        return got, gathered

    gathered_run, gathered = run(0.25)
    full_run, none = run(0.0)
    assert none == [] and len(gathered) >= 15 and all(len(rows) <= 2 for rows in gathered)
    for i in range(8):
        want, labels = reference(model, roles, prompts[i], answers[i][: sent[i]])
        got = torch.cat([st.logits.risk_level for st in gathered_run[i]])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        never = torch.cat([st.logits.risk_level for st in full_run[i]])
        torch.testing.assert_close(got, never, atol=1e-5, rtol=0)
        assert [v.risk for st in gathered_run[i] for v in st.verdicts] == labels
        assert [v.position for st in gathered_run[i] for v in st.verdicts] == [
            v.position for st in full_run[i] for v in st.verdicts]


@pytest.fixture()
def service(guard):
    model, tokenizer, _ = guard
    svc = StreamService(model, tokenizer, max_streams=3, max_stream_tokens=200, idle_timeout_s=30)
    yield svc
    svc.shutdown()


def call(future):
    return future.result(timeout=60)


def test_service_verdicts_decision_rollback_and_text(guard, service):
    model, tokenizer, roles = guard
    prefix = encode_prompt(tokenizer, USER)
    answer = answer_ids(tokenizer, 40)
    opened = call(service.open(USER))
    assert opened.prefix == len(prefix) and [v.role for v in opened.verdicts] == ["user"]
    verdicts = []
    for i in range(0, 40, 3):
        verdicts += call(service.append(opened.id, tokens=answer[i:i + 3])).verdicts
    _, labels = reference(model, roles, prefix, answer)
    assert [v.risk for v in verdicts] == labels and [v.position for v in verdicts] == list(
        range(len(prefix), len(prefix) + 40))
    reply = call(service.rollback(opened.id, 10))
    assert reply.length == 30 and reply.decision == debounce(labels[:30], "official",
                                                             [v.category for v in verdicts[:30]])
    again = call(service.append(opened.id, tokens=answer[30:]))
    assert [v.risk for v in again.verdicts] == labels[30:]
    assert again.decision == debounce(labels, "official", [v.category for v in verdicts])
    assert again.flagged == (again.decision.index is not None)  # strict: Unsafe or Controversial pairs

    text = "how do I bake bread at home hello dragon"
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    t = call(service.open(USER))
    cut = [0, 5, 6, 13, 20, len(text)]  # boundaries inside words: the tokenizer merges across them
    replies = [call(service.append(t.id, text=text[a:b])) for a, b in zip(cut, cut[1:])]
    assert sum(r.rolled_back for r in replies) > 0
    final = {}
    for r in replies:
        for v in r.verdicts:
            final[v.position] = v.risk
    assert list(final) == list(range(len(prefix), len(prefix) + len(whole)))
    assert list(final.values()) == reference(model, roles, prefix, whole)[1]
    assert call(service.rollback(t.id, 2)).length == len(whole) - 2
    assert service.streams[t.id].text == tokenizer.decode(whole[:-2])


def test_service_bounds_and_errors(guard, service):
    model, tokenizer, _ = guard
    ids = [call(service.open(USER)).id for _ in range(3)]
    with pytest.raises(StreamError, match="streams are open") as e:
        call(service.open(USER))
    assert e.value.status == 429
    call(service.close(ids[0]))
    with pytest.raises(StreamError, match="no open stream"):
        call(service.append(ids[0], tokens=[1]))
    short = call(service.open(USER, 0.2))
    time.sleep(0.5)
    with pytest.raises(StreamError, match="expired") as e:
        call(service.append(short.id, tokens=[1]))
    assert e.value.status == 404
    bad = [((ids[1],), {"tokens": [len(tokenizer) + 10]}, "outside the guard's vocabulary"),
           ((ids[1],), {"tokens": [1] * 300}, "max-stream-tokens"),
           ((ids[1],), {"text": "hello"}, "cannot take text"),
           ((ids[1],), {}, "exactly one")]
    call(service.append(ids[1], tokens=[1]))
    for args, kwargs, message in bad:
        with pytest.raises(StreamError, match=message):
            call(service.append(*args, **kwargs))
    with pytest.raises(StreamError, match="cannot roll back 5"):
        call(service.rollback(ids[1], 5))
    with pytest.raises(StreamError, match="must end with a user turn"):
        call(service.open([*USER, {"role": "assistant", "content": "hi"}]))
    assert call(service.append(ids[1], tokens=[2])).length == 2  # still serving


def test_append_many_is_one_tick_and_a_lone_stream_does_not_wait(guard):
    model, tokenizer, roles = guard
    prefix, answers = encode_prompt(tokenizer, USER), [answer_ids(tokenizer, 12, seed=s) for s in range(2)]
    svc = StreamService(model, tokenizer, max_streams=3, max_stream_tokens=200, max_wait_s=5.0)
    try:
        a, b = (call(svc.open(USER)).id for _ in range(2))
        ticks = svc.ticks
        replies = [call(f) for f in svc.append_many([(a, answers[0], None), (b, answers[1], None),
                                                     ("nope", [1], None)])[:2]]
        assert svc.ticks == ticks + 1  # both streams fed by one forward (and the unknown id refused there)
        for reply, answer in zip(replies, answers):
            assert [v.risk for v in reply.verdicts] == reference(model, roles, prefix, answer)[1]
        with pytest.raises(StreamError, match="no open stream"):
            call(svc.append_many([("nope", [1], None)])[0])
        call(svc.close(b))
        start = time.monotonic()  # one stream open and asking: its tick starts at once, not after 5 s
        assert call(svc.append(a, tokens=[1])).length == 13
        assert time.monotonic() - start < 2.5
    finally:
        svc.shutdown()
