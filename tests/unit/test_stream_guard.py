"""Qwen3Guard-Stream model: strict loading of the released layout, and incremental KV-cached moderation that
matches one full forward (single stream, chunks, batched ragged streams with drops), in float32 on CPU."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from saferl.guard import stream
from saferl.guard.conversation import RoleTokens, find_user_turn, role_tokens
from saferl.guard.stream import StreamBatch, moderate_full, moderate_many
from saferl.guard.stream_eval import StreamLabeler
from saferl.guard.stream_model import load_stream_guard, save_stream_guard, write_synthetic_stream_guard
from saferl.guard.templates import CATEGORIES, RESPONSE_CATEGORIES

HEADS = ("risk_level", "category", "query_risk_level", "query_category")
CONVERSATIONS = [
    [
        {"role": "user", "content": "How do I bake bread at home?"},
        {
            "role": "assistant",
            "content": "Mix flour, water, salt and yeast; knead it, let it rise, bake for forty minutes.",
        },
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help you today with anything at all?"},
    ],
    [
        {"role": "user", "content": "Tell me a long story about a dragon and a knight who became friends."},
        {"role": "assistant", "content": "Once upon a time there was a dragon."},
    ],
]


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_tokenizer):
    return tiny_tokenizer(["user", "assistant", "how", "do", "I", "bake", "bread", "at", "home", "hello", "you",
                           "dragon"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
    return write_synthetic_stream_guard(
        tmp_path_factory.mktemp("stream_guard"),
        tokenizer_dir,
        seed=0,
        hidden_size=64,
        num_hidden_layers=2,
        guard_inner_size=32,
    )


@pytest.fixture(scope="module")
def guard(checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return load_stream_guard(checkpoint), tokenizer, role_tokens(tokenizer)


def encode(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, enable_thinking=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def assert_logits_match(steps, reference, n=None):
    """The concatenated per-step logits of one stream equal the reference's first n positions within 1e-4."""
    positions = [p for s in steps for p in s.positions]
    n = len(positions) if n is None else n
    assert positions == list(range(n))
    for head in HEADS:
        got = torch.cat([getattr(s.logits, head) for s in steps])
        want = getattr(reference.logits, head)[:n]
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    got_labels = [(v.position, v.role, v.risk, v.category) for s in steps for v in s.verdicts]
    want_labels = [(v.position, v.role, v.risk, v.category) for v in reference.verdicts if v.position < n]
    assert got_labels == want_labels


def test_synthetic_checkpoint_has_the_released_layout(checkpoint, guard):
    model, _, _ = guard
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForGuardModel"] and config["model_type"] == "qwen3"
    assert config["dtype"] == "float32"
    assert config["auto_map"]["AutoModel"] == "modeling_qwen3_guard.Qwen3ForGuardModel"
    assert config["response_risk_level_map"] == {"0": "Safe", "1": "Unsafe", "2": "Controversial"}
    assert config["query_category_map"]["8"] == "Jailbreak"
    assert (config["guard_inner_size"], config["num_category"], config["num_query_category"]) == (32, 8, 9)
    assert model.response_category_map == dict(enumerate(RESPONSE_CATEGORIES))
    assert model.query_category_map == dict(enumerate(CATEGORIES))
    shapes = {k: tuple(v.shape) for k, v in load_file(checkpoint / "model.safetensors").items()}
    assert shapes["risk_level_category_pre.weight"] == (32, 64)
    assert shapes["risk_level_category_layernorm.weight"] == (32,)
    assert shapes["risk_level_head.weight"] == (3, 32) and shapes["category_head.weight"] == (8, 32)
    assert shapes["query_risk_level_head.weight"] == (3, 32) and shapes["query_category_head.weight"] == (
        9,
        32,
    )
    assert "model.embed_tokens.weight" in shapes and "model.layers.1.mlp.down_proj.weight" in shapes
    out = model(torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]))
    assert [tuple(getattr(out, h).shape) for h in HEADS] == [(2, 4, 3), (2, 4, 8), (2, 4, 3), (2, 4, 9)]


