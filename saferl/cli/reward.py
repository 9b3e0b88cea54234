"""`saferl reward`: train a helpfulness reward model on preference pairs through trl.RewardTrainer, with the
options `trl reward` and `saferl sft` users know (LoRA, --merge, --deepspeed, KEY=VALUE RewardConfig fields)."""

from __future__ import annotations

import argparse

REWARD_EPILOG = """data rows (JSONL, TRL's conversational preference format; errors name the file and line):
  {"chosen": [{"role": "user", "content": "Boil an egg?"}, {"role": "assistant", "content": "Simmer 8 min."}],
   "rejected": [{"role": "user", "content": "Boil an egg?"}, {"role": "assistant", "content": "No."}]}
  {"prompt": [{"role": "user", "content": "Boil an egg?"}],
   "chosen": [{"role": "assistant", "content": "Simmer 8 min."}], "rejected": [{"role": "assistant", ...}],
   "margin": 1.0}
  Each side is rendered by the RM tokenizer's chat template exactly as HelpfulnessScorer (`saferl serve rm`,
  helpfulness.model) renders a (prompt, answer) pair; the optional margin enters TRL's loss
  -log sigmoid(r_chosen - r_rejected - margin) (all rows or none).

KEY=VALUE sets any trl.RewardConfig / transformers.TrainingArguments field (TRL's types and choices), after
the options above, e.g.:
  center_rewards_coefficient=0.01 gradient_accumulation_steps=4 report_to=wandb save_strategy=steps
  save_steps=100 resume_from_checkpoint=OUT/checkpoint-100 logging_steps=1 bf16=true

The toy world's RM is trained differently (regression on scalar targets by answer style plus a pairwise
term: saferl.sft.train_regression, run by `saferl toyworld build`); this command can fine-tune it further.

examples:
  saferl reward --model Qwen/Qwen3-0.6B --data prefs.jsonl --out rm --lora-rank 16 --merge bf16=true
  accelerate launch -m saferl.cli reward --model Qwen/Qwen3-4B --data prefs.jsonl --out rm-ft \\
      --deepspeed ds_zero3.json bf16=true gradient_checkpointing=true
  saferl reward --model toyworld:reward_model --data prefs.jsonl --out toy-rm --steps 20 --batch-size 8"""


def _cmd_reward(args: argparse.Namespace) -> int:
    from saferl.cli.args import quiet_unless_verbose

    quiet_unless_verbose(args)
    from saferl.runtime import configure_process

    configure_process()
    from saferl.reward_trl import load_preference_jsonl

    pairs = load_preference_jsonl(args.data)  # validate the data before loading any weights
    if args.merge and args.lora_rank <= 0:
        raise ValueError("--merge folds a LoRA adapter into the base weights; it needs --lora-rank > 0")
    from saferl.references import resolve_reference
    from saferl.reward_trl import reward_config, train_reward_model
    from saferl.sft_trl import peft_config

    start = resolve_reference(args.model)
    print(f"[reward] {len(pairs)} preference pairs from {args.data}; {args.steps} steps of {args.batch_size} "
          f"(trl.RewardTrainer{f', LoRA rank {args.lora_rank}' if args.lora_rank > 0 else ''})", flush=True)
    if args.deepspeed:
        from saferl.cli.sft import one_process_deepspeed

        one_process_deepspeed()
    config = reward_config(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                           max_length=args.max_length, deepspeed=args.deepspeed, overrides=args.overrides)
    lora = peft_config(args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_target_modules,
                       task_type="SEQ_CLS")
    log = train_reward_model(start, pairs, args.out, config=config, lora=lora, merge=args.merge)
    if log:
        first, last = log[0], log[-1]
        print(f"[reward] loss {first['loss']:.4f} -> {last['loss']:.4f}; chosen - rejected margin "
              f"{first['margin']:.3f} -> {last['margin']:.3f}; accuracy {first['accuracy']:.2f} -> "
              f"{last['accuracy']:.2f}", flush=True)
    print(f"[reward] saved to {args.out}{f' (merged model: {args.out}/merged)' if args.merge else ''}",
          flush=True)
    return 0


def add_reward_parser(sub: argparse._SubParsersAction) -> None:
    from saferl.cli.args import verbose_arg
    from saferl.cli.sft import add_trl_options
    from saferl.config import HelpfulnessConfig

    p = sub.add_parser("reward", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=REWARD_EPILOG,
                       help="train a helpfulness reward model on preference pairs (trl.RewardTrainer)",
                       description='Train a reward model on rows {"chosen": [...], "rejected": [...]}\n'
                       "(the preferred and the dispreferred conversation) with TRL's RewardTrainer\n"
                       "(Bradley-Terry loss; LoRA through peft, DeepSpeed, several GPUs under\n"
                       "`accelerate launch`). A causal LM gets a new one-label score head. OUT gets the\n"
                       "sequence classifier (the adapter with LoRA), the tokenizer and trainer_state.json\n"
                       "(loss, accuracy and chosen-minus-rejected margin per log step); it loads as\n"
                       "helpfulness.model or `saferl serve rm -m OUT`.")
    p.add_argument("--model", required=True,
                   help="model directory or hub id to start from, or toyworld:<part>")
    p.add_argument("--data", required=True, help="JSONL file of {chosen, rejected} (or {prompt, chosen, "
                   "rejected}) conversations")
    p.add_argument("--out", required=True,
                   help="output directory (HF format; TRL's checkpoints go there too)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="pairs per step per device (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=HelpfulnessConfig.max_length,
                   help="tokens per conversation; longer ones are cut from the oldest context, as the scorer "
                   "cuts them (default: %(default)s, as helpfulness.max_length)")
    add_trl_options(p, merged="a full sequence classifier for helpfulness.model or `saferl serve rm`")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="trl.RewardConfig fields (see below)")
    verbose_arg(p)
    p.set_defaults(func=_cmd_reward)
