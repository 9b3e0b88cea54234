"""`saferl reward` without training: preference rows as read and as encoded for TRL, RewardConfig, bad input."""

import json

import pytest

from saferl.cli import main
from saferl.helpfulness import pair_ids
from saferl.reward_trl import PreferencePair, load_preference_jsonl, preference_dataset, reward_config

USER = {"role": "user", "content": "How do I boil an egg?"}
GOOD = {"role": "assistant", "content": "Simmer it for eight minutes."}
BAD = {"role": "assistant", "content": "No."}


def _write(tmp_path, *lines):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_both_trl_forms_read_as_whole_conversations(tmp_path):
    path = _write(tmp_path, {"chosen": [USER, GOOD], "rejected": [USER, BAD]}, "",
                  {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]})
    assert load_preference_jsonl(path) == [PreferencePair([USER, GOOD], [USER, BAD])] * 2
    with_margin = _write(tmp_path, {"chosen": [USER, GOOD], "rejected": [USER, BAD], "margin": 2})
    assert load_preference_jsonl(with_margin)[0].margin == 2.0


@pytest.mark.parametrize("line, message", [
    ("{not json", ":2: not valid JSON"),
    ({"chosen": [USER, GOOD]}, ":2: expected an object with 'chosen' and 'rejected'"),
    ({"chosen": "Simmer.", "rejected": "No."}, ":2: 'chosen' and 'rejected' must be conversations"),
    ({"chosen": [USER, GOOD], "rejected": [USER]}, ":2: 'rejected' must end with the assistant's answer"),
    ({"chosen": [GOOD], "rejected": [BAD]}, ":2: 'chosen' has no prompt before the answer"),
    ({"prompt": [USER], "chosen": [USER, GOOD], "rejected": [BAD]}, ":2: with a 'prompt', 'chosen' must be"),
    ({"chosen": [USER, {"role": "assistant"}], "rejected": [USER, BAD]}, ":2: 'chosen' must be a non-empty"),
    ({"chosen": [USER, GOOD], "rejected": [USER, BAD], "margin": "big"}, ":2: 'margin' must be a number"),
])
def test_bad_rows_name_the_file_and_line(tmp_path, line, message):
    path = _write(tmp_path, {"chosen": [USER, GOOD], "rejected": [USER, BAD]}, line)
    with pytest.raises(ValueError, match=f"^{path}{message}".replace("(", r"\(").replace(")", r"\)")):
        load_preference_jsonl(path)


def test_missing_file_empty_file_and_mixed_margins(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_preference_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="no preference pairs"):
        load_preference_jsonl(_write(tmp_path, ""))
    mixed = _write(tmp_path, {"chosen": [USER, GOOD], "rejected": [USER, BAD], "margin": 1},
                   {"chosen": [USER, GOOD], "rejected": [USER, BAD]})
    with pytest.raises(ValueError, match="on some rows and not others"):
        load_preference_jsonl(mixed)


def test_cli_names_the_bad_line_before_loading_a_model(tmp_path, capsys):
    path = _write(tmp_path, {"chosen": [USER, GOOD], "rejected": [USER, BAD]}, "{")
    assert main(["reward", "--model", str(tmp_path / "none"), "--data", str(path), "--out",
                 str(tmp_path / "o")]) == 2
    assert f"{path}:2: not valid JSON" in capsys.readouterr().err
    assert main(["reward", "--model", "m", "--data", str(tmp_path / "missing.jsonl"), "--out", "o"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_dataset_is_the_scorers_encoding(tiny_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer(["how", "do", "boil", "an", "egg", "simmer", "no"]))
    pairs = [PreferencePair([USER, GOOD], [USER, BAD], 1.5), PreferencePair([USER, BAD], [USER, GOOD], 0.0)]
    ds = preference_dataset(tok, pairs, max_length=1024)
    for pair, row in zip(pairs, ds):
        assert row["chosen_ids"] == pair_ids(tok, [USER], pair.chosen[-1]["content"], 1024)[0]
        assert row["rejected_ids"] == pair_ids(tok, [USER], pair.rejected[-1]["content"], 1024)[0]
    assert ds["margin"] == [1.5, 0.0]
    short = preference_dataset(tok, pairs[:1], max_length=len(ds[0]["chosen_ids"]) - 2)
    assert short[0]["chosen_ids"] == pair_ids(tok, [USER], GOOD["content"], len(ds[0]["chosen_ids"]) - 2)[0]
    assert len(short[0]["chosen_ids"]) <= len(ds[0]["chosen_ids"]) - 2  # cut as the scorer cuts


def test_reward_config_defaults_and_overrides(tmp_path):
    config = reward_config(str(tmp_path), steps=5, batch_size=4, lr=2e-4, seed=3, max_length=512,
                           deepspeed=None, overrides=["center_rewards_coefficient=0.01", "report_to=none"])
    assert (config.max_steps, config.per_device_train_batch_size, config.learning_rate) == (5, 4, 2e-4)
    assert config.max_length == 512 and config.center_rewards_coefficient == 0.01
    with pytest.raises(ValueError, match="completion_only_loss"):
        reward_config(str(tmp_path), steps=1, batch_size=1, lr=1e-4, seed=0, max_length=8, deepspeed=None,
                      overrides=["completion_only_loss=true"])  # an SFTConfig field, not a RewardConfig one
