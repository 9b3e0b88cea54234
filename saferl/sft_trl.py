"""`saferl sft` on TRL: chat SFT (e.g. a Gen-format guard) through `trl.SFTTrainer`, with LoRA and DeepSpeed.

Owns the path from chat rows `(messages, completion)` to a trained model directory:
- Rows are tokenized here, exactly as `saferl.sft.chat_example` does and as the guard sees them at inference:
  the prompt by the tokenizer's own chat template with its generation prompt, then the completion's tokens and
  EOS. TRL receives `input_ids` and `completion_mask` (a pre-tokenized prompt-completion dataset) and its
  `completion_only_loss` puts the loss on the completion only. Handing TRL the messages instead does not work
  for a Gen guard: its template reads a trailing assistant turn as the response to moderate, so "prompt +
  completion" would render a different instruction; and tokenizing the rendered text again can merge tokens
  across the prompt/completion boundary.
- Everything else is TRL's and transformers': optimizer and schedule, `peft` LoRA (`peft_config`), DeepSpeed
  (`SFTConfig.deepspeed`), several GPUs under `accelerate launch`, checkpoints and resume, `report_to`. Any
  `SFTConfig` field can be set as KEY=VALUE, parsed by `HfArgumentParser` with TRL's own types and choices.
- Output: the model (the peft adapter with LoRA) in `out`, the tokenizer beside it, and `trainer_state.json`
  with the loss log. With LoRA, `merge` also writes the adapter folded into the base weights (an HF model that
  vLLM and `saferl serve guard` load) into `out/merged`.

The hand-written loop (`saferl.sft.train_causal_lm`) stays for the toy world's build and `--trainer saferl`:
its shared-prefix batching computes a guard's long instruction once per batch, which TRL has no form of.
`saferl.sft_batched` carries that batching and the target-only head into `trl.SFTTrainer` (the toy world's
`--trainer trl` build); `saferl sft` does not offer it yet.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

def tokenized_dataset(tokenizer: Any, rows: Sequence[tuple[list[dict[str, str]], str]]) -> Any:
    """A `datasets.Dataset` of `input_ids` (prompt by the chat template, completion, EOS) and `completion_mask`
    (1 on the completion and EOS), one row per `(messages, completion)`."""
    from datasets import Dataset

    from saferl.sft import chat_example

    examples = [chat_example(tokenizer, messages, completion) for messages, completion in rows]
    return Dataset.from_dict({
        "input_ids": [e.prompt_ids + e.target_ids for e in examples],
        "completion_mask": [[0] * len(e.prompt_ids) + [1] * len(e.target_ids) for e in examples],
    })


def sft_config(out: str, *, steps: int, batch_size: int, lr: float, seed: int, deepspeed: str | None,
               overrides: Sequence[str]) -> Any:
    """`trl.SFTConfig` for `saferl sft`: TRL's defaults, then ours, then `overrides` (KEY=VALUE, any SFTConfig
    field, typed by `HfArgumentParser`; an unknown key raises ValueError naming it).

    Ours: completion-only loss, and `training_args`'s.
    """
    from trl import SFTConfig

    return training_args(SFTConfig, out, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                         deepspeed=deepspeed, overrides=overrides, ours=["--completion_only_loss", "true"])


def training_args(config_class: type, out: str, *, steps: int, batch_size: int, lr: float, seed: int,
                  deepspeed: str | None, overrides: Sequence[str], ours: Sequence[str] = ()) -> Any:
    """A `transformers.TrainingArguments` dataclass (TRL's `SFTConfig`, `RewardConfig`, or TrainingArguments
    itself): its defaults, then the named options and `ours` (argv form), then `overrides` (KEY=VALUE, any
    field of `config_class`, typed by `HfArgumentParser`; an unknown key raises ValueError naming it).
    Without a GPU: float32 (TRL's default bf16 mixed precision needs one) and no pinned memory."""
    import torch
    from transformers import HfArgumentParser

    argv = ["--output_dir", out, "--max_steps", str(steps), "--per_device_train_batch_size", str(batch_size),
            "--learning_rate", str(lr), "--seed", str(seed), *ours]
    if not torch.cuda.is_available():
        argv += ["--bf16", "false", "--dataloader_pin_memory", "false"]
    if deepspeed:
        argv += ["--deepspeed", deepspeed]
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE for a {config_class.__name__} field, got {item!r}")
        argv += [f"--{key}", value]
    try:
        (config,) = HfArgumentParser(config_class).parse_args_into_dataclasses(args=argv)
    except SystemExit as e:  # argparse has printed the bad key or value
        raise ValueError(f"bad {config_class.__name__} override in {list(overrides)} (see above)") from e
    return config


def one_process_env(environ: Mapping[str, str], port: int) -> dict[str, str]:
    """What `accelerate launch` or `deepspeed` would set for one process (rank 0 of 1, its store on loopback
    `port`), for `saferl sft --deepspeed` started without a launcher: without them DeepSpeed goes looking for
    MPI. Empty when a launcher has set WORLD_SIZE."""
    if "WORLD_SIZE" in environ:
        return {}
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def peft_config(rank: int, alpha: float, dropout: float, target_modules: Sequence[str],
                task_type: str = "CAUSAL_LM") -> Any:
    """peft LoRA on the model's `target_modules`, or None for full fine-tuning (`rank` 0). `task_type`:
    CAUSAL_LM, or SEQ_CLS for a reward model (peft then also trains and saves its `score` head whole)."""
    if rank <= 0:
        return None
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                      task_type=task_type)


def merge_adapter(base: str, adapter: str | Path, out: str | Path, task_type: str = "CAUSAL_LM") -> None:
    """Fold the peft adapter in `adapter` into the base model `base` and save the full model and tokenizer to
    `out` (a causal LM, or for SEQ_CLS a one-label sequence classifier). Loaded afresh on the CPU, so it needs
    no DeepSpeed gathering whatever the training used."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    if task_type == "SEQ_CLS":  # the classifier pools at the last non-pad token: its config must name the pad
        model = AutoModelForSequenceClassification.from_pretrained(base, dtype="auto", num_labels=1,
                                                                   pad_token_id=tokenizer.pad_token_id)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)


def train_sft(model: str, rows: Sequence[tuple[list[dict[str, str]], str]], out: str, *, config: Any,
              lora: Any, merge: bool = False) -> list[float]:
    """Train `model` (a model directory or hub id) on `rows` with `trl.SFTTrainer` and save to `out`.

    Args:
        config: the `trl.SFTConfig` (`sft_config`).
        lora: a peft `LoraConfig`, or None for full fine-tuning.
        merge: with LoRA, also save the merged model to `out/merged` (the adapter is in `out`).

    Returns:
        The logged training losses, in order (one every `logging_steps`).
    """
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model)
    trainer = SFTTrainer(model=model, args=config, train_dataset=tokenized_dataset(tokenizer, rows),
                         processing_class=tokenizer, peft_config=lora)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(out)  # the adapter alone under LoRA; full weights (gathered under ZeRO-3) otherwise
    if trainer.accelerator.is_main_process:
        trainer.state.save_to_json(str(Path(out) / "trainer_state.json"))
        if lora is not None and merge:
            merge_adapter(model, out, Path(out) / "merged")
    trainer.accelerator.wait_for_everyone()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
