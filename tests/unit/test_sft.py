import json

import torch

from saferl.cli import main
from saferl.config import ModelShape
from saferl.guard.templates import GUARD_CHAT_TEMPLATE, format_verdict, moderation_messages
from saferl.sft import _collate_lm, _lm_loss, chat_example
from saferl.toyworld import world
from saferl.toyworld.build import new_model
from saferl.toyworld.tokenizer import train_bpe_tokenizer
from saferl.types import SafetyLabel

SHAPE = ModelShape(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64)


def _guard_tokenizer():
    tok = train_bpe_tokenizer(world.corpus_texts()[:400], 400)
    tok.chat_template = GUARD_CHAT_TEMPLATE
    return tok


def _examples(tok, n=6):
    out = []
    for p in world.make_prompts("train")[:: 1920 // n][:n]:
        text = world.responses_for(p)["refusal"][0]
        v = world.response_verdict(p, "refusal")
        out.append(chat_example(tok, moderation_messages(p.messages, text),
                                format_verdict(v.safety, v.categories, v.refusal)))
    return out


def test_shared_prefix_gives_same_loss_and_gradient():
    tok = _guard_tokenizer()
    examples = _examples(tok)
    model = new_model(SHAPE, tok, head="lm", seed=0)
    grads = []
    for share in (False, True):
        model.zero_grad()
        batch = _collate_lm(examples, tok.pad_token_id, share)
        assert (int(batch["shared_prefix"]) > 50) == share  # the guard instruction is shared
        loss = _lm_loss(model, batch)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    (l0, g0), (l1, g1) = grads
    assert abs(l0 - l1) < 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(g0, g1)) < 1e-5


def test_loss_only_on_targets():
    tok = _guard_tokenizer()
    ex = _examples(tok, 2)
    batch = _collate_lm(ex, tok.pad_token_id)
    assert (batch["labels"] != -100).sum().item() == sum(len(e.target_ids) for e in ex)
    assert ex[0].target_ids[-1] == tok.eos_token_id


def test_sft_cli_trains_a_gen_format_guard(tmp_path):
    tok = _guard_tokenizer()
    model = new_model(SHAPE, tok, head="lm", seed=0)
    model.save_pretrained(tmp_path / "init")
    tok.save_pretrained(tmp_path / "init")
    rows = [{"messages": [{"role": "user", "content": "How do I hurt my neighbor?"}],
             "completion": format_verdict(SafetyLabel.UNSAFE, ["Violent"], None)}] * 4
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["sft", "--model", str(tmp_path / "init"), "--data", str(tmp_path / "rows.jsonl"),
                 "--out", str(tmp_path / "out"), "--steps", "3", "--batch-size", "2", "--lr", "1e-2",
                 "--trainer", "saferl", "--share-prefix"]) == 0
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    before = model.state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(trained.state_dict()["model.layers.0.mlp.up_proj.weight"], before)


def test_sft_jsonl_errors_name_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}], "completion": "x"}\n{"messages": []}\n')
    assert main(["sft", "--model", str(tmp_path), "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:2: expected an object with 'messages' and 'completion'" in capsys.readouterr().err


def test_pairwise_loss_by_hand():
    """softplus(1 - (s_i - s_j)) over the pairs of one group with target_i > target_j; ungrouped (-1) and
    cross-group pairs do not count."""
    import math

    import torch

    from saferl.sft import pairwise_loss

    scores = torch.tensor([2.0, 0.0, 1.0, 5.0, -5.0])
    targets = torch.tensor([3.0, -3.0, -1.0, 3.0, -3.0])
    groups = torch.tensor([0, 0, 1, -1, -1])
    assert math.isclose(pairwise_loss(scores, targets, groups).item(), math.log1p(math.exp(-1.0)), rel_tol=1e-6)
    # Three pairs in group 0: 0 over 1 (margin 1 - 2), 0 over 2 (1 - 1) and 2 over 1 (1 - 1); their mean.
    groups = torch.tensor([0, 0, 0, -1, -1])
    want = (math.log1p(math.exp(-1.0)) + 2 * math.log(2.0)) / 3
    assert math.isclose(pairwise_loss(scores, targets, groups).item(), want, rel_tol=1e-6)
    assert pairwise_loss(scores, targets, torch.full((5,), -1)).item() == 0.0
