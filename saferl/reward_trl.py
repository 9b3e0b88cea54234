"""`saferl reward`: a helpfulness reward model trained on preference pairs through `trl.RewardTrainer`.

Owns the path from preference JSONL to a one-label sequence classifier that `HelpfulnessScorer` (and `saferl
serve rm`) score with:
- Rows are TRL's conversational preference format: `{"chosen": [...], "rejected": [...]}`, each a whole
  conversation ending in the assistant's answer (implicit prompt), or `{"prompt": [...], "chosen": [...],
  "rejected": [...]}` with the answers as one-message assistant lists (explicit prompt); an optional numeric
  `margin` is TRL's margin term. `load_preference_jsonl` checks every row and names the file and line.
- Each side is tokenized here by `saferl.helpfulness.pair_ids`, the scorer's own encoding (the RM tokenizer's
  chat template rendered, then tokenized; a pair over `max_length` cut from its oldest context as the scorer
  cuts it), and TRL receives `chosen_ids` / `rejected_ids` (a processed dataset). TRL's own tokenization
  (`apply_chat_template(tokenize=True)`) can split differently: it would train on inputs the scorer never
  sees.
- Everything else is TRL's and transformers': the Bradley-Terry loss `-log sigmoid(r_chosen - r_rejected
  [- margin])` (`center_rewards_coefficient` as a KEY=VALUE), optimizer, `peft` LoRA (SEQ_CLS: the score head
  trained whole), DeepSpeed, `accelerate launch`, checkpoints and resume, `report_to`.

Not here: the toy world's score-regression RM (scalar targets by style, MSE plus a pairwise term within a
prompt's answers), which stays `saferl.sft.train_regression`, run by the toy world's build.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class PreferencePair:
    """Two whole conversations, each ending in an assistant answer: the preferred one first. `margin`: TRL's
    optional margin (how much higher the chosen one should score), None without one."""

    chosen: Messages
    rejected: Messages
    margin: float | None = None


def _conversation(row: dict, side: str, where: str) -> Messages:
    from saferl.data import check_messages

    answer = check_messages(row[side], where, side)
    if "prompt" in row:
        if len(answer) != 1:
            raise ValueError(f"{where}: with a 'prompt', '{side}' must be the one assistant message that "
                             f"answers it, got {len(answer)} messages")
        conversation = check_messages(row["prompt"], where, "prompt") + answer
    else:
        conversation = answer
    if conversation[-1]["role"] != "assistant":
        raise ValueError(f"{where}: '{side}' must end with the assistant's answer (role 'assistant'), got "
                         f"role {conversation[-1]['role']!r}")
    if len(conversation) < 2:
        raise ValueError(f"{where}: '{side}' has no prompt before the answer (give a 'prompt', or put the "
                         "user turn first)")
    return conversation


def load_preference_jsonl(path: str | Path) -> list[PreferencePair]:
    """Preference pairs from JSONL (see the module docstring); errors name the file and line."""
    from saferl.data import read_jsonl

    pairs = []
    for where, row in read_jsonl(path):
        if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"{where}: expected an object with 'chosen' and 'rejected' (conversations), got "
                             f"{keys}")
        if isinstance(row["chosen"], str) or isinstance(row["rejected"], str):
            raise ValueError(f"{where}: 'chosen' and 'rejected' must be conversations (lists of {{role, "
                             "content}}), not plain text: the RM scores chat-template renderings")
        margin = row.get("margin")
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, int | float)):
            raise ValueError(f"{where}: 'margin' must be a number, got {margin!r}")
        chosen, rejected = _conversation(row, "chosen", where), _conversation(row, "rejected", where)
        pairs.append(PreferencePair(chosen, rejected, None if margin is None else float(margin)))
    if not pairs:
        raise ValueError(f"{path}: no preference pairs")
    if len({p.margin is None for p in pairs}) > 1:
        raise ValueError(f"{path}: 'margin' is on some rows and not others (TRL's collator needs all or "
                         "none)")
    return pairs


def conversation_ids(tokenizer: Any, conversation: Messages, max_length: int) -> list[int]:
    """The scorer's input ids for a conversation ending in the assistant's answer (`helpfulness.pair_ids`)."""
    from saferl.helpfulness import pair_ids

    ids, _ = pair_ids(tokenizer, conversation[:-1], conversation[-1]["content"], max_length)
    return ids


def preference_dataset(tokenizer: Any, pairs: Sequence[PreferencePair], max_length: int) -> Any:
    """A `datasets.Dataset` of `chosen_ids`, `rejected_ids` (and `margin` when the pairs have one)."""
    from datasets import Dataset

    columns: dict[str, list] = {
        "chosen_ids": [conversation_ids(tokenizer, p.chosen, max_length) for p in pairs],
        "rejected_ids": [conversation_ids(tokenizer, p.rejected, max_length) for p in pairs],
    }
    if pairs[0].margin is not None:
        columns["margin"] = [p.margin for p in pairs]
    return Dataset.from_dict(columns)


def reward_config(out: str, *, steps: int, batch_size: int, lr: float, seed: int, max_length: int,
                  deepspeed: str | None, overrides: Sequence[str]) -> Any:
    """`trl.RewardConfig` for `saferl reward` (`sft_trl.training_args`; `max_length` as the scorer's)."""
    from trl import RewardConfig

    from saferl.sft_trl import training_args

    return training_args(RewardConfig, out, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                         deepspeed=deepspeed, overrides=overrides, ours=["--max_length", str(max_length)])


def train_reward_model(model: str, pairs: Sequence[PreferencePair], out: str, *, config: Any, lora: Any,
                       merge: bool = False) -> list[dict[str, float]]:
    """Train `model` (a model directory or hub id: a causal LM gets a new one-label score head, a one-label
    classifier keeps its own) on `pairs` with `trl.RewardTrainer` and save to `out`.

    Args:
        config: the `trl.RewardConfig` (`reward_config`); its `max_length` cuts pairs as the scorer does.
        lora: a peft `LoraConfig` (task_type SEQ_CLS), or None for full fine-tuning.
        merge: with LoRA, also save the merged classifier to `out/merged` (the adapter is in `out`).

    Returns:
        The training log entries, in order (one every `logging_steps`: loss, accuracy, margin, ...).
    """
    from transformers import AutoTokenizer
    from trl import RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(model)  # TRL pads with pad_token=, the tokenizer's, or EOS
    trainer = RewardTrainer(model=model, args=config,
                            train_dataset=preference_dataset(tokenizer, pairs, config.max_length),
                            processing_class=tokenizer, peft_config=lora)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(out)  # the adapter (and the score head) alone under LoRA; full weights otherwise
    if trainer.accelerator.is_main_process:
        trainer.state.save_to_json(str(Path(out) / "trainer_state.json"))
        if lora is not None and merge:
            from saferl.sft_trl import merge_adapter

            merge_adapter(model, out, Path(out) / "merged", task_type="SEQ_CLS")
    trainer.accelerator.wait_for_everyone()
    return [entry for entry in trainer.state.log_history if "loss" in entry]
