"""`saferl sft` on TRL without training: the dataset TRL receives, its SFTConfig, the options it refuses."""

import json

import pytest

from saferl.cli import main
from saferl.guard.templates import GUARD_CHAT_TEMPLATE, format_verdict, moderation_messages
from saferl.sft import chat_example
from saferl.sft_trl import one_process_env, sft_config, tokenized_dataset
from saferl.toyworld import world
from saferl.toyworld.tokenizer import train_bpe_tokenizer
from saferl.types import SafetyLabel


def test_dataset_is_the_hand_written_encoding_with_the_loss_on_the_completion():
    tok = train_bpe_tokenizer(world.corpus_texts()[:400], 400)
    tok.chat_template = GUARD_CHAT_TEMPLATE
    p = world.make_prompts("train")[0]
    rows = [(moderation_messages(p.messages, None), format_verdict(SafetyLabel.SAFE, [], None)),
            (moderation_messages(p.messages, "Sure."), format_verdict(SafetyLabel.SAFE, [], False))]
    ds = tokenized_dataset(tok, rows)
    for (messages, completion), got in zip(rows, ds):
        want = chat_example(tok, messages, completion)
        assert got["input_ids"] == want.prompt_ids + want.target_ids
        assert got["completion_mask"] == [0] * len(want.prompt_ids) + [1] * len(want.target_ids)
        assert got["input_ids"][-1] == tok.eos_token_id


def test_sft_config_defaults_and_typed_overrides(tmp_path):
    config = sft_config(str(tmp_path), steps=7, batch_size=3, lr=5e-4, seed=2, deepspeed=None,
                        overrides=["gradient_accumulation_steps=4", "gradient_checkpointing=false"])
    assert (config.max_steps, config.per_device_train_batch_size, config.learning_rate) == (7, 3, 5e-4)
    assert config.seed == 2
    assert config.completion_only_loss is True
    assert config.gradient_accumulation_steps == 4 and config.gradient_checkpointing is False
    later = sft_config(str(tmp_path), steps=7, batch_size=3, lr=5e-4, seed=2, deepspeed=None,
                       overrides=["max_steps=9"])
    assert later.max_steps == 9  # KEY=VALUE comes after the named options
    with pytest.raises(ValueError, match="no_such_field"):
        sft_config(str(tmp_path), steps=1, batch_size=1, lr=1e-4, seed=0, deepspeed=None,
                   overrides=["no_such_field=1"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        sft_config(str(tmp_path), steps=1, batch_size=1, lr=1e-4, seed=0, deepspeed=None, overrides=["bf16"])


@pytest.mark.parametrize("extra, message", [
    (["--trainer", "saferl", "--lora-rank", "8"], "--lora-rank: TRL options"),
    (["--trainer", "saferl", "bf16=true"], "KEY=VALUE: TRL options"),
    (["--share-prefix"], "--share-prefix is the hand-written loop's batching"),
    (["--merge"], "--merge folds a LoRA adapter"),
])
def test_sft_refuses_options_that_do_not_apply(tmp_path, capsys, extra, message):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "completion": "ok"}) + "\n")
    assert main(["sft", "--model", str(tmp_path / "none"), "--data", str(data), "--out", str(tmp_path / "o"),
                 *extra]) == 2
    assert message in capsys.readouterr().err


def test_one_process_env_only_without_a_launcher():
    assert one_process_env({}, 1234) == {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1234"}
    assert one_process_env({"WORLD_SIZE": "8", "RANK": "3"}, 1234) == {}
