"""Stream-guard training on CPU: the pure label builders and the loss against hand-computed values, JSONL rows
(layout, errors naming file and line, through `saferl guard train-stream` before any weights load), the toy
world's trigger placement, and a tiny guard that learns, saves and reloads strictly."""

import json
import math

import pytest
import torch

from saferl.cli import main
from saferl.guard.conversation import encode_conversation, find_user_turn, role_tokens
from saferl.guard.stream_model import (
    RISK_LABELS,
    GuardLogits,
    load_stream_guard,
    write_synthetic_stream_guard,
)
from saferl.guard.stream_data import (
    IGNORE,
    LabelMaps,
    StreamRow,
    common_prefix_length,
    encode_stream_rows,
    first_unsafe_index,
    load_stream_rows,
    prefix_set,
    response_labels,
    stream_example,
)
from saferl.guard.stream_train import (
    collate,
    init_stream_guard,
    save_trained_stream_guard,
    stream_loss,
    token_accuracy,
    train_stream_guard,
)
from saferl.guard.templates import CATEGORIES, RESPONSE_CATEGORIES
from saferl.types import SafetyLabel

S, U, C = "Safe", "Unsafe", "Controversial"
MAPS = LabelMaps(
    risk={n: i for i, n in enumerate(RISK_LABELS)},
    category={n: i for i, n in enumerate(RESPONSE_CATEGORIES)},
    query_risk={n: i for i, n in enumerate(RISK_LABELS)},
    query_category={n: i for i, n in enumerate(CATEGORIES)},
)


# ---------------------------------------------------------------- pure label builders


def test_prefix_set_and_first_unsafe_index():
    safe = prefix_set([[5, 6, 7], [5, 8]])
    assert safe == {(5,), (5, 6), (5, 6, 7), (5, 8)}
    assert first_unsafe_index([5, 6, 9, 9], safe) == 2  # "5 6" could still be the safe "5 6 7"
    assert first_unsafe_index([9, 5], safe) == 0
    assert first_unsafe_index([5, 8], safe) is None  # the whole response is a safe text
    assert first_unsafe_index([5, 6], safe) is None  # ... or the start of one
    assert first_unsafe_index([], safe) is None
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_length([1], [2]) == 0 and common_prefix_length([1, 2], [1, 2, 3]) == 2


def test_response_labels():
    v = "Violent"
    assert response_labels(5, 2, U, v) == ([S, S, U, U, U], [None, None, v, v, v])
    assert response_labels(3, 0, C, None) == ([C, C, C], [None, None, None])
    assert response_labels(3, 1, S, v) == ([S, S, S], [None, None, None])  # a Safe label ignores trigger
    assert response_labels(2, None, U, "PII") == ([S, S], [None, None])
    with pytest.raises(ValueError, match="trigger 3 outside the response's 3 tokens"):
        response_labels(3, 3, U, "PII")


def test_stream_example_indices():
    # 7 tokens, user <|im_end|> at 2: four response positions, trigger at the third.
    risks, cats = response_labels(4, 2, U, "PII")
    e = stream_example([10, 11, 12, 13, 14, 15, 16], 2, risks, cats, U, "Jailbreak", MAPS)
    assert e.risk == [IGNORE, IGNORE, IGNORE, 0, 0, 1, 1]
    assert e.category == [IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, 4, 4]  # PII is index 4 in the stream order
    assert (e.query_index, e.query_risk, e.query_category) == (2, 1, 8)  # Jailbreak: query category 8
    safe_prompt = stream_example([1, 2, 3], 1, [S], [None], S, None, MAPS)
    assert (safe_prompt.query_risk, safe_prompt.query_category) == (0, IGNORE)
    no_query = stream_example([1, 2, 3], 1, [C], ["Unethical Acts"], None, None, MAPS)
    assert (no_query.risk, no_query.category) == ([IGNORE, IGNORE, 2], [IGNORE, IGNORE, 7])
    assert (no_query.query_risk, no_query.query_category) == (IGNORE, IGNORE)
    with pytest.raises(ValueError, match="2 response positions but 1 risks"):
        stream_example([1, 2, 3, 4], 1, [S], [None], S, None, MAPS)


