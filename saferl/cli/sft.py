"""`saferl sft`: supervised fine-tuning on chat JSONL (a Gen-format guard, a policy) through TRL's SFTTrainer,
or the hand-written loop the toy world builds with (`--trainer saferl`)."""

from __future__ import annotations

import argparse

from saferl.cli.args import verbose_arg

SFT_EPILOG = """data rows (JSONL, one object a line; errors name the file and line):
  {"messages": [{"role": "user", "content": "How do I pick a lock?"}], "completion": "Safety: Unsafe\\n..."}
  For a Gen guard, `messages` is the conversation it judges (a last assistant turn = response moderation)
  and `completion` the verdict lines; the prompt is rendered by the model's own chat template.

KEY=VALUE sets any trl.SFTConfig / transformers.TrainingArguments field (TRL's types and choices), after
the options above, e.g.:
  gradient_checkpointing=true bf16=true gradient_accumulation_steps=4 report_to=wandb save_strategy=steps
  save_steps=100 resume_from_checkpoint=OUT/checkpoint-100 logging_steps=1 lr_scheduler_type=cosine

examples:
  saferl sft --model Qwen/Qwen3Guard-Gen-4B --data verdicts.jsonl --out guard-lora --lora-rank 16 --merge \\
      bf16=true gradient_checkpointing=true
  accelerate launch -m saferl.cli sft --model Qwen/Qwen3Guard-Gen-4B --data verdicts.jsonl --out guard-ft \\
      --deepspeed ds_zero3.json bf16=true
  saferl sft --trainer saferl --model toyworld:guard --data verdicts.jsonl --out toy-guard --share-prefix"""


def _cmd_sft(args: argparse.Namespace) -> int:
    from saferl.cli.args import quiet_unless_verbose

    quiet_unless_verbose(args)
    from saferl.runtime import configure_process

    configure_process()
    from saferl.sft import load_chat_jsonl

    rows = load_chat_jsonl(args.data)  # validate the data before loading any weights
    if args.trainer == "saferl":
        used = [flag for flag, on in (("--lora-rank", args.lora_rank > 0), ("--merge", args.merge),
                                      ("--deepspeed", args.deepspeed), ("KEY=VALUE", args.overrides)) if on]
        if used:
            raise ValueError(f"{', '.join(used)}: TRL options; --trainer saferl is full fine-tuning in one "
                             "process")
    elif args.share_prefix:
        raise ValueError("--share-prefix is the hand-written loop's batching; it needs --trainer saferl")
    if args.merge and args.lora_rank <= 0:
        raise ValueError("--merge folds a LoRA adapter into the base weights; it needs --lora-rank > 0")
    from saferl.references import resolve_reference

    start = resolve_reference(args.model)
    print(f"[sft] {len(rows)} examples from {args.data}; {args.steps} steps of {args.batch_size} "
          f"({args.trainer}{f', LoRA rank {args.lora_rank}' if args.lora_rank > 0 else ''})", flush=True)
    if args.trainer == "saferl":
        _train_saferl(args, start, rows)
    else:
        from saferl.sft_trl import peft_config, sft_config, train_sft

        if args.deepspeed:
            one_process_deepspeed()
        config = sft_config(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            deepspeed=args.deepspeed, overrides=args.overrides)
        lora = peft_config(args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_target_modules)
        losses = train_sft(start, rows, args.out, config=config, lora=lora, merge=args.merge)
        if losses:
            print(f"[sft] loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
    print(f"[sft] saved to {args.out}{f' (merged model: {args.out}/merged)' if args.merge else ''}", flush=True)
    return 0


def _train_saferl(args: argparse.Namespace, start: str, rows: list) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from saferl.sft import chat_example, train_causal_lm

    tokenizer = AutoTokenizer.from_pretrained(start)
    model = AutoModelForCausalLM.from_pretrained(start)
    examples = [chat_example(tokenizer, messages, completion) for messages, completion in rows]
    train_causal_lm(model, examples, pad_id=tokenizer.pad_token_id, steps=args.steps,
                    batch_size=args.batch_size, lr=args.lr, seed=args.seed, share_prefix=args.share_prefix, label="sft")
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)


def one_process_deepspeed() -> None:
    """Without a launcher, set up this process as rank 0 of 1 (`sft_trl.one_process_env`, a free loopback
    port) so DeepSpeed does not look for MPI."""
    import os
    import socket

    from saferl.sft_trl import one_process_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.update(one_process_env(os.environ, s.getsockname()[1]))


def _modules(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated module names, e.g. q_proj,v_proj")
    return names


def add_sft_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sft", help="supervised fine-tuning on chat JSONL (e.g. train a Gen-format guard)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SFT_EPILOG,
                       description='Fine-tune a causal LM on rows {"messages": [...], "completion": "..."};\n'
                       "the prompt is rendered by the model's own chat template and only the completion is\n"
                       "learned. Runs trl.SFTTrainer (LoRA through peft, DeepSpeed, several GPUs under\n"
                       "`accelerate launch`); OUT gets the model (the adapter with LoRA), the tokenizer and\n"
                       "trainer_state.json (the loss log).")
    p.add_argument("--model", required=True, help="model directory or hub id to start from, or toyworld:<part>")
    p.add_argument("--data", required=True, help="JSONL file of {messages, completion}")
    p.add_argument("--out", required=True, help="output directory (HF format; TRL's checkpoints go there too)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per step per device (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trainer", choices=("trl", "saferl"), default="trl",
                   help="trl: trl.SFTTrainer; saferl: the hand-written one-process loop the toy world builds "
                   "with (full fine-tuning, --share-prefix) (default: %(default)s)")
    add_trl_options(p, merged="a full HF model for vLLM or `saferl serve guard`")
    p.add_argument("--share-prefix", action="store_true",
                   help="--trainer saferl: compute a batch's common prompt prefix once (guards: the moderation "
                   "instruction)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="trl.SFTConfig fields (see below)")
    verbose_arg(p)
    p.set_defaults(func=_cmd_sft)


def add_trl_options(p: argparse.ArgumentParser, *, merged: str) -> None:
    """The options `saferl sft` and `saferl reward` pass to TRL alike: peft LoRA, --merge, --deepspeed;
    `merged` says what OUT/merged is."""
    from saferl.config import LoraConfig

    p.add_argument("--lora-rank", type=int, default=LoraConfig.rank,
                   help="LoRA rank through peft; 0 trains every weight (default: %(default)s)")
    p.add_argument("--lora-alpha", type=float, default=LoraConfig.alpha,
                   help="LoRA alpha (default: %(default)s)")
    p.add_argument("--lora-dropout", type=float, default=LoraConfig.dropout,
                   help="LoRA dropout (default: %(default)s)")
    p.add_argument("--lora-target-modules", type=_modules, default=LoraConfig().target_modules,
                   metavar="NAMES", help="comma-separated module names to adapt (default: every attention and "
                   "MLP projection: %(default)s)")
    p.add_argument("--merge", action="store_true",
                   help="with LoRA, also write the adapter merged into the base weights to OUT/merged "
                   f"({merged})")
    p.add_argument("--deepspeed", default=None, metavar="JSON",
                   help="DeepSpeed config file passed to TRL (TrainingArguments.deepspeed), e.g. ZeRO-2/3; one "
                   "process without a launcher, every GPU under `accelerate launch` or `deepspeed`")