def test_save_and_reload_round_trip(tmp_path, guard):
    model, _, _ = guard
    save_stream_guard(model, tmp_path)
    again = load_stream_guard(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    torch.testing.assert_close(again(ids).query_category, model(ids).query_category, atol=0, rtol=0)


def test_missing_key_is_named(tmp_path, checkpoint):
    state = load_file(checkpoint / "model.safetensors")
    del state["query_category_head.weight"]
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    with pytest.raises(ValueError, match=r"missing keys \['query_category_head.weight'\]") as err:
        load_stream_guard(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_extra_lm_head_tolerated_other_extras_rejected(tmp_path, checkpoint):
    state = load_file(checkpoint / "model.safetensors")
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    save_file(
        {**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()},
        tmp_path / "model.safetensors",
    )
    model = load_stream_guard(tmp_path)
    assert torch.equal(model.category_head.weight, state["category_head.weight"])
    save_file({**state, "score.weight": torch.zeros(2, 64)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected keys \['score.weight'\]"):
        load_stream_guard(tmp_path)


def test_sharded_checkpoint_loads(tmp_path, checkpoint, guard):
    state = load_file(checkpoint / "model.safetensors")
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, tmp_path / name)
    weight_map = {k: name for name, part in shards.items() for k in part}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ids = torch.tensor([[7, 8, 9]])
    torch.testing.assert_close(
        load_stream_guard(tmp_path)(ids).risk_level, guard[0](ids).risk_level, atol=0, rtol=0
    )


def test_find_user_turn_uses_the_given_ids():
    roles = RoleTokens(im_start=50, im_end=51, user=52)
    assert find_user_turn([50, 52, 1, 2, 51, 3, 50, 9, 4, 51], roles) == (0, 4)
    # The last user turn wins; `user` must directly follow <|im_start|>; an open turn has no end yet.
    assert find_user_turn([50, 52, 1, 51, 50, 9, 2, 51, 50, 52, 5, 51, 6], roles) == (8, 11)
    assert find_user_turn([50, 52, 1, 51, 50, 52, 7, 8], roles) == (4, None)
    with pytest.raises(ValueError, match="no user turn"):
        find_user_turn([50, 9, 52, 51], roles)


def test_role_boundary_from_tokenizer_and_query_read_at_user_im_end(guard):
    model, tokenizer, roles = guard
    assert roles == RoleTokens(*tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "user"]))
    two_turns = [CONVERSATIONS[1][0], CONVERSATIONS[1][1], *CONVERSATIONS[0]]
    ids = encode(tokenizer, two_turns)
    start, end = find_user_turn(ids, roles)
    text = tokenizer.decode(ids[: end + 1])
    assert text.endswith("<|im_start|>user\nHow do I bake bread at home?<|im_end|>")
    assert (
        tokenizer.decode(ids[:start]).count("<|im_start|>") == 2
    )  # after the first user and assistant turns
    ref = moderate_full(model, ids, roles)
    query, *response = ref.verdicts
    assert (query.position, query.role) == (end, "user")
    q = ref.logits.query_risk_level[end].softmax(-1)
    assert query.risk == model.query_risk_level_map[int(q.argmax())] and query.risk_prob == pytest.approx(
        q.max()
    )
    assert query.category == model.query_category_map[int(ref.logits.query_category[end].argmax())]
    assert [v.position for v in response] == list(range(end + 1, len(ids)))
    assert all(v.role == "assistant" for v in response)
    want = [model.response_risk_level_map[i] for i in ref.logits.risk_level[end + 1 :].argmax(-1).tolist()]
    assert [v.risk for v in response] == want
    assert {v.category for v in response} <= set(RESPONSE_CATEGORIES)
    assert (
        len({v.risk for v in response}) > 1
    )  # the random heads vary along the sequence: labels are read per token


@pytest.mark.parametrize("chunk", [1, 5])
def test_incremental_single_stream_equals_full_forward(guard, monkeypatch, chunk):
    monkeypatch.setattr(stream, "CACHE_BLOCK", 16)  # force several cache re-allocations
    model, tokenizer, roles = guard
    ids = encode(tokenizer, CONVERSATIONS[0])
    _, end = find_user_turn(ids, roles)
    batch = StreamBatch(model, roles, pad_id=tokenizer.pad_token_id)
    steps = batch.prefill([ids[: end + 1]])
    assert [v.role for v in steps[0].verdicts] == ["user"]
    for i in range(end + 1, len(ids), chunk):
        steps.append(batch.feed({0: ids[i : i + chunk]})[0])
    assert_logits_match(steps, moderate_full(model, ids, roles))


def test_prefix_ending_inside_the_user_turn_reads_query_when_im_end_arrives(guard):
    model, tokenizer, roles = guard
    ids = encode(tokenizer, CONVERSATIONS[2])
    _, end = find_user_turn(ids, roles)
    batch = StreamBatch(model, roles)
    steps = batch.prefill([ids[: end - 4]])
    assert steps[0].verdicts == []
    steps.append(batch.feed({0: ids[end - 4 : end + 3]})[0])
    assert [(v.position, v.role) for v in steps[1].verdicts] == [
        (end, "user"),
        (end + 1, "assistant"),
        (end + 2, "assistant"),
    ]
    assert_logits_match(steps, moderate_full(model, ids, roles))


def test_batched_ragged_streams_with_a_drop_equal_their_full_forwards(guard, monkeypatch):
    monkeypatch.setattr(stream, "CACHE_BLOCK", 16)
    model, tokenizer, roles = guard
    seqs = [encode(tokenizer, c) for c in CONVERSATIONS]
    refs = [moderate_full(model, s, roles) for s in seqs]
    ends = [find_user_turn(s, roles)[1] for s in seqs]
    assert len({e + 1 for e in ends}) == 3  # three different prefill lengths, so rows are left-padded
    batch = StreamBatch(model, roles, pad_id=tokenizer.pad_token_id)
    steps = {i: [s] for i, s in enumerate(batch.prefill([s[: e + 1] for s, e in zip(seqs, ends)]))}
    cursor = [e + 1 for e in ends]
    sizes = {0: [1], 1: [3, 1, 2], 2: [1, 0, 4]}  # per stream, cycled: ragged chunks, and sometimes nothing
    for t in range(40):
        if t == 6:
            batch.drop([0])  # stream 0 ends early; the others go on in a compacted cache
            assert batch.active == [1, 2]
        chunks = {}
        for i in batch.active:
            n = sizes[i][t % len(sizes[i])]
            chunks[i] = seqs[i][cursor[i] : cursor[i] + n]
            cursor[i] += len(chunks[i])
        for i, step in batch.feed(chunks).items():
            steps[i].append(step)
    with pytest.raises(KeyError, match=r"streams \[0\] are not open"):
        batch.feed({0: [1]})
    assert cursor[1] == len(seqs[1]) and cursor[2] == len(seqs[2])
    assert_logits_match(steps[0], refs[0], n=ends[0] + 1 + 6)
    assert_logits_match(steps[1], refs[1])
    assert_logits_match(steps[2], refs[2])


def test_moderate_many_equals_moderate_full(guard):
    model, tokenizer, roles = guard
    seqs = [encode(tokenizer, c) for c in CONVERSATIONS]
    many = moderate_many(model, seqs, roles, batch_size=2, pad_id=tokenizer.pad_token_id)
    for seq, step in zip(seqs, many):  # rows of different lengths share a right-padded forward
        assert_logits_match([step], moderate_full(model, seq, roles))
    open_turn = seqs[1][: find_user_turn(seqs[1], roles)[1]]
    with pytest.raises(ValueError, match="conversation 1: the last user turn has no closing"):
        moderate_many(model, [seqs[0], open_turn], roles)


def test_stream_labeler_reads_the_answer_the_reasoning_or_the_query(guard):
    model, tokenizer, roles = guard
    thinking = [CONVERSATIONS[0][0],
                {"role": "assistant", "content": "<think>\nlet me think\n</think>\n\nHello there."}]
    convs = [CONVERSATIONS[0], CONVERSATIONS[0][:1], thinking]
    answer, prompt, answer_after_thinking = StreamLabeler(model, tokenizer, batch_size=2).token_labels(convs)
    ids = encode(tokenizer, convs[0])
    end = find_user_turn(ids, roles)[1]
    assert tokenizer.decode(ids[answer.start :]).startswith("Mix flour")  # after </think> and its blank line
    assert tokenizer.decode(ids[end + 1 : answer.start]).endswith("<think>\n\n</think>\n\n")
    ref = moderate_full(model, ids, roles)
    assert answer.labels == [v.risk for v in ref.verdicts if v.position >= answer.start]
    assert answer.categories == [v.category for v in ref.verdicts if v.position >= answer.start]
    assert (prompt.start, prompt.labels) == (end, [ref.verdicts[0].risk])  # the query head at <|im_end|>
    think_ids = encode(tokenizer, thinking)
    assert tokenizer.decode(think_ids[answer_after_thinking.start :]).startswith("Hello there.")
    (reasoning,) = StreamLabeler(model, tokenizer, thinking=True).token_labels([thinking])
    assert tokenizer.decode(think_ids[reasoning.start :]).startswith("let me think\n</think>")