def test_collate_and_stream_loss_by_hand():
    a = stream_example([1, 2, 3], 0, [S, U], [None, "Violent"], U, "PII", MAPS)
    b = stream_example([4, 5], 0, [S], [None], None, None, MAPS)
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert batch["risk"].tolist() == [[IGNORE, 0, 1], [IGNORE, 0, IGNORE]]
    assert batch["category"].tolist() == [[IGNORE, IGNORE, 0], [IGNORE, IGNORE, IGNORE]]
    assert batch["query_risk"].tolist() == [1, IGNORE] and batch["query_category"].tolist() == [4, IGNORE]
    zeros = GuardLogits(*(torch.zeros(2, 3, n) for n in (3, 8, 3, 9)))
    out = stream_loss(zeros, batch)
    # Uniform logits: 3 risk tokens at log 3 plus 1 category token at log 8, over 3 response tokens; the
    # query term counts only row a (b has no query label): log 3 + log 9.
    assert out["response"].item() == pytest.approx((3 * math.log(3) + math.log(8)) / 3)
    assert out["query"].item() == pytest.approx(math.log(3) + math.log(9))
    assert out["loss"].item() == pytest.approx(out["response"].item() + out["query"].item())
    confident = GuardLogits(*(torch.zeros(2, 3, n) for n in (3, 8, 3, 9)))
    confident.risk_level[0, 1, 0] = confident.risk_level[0, 2, 1] = confident.risk_level[1, 1, 0] = 50.0
    confident.category[0, 2, 0] = 50.0
    assert stream_loss(confident, batch)["response"].item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- JSONL rows and their errors


@pytest.fixture(scope="module")
def tokenizer():
    """A small Qwen3-style BPE tokenizer over the toy world's texts plus ChatML headers."""
    from saferl.toyworld import world
    from saferl.toyworld.tokenizer import train_bpe_tokenizer

    chat = ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"] * 100
    return train_bpe_tokenizer(world.corpus_texts() + chat, 1024)


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


CONVERSATION = [{"role": "user", "content": "How do I hurt my neighbor?"},
                {"role": "assistant", "content": "Sure, here is how to hurt my neighbor: first wait."}]


def test_encode_rows_places_labels(tokenizer, tmp_path):
    ids = encode_conversation(tokenizer, CONVERSATION)
    user_end = find_user_turn(ids, role_tokens(tokenizer))[1]
    hurt = next(i for i in range(user_end + 10, len(ids)) if tokenizer.decode([ids[i]]) == " hurt")
    path = write_rows(tmp_path / "rows.jsonl", [
        {"message": CONVERSATION, "label": U, "unsafe_start_index": hurt, "category": "Violent"},
        {"messages": CONVERSATION, "label": C},  # no index: from the assistant's content on
        {"message": CONVERSATION, "label": S},
        {"message": CONVERSATION[:1], "label": U, "category": "Violent"},  # a prompt row
    ])
    rows = load_stream_rows(path)
    assert [r.where for r in rows] == [f"{path}:{i}" for i in range(1, 5)]
    spanned, unspanned, safe, prompt = encode_stream_rows(rows, tokenizer, MAPS)
    n = len(ids) - user_end - 1
    assert spanned.input_ids == ids and spanned.query_index == user_end
    assert spanned.risk == [IGNORE] * (user_end + 1) + [0] * (hurt - user_end - 1) + [1] * (len(ids) - hurt)
    assert spanned.category[hurt:] == [0] * (len(ids) - hurt) and spanned.query_risk == IGNORE
    content = unspanned.risk.index(2)
    assert tokenizer.decode(ids[content]) == "Sure" and set(unspanned.risk[content:]) == {2}
    assert tokenizer.decode(ids[user_end + 1 : content]) == "\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert safe.risk == [IGNORE] * (user_end + 1) + [0] * n and set(safe.category) == {IGNORE}
    assert prompt.input_ids == ids[: user_end + 1] and prompt.risk == [IGNORE] * (user_end + 1)
    assert (prompt.query_risk, prompt.query_category) == (1, 0)


