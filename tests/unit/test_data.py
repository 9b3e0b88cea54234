import pytest

from saferl.data import PromptSampler, load_prompts
from saferl.types import Prompt


def test_malformed_line_names_file_and_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "hi"}\n{not json}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: not valid JSON"):
        load_prompts(f)


def test_missing_field_names_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "hi"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: missing column 'prompt' .*the row has \['text'\]"):
        load_prompts(f)


def test_empty_file_and_missing_file(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: no prompts"):
        load_prompts(f)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_prompts(tmp_path / "nope.jsonl")


def test_last_message_must_be_user(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    with pytest.raises(ValueError, match="p.jsonl:1: the last message of column 'messages' must be the user's"):
        load_prompts(f)


def test_sampler_covers_epoch_without_repeats_and_is_seeded():
    prompts = [Prompt(id=str(i), messages=[{"role": "user", "content": str(i)}]) for i in range(10)]
    s = PromptSampler(prompts, seed=3)
    first = [p.id for p in s.next_batch(10)]
    assert sorted(first) == sorted(p.id for p in prompts)
    assert s.epoch == 0
    s.next_batch(1)
    assert s.epoch == 1
    assert [p.id for p in PromptSampler(prompts, seed=3).next_batch(10)] == first


def test_sampler_rejects_empty_set():
    with pytest.raises(ValueError, match="empty"):
        PromptSampler([], seed=0)