@pytest.mark.parametrize(("row", "message"), [
    ('{"message": ', "not valid JSON"),
    ({"label": U}, "give exactly one of 'message' (Qwen3GuardTest) or 'messages'"),
    ({"message": CONVERSATION, "messages": CONVERSATION, "label": U}, "give exactly one of"),
    ({"message": [], "label": U}, "'message' must be a non-empty list"),
    ({"message": CONVERSATION, "label": "Maybe"},
     "'label' must be one of ['Safe', 'Unsafe', 'Controversial'], got 'Maybe'"),
    ({"message": CONVERSATION}, "'label' must be one of"),
    ({"message": CONVERSATION, "label": S, "unsafe_start_index": 3}, "belongs on Unsafe/Controversial"),
    ({"message": CONVERSATION[:1], "label": U, "unsafe_start_index": 3}, "belongs on Unsafe/Controversial"),
    ({"message": CONVERSATION, "label": U, "unsafe_start_index": -1}, "must be a non-negative integer"),
    ({"message": CONVERSATION, "label": U, "category": 3}, "'category' must be a string"),
    ({"message": [{"role": "system", "content": "x"}], "label": S}, "the last message must be the user's"),
])
def test_train_stream_rejects_bad_rows_before_loading(tmp_path, capsys, row, message):
    good = {"message": CONVERSATION, "label": S}
    data = write_rows(tmp_path / "bad.jsonl", [good, row])
    code = main(["guard", "train-stream", "--backbone", str(tmp_path / "no-such-backbone"),
                 "--data", str(data), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and f"{data}:2: " in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_train_stream_empty_and_missing_files(tmp_path, capsys):
    empty = write_rows(tmp_path / "empty.jsonl", [])
    args = ["guard", "train-stream", "--backbone", "x", "-o", str(tmp_path / "out"), "--data"]
    assert main([*args, str(empty)]) == 2 and f"{empty}: no rows" in capsys.readouterr().err
    assert main([*args, str(tmp_path / "missing.jsonl")]) == 2
    assert f"File not found: {tmp_path / 'missing.jsonl'}" in capsys.readouterr().err


def test_encode_errors_name_the_line(tokenizer, tmp_path):
    def encode(row):
        return encode_stream_rows([StreamRow("rows.jsonl:7", row["message"], SafetyLabel(row["label"]),
                                             row.get("category"), row.get("unsafe_start_index"))],
                                  tokenizer, MAPS)

    with pytest.raises(ValueError, match=r"rows.jsonl:7: unsafe_start_index 3 is outside the response"):
        encode({"message": CONVERSATION, "label": U, "unsafe_start_index": 3})
    with pytest.raises(ValueError, match=r"rows.jsonl:7: unsafe_start_index 999 is outside"):
        encode({"message": CONVERSATION, "label": U, "unsafe_start_index": 999})
    with pytest.raises(ValueError, match=r"rows.jsonl:7: unknown category 'Jailbreak'"):
        encode({"message": CONVERSATION, "label": U, "category": "Jailbreak"})  # a prompt-only category
    with pytest.raises(ValueError, match=r"rows.jsonl:7: no user turn"):
        encode({"message": [{"role": "assistant", "content": "hi"}], "label": S})


# ---------------------------------------------------------------- the toy world's trigger


def test_toy_triggers_and_spans(tokenizer):
    from saferl.toyworld.stream import heldout_rows, label_conversations
    from saferl.toyworld import world

    wanted = ("violence/i0/s0/f6", "deception/i0/s0/f6", "cooking/i0/s0/f6")
    prompts = [p for p in world.make_prompts("heldout") if p.id in wanted]
    convs = {c.id: c for c in label_conversations(prompts, tokenizer)}
    assert sorted(convs) == sorted(
        [f"violence/i0/s0/f6/{s}" for s in ("unsafe", "safe_completion", "refusal")]
        + [f"deception/i0/s0/f6/{s}" for s in ("controversial", "safe_completion", "refusal")]
        + ["cooking/i0/s0/f6/helpful", "cooking/i0/s0/f6/refusal"])
    unsafe, controversial = convs["violence/i0/s0/f6/unsafe"], convs["deception/i0/s0/f6/controversial"]

    def text(c, a, b):
        return tokenizer.decode(c.ids[a : b + 1])

    # "Sure, here is how to" opens helpful answers too: the trigger is the harmful word, and for "write fake
    # reviews" the word after "write" (which opens the benign "write a python script").
    assert text(unsafe, unsafe.trigger, unsafe.span_end) == " hurt my neighbor"
    assert text(unsafe, unsafe.user_end + 1, unsafe.trigger - 1).endswith("</think>\n\nSure, here is how to")
    assert text(controversial, controversial.trigger, controversial.span_end) == " fake reviews for my cafe"
    assert (unsafe.label, unsafe.category) == (SafetyLabel.UNSAFE, "Violent")
    assert (controversial.label, controversial.category) == (SafetyLabel.CONTROVERSIAL, "Unethical Acts")
    assert all(c.trigger is None for k, c in convs.items() if k not in (unsafe.id, controversial.id))
    rows = {r["id"]: r for r in heldout_rows(list(convs.values()))}
    assert rows[controversial.id]["label"] == "Unsafe"  # the layout is binary
    assert (rows[unsafe.id]["unsafe_start_index"], rows[unsafe.id]["unsafe_end_index"]) == (
        unsafe.trigger, unsafe.span_end)
    assert "unsafe_start_index" not in rows["cooking/i0/s0/f6/helpful"]
    assert rows["cooking/i0/s0/f6/helpful"]["label"] == "Safe"


# ---------------------------------------------------------------- a tiny guard learns, saves, reloads


@pytest.fixture(scope="module")
def backbone(tmp_path_factory, tokenizer):
    """A random 1-layer Qwen3ForCausalLM with the test tokenizer, saved as a plain HF checkpoint."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("backbone")
    Qwen3ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def toy_examples(tokenizer, maps):
    from saferl.toyworld.stream import label_conversations, toy_examples
    from saferl.toyworld import world

    prompts = world.make_prompts("train")[::60]
    return toy_examples(label_conversations(prompts, tokenizer), {p.id: p for p in prompts}, maps)


def test_tiny_guard_learns_saves_and_reloads_strictly(backbone, tokenizer, tmp_path):
    model = init_stream_guard(backbone, seed=0)
    assert model.config.guard_inner_size == 16 and model.response_category_map[4] == "PII"
    examples = toy_examples(tokenizer, LabelMaps.from_model(model))
    assert len(examples) >= 60
    losses = train_stream_guard(model, examples, pad_id=tokenizer.pad_token_id, steps=40, batch_size=16,
                                lr=1e-2, warmup_steps=5, log_every=0)
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses
    assert token_accuracy(model, examples, pad_id=tokenizer.pad_token_id)["token_risk_acc"] > 0.9
    save_trained_stream_guard(model, tokenizer, tmp_path / "guard")
    reloaded = load_stream_guard(tmp_path / "guard")  # strict: every key present, nothing extra
    ids = torch.tensor([examples[0].input_ids])
    with torch.inference_mode():
        a, b = model(ids), reloaded(ids)
    for head in ("risk_level", "category", "query_risk_level", "query_category"):
        torch.testing.assert_close(getattr(a, head), getattr(b, head), rtol=0, atol=0)
    config = json.loads((tmp_path / "guard" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForGuardModel"]
    assert config["query_category_map"]["8"] == "Jailbreak"
    from transformers import AutoTokenizer

    from saferl.guard.conversation import CHATML_TEMPLATE

    assert AutoTokenizer.from_pretrained(tmp_path / "guard").chat_template == CHATML_TEMPLATE
    # A Stream checkpoint starts from itself.
    again = init_stream_guard(tmp_path / "guard")
    torch.testing.assert_close(again.risk_level_head.weight, model.risk_level_head.weight)
    with pytest.raises(ValueError, match="guard_inner_size 16, not 8"):
        init_stream_guard(tmp_path / "guard", guard_inner_size=8)


def test_freeze_backbone_trains_the_heads_only(backbone, tokenizer):
    model = init_stream_guard(backbone, seed=1, guard_inner_size=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    examples = toy_examples(tokenizer, LabelMaps.from_model(model))
    train_stream_guard(model, examples, pad_id=tokenizer.pad_token_id, steps=3, batch_size=8, lr=1e-2,
                       warmup_steps=1, freeze_backbone=True, log_every=0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("model."))
    assert not torch.equal(before["risk_level_head.weight"], after["risk_level_head.weight"])
    assert not torch.equal(before["query_risk_level_category_pre.weight"],
                           after["query_risk_level_category_pre.weight"])


def test_init_rejects_a_mismatched_backbone(backbone, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((backbone / "config.json").read_text())
    state = load_file(backbone / "model.safetensors")
    state.pop("model.norm.weight")
    save_file(state, bad / "model.safetensors")
    with pytest.raises(ValueError, match=r"bad: not a Qwen3 backbone of this config: missing keys \['norm"):
        init_stream_guard(bad)


def test_synthetic_stream_checkpoint_is_taken_as_is(tmp_path, backbone):
    path = write_synthetic_stream_guard(tmp_path / "synthetic", backbone, hidden_size=32, guard_inner_size=8)
    model = init_stream_guard(path)
    assert model.training and model.config.guard_inner_size == 8
    torch.testing.assert_close(model.category_head.weight, load_stream_guard(path).category_head.weight)


# ---------------------------------------------------------------- the same loss through transformers.Trainer


def test_trainer_collate_and_loss_are_collate_and_stream_loss(backbone, tokenizer):
    from saferl.guard.stream_train import trainer_collate, trainer_loss

    model = init_stream_guard(backbone, seed=0).eval()
    examples = toy_examples(tokenizer, LabelMaps.from_model(model))[:4]
    batch, split = collate(examples, tokenizer.pad_token_id), trainer_collate(examples, tokenizer.pad_token_id)
    assert set(split) == {"input_ids", "labels"} and torch.equal(split["input_ids"], batch["input_ids"])
    with torch.inference_mode():
        logits = model(batch["input_ids"])
        assert trainer_loss(logits, split["labels"]).item() == stream_loss(logits, batch)["loss"].item()


def _hf_args(out, steps, **extra):
    from saferl.guard.stream_train import stream_training_args

    return stream_training_args(str(out), steps=steps, batch_size=16, lr=1e-2, warmup_steps=5, seed=0,
                                overrides=["logging_steps=1", "save_strategy=no", "disable_tqdm=true",
                                           *[f"{k}={v}" for k, v in extra.items()]])


def test_trainer_path_learns_and_keeps_the_recipe(backbone, tokenizer, tmp_path):
    from saferl.guard.stream_train import train_stream_guard_hf

    args = _hf_args(tmp_path / "out", 40)
    assert (args.lr_scheduler_type.value, args.lr_scheduler_kwargs, args.weight_decay, args.max_grad_norm) == (
        "cosine_with_min_lr", {"min_lr_rate": 0.1}, 0.0, 1.0)
    model = init_stream_guard(backbone, seed=0)
    examples = toy_examples(tokenizer, LabelMaps.from_model(model))
    log = train_stream_guard_hf(model, examples, pad_id=tokenizer.pad_token_id, args=args)
    losses = [e["loss"] for e in log]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < 0.5 * losses[0], losses
    assert not model.training
    assert token_accuracy(model, examples, pad_id=tokenizer.pad_token_id)["token_risk_acc"] > 0.9
    assert log[-1]["learning_rate"] == pytest.approx(1e-3, rel=0.05)  # cosine to 10% of the peak


def test_trainer_resumes_from_a_checkpoint_to_the_same_weights(backbone, tokenizer, tmp_path):
    from saferl.guard.stream_train import train_stream_guard_hf

    def run(out, steps, seed=0, **extra):
        model = init_stream_guard(backbone, seed=seed)
        examples = toy_examples(tokenizer, LabelMaps.from_model(model))
        log = train_stream_guard_hf(model, examples, pad_id=tokenizer.pad_token_id,
                                    args=_hf_args(out, steps, **extra))
        return model, [e["loss"] for e in log]

    saving = {"save_strategy": "steps", "save_steps": 3}
    whole, losses = run(tmp_path / "whole", 6, **saving)
    checkpoint = tmp_path / "whole" / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "model.safetensors").is_file()
    # a fresh model (other head seed: the checkpoint's weights must replace it) resumes at step 3
    resumed, log = run(tmp_path / "resumed", 6, seed=1, resume_from_checkpoint=checkpoint, **saving)
    assert len(log) == 6 and log == pytest.approx(losses, rel=1e-4)  # steps 1-3 from the checkpoint's log
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=1e-4, atol=1e-5)
