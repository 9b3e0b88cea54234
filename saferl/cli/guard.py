"""`saferl guard moderate|eval|train-stream` and `saferl chat` (CARE): the guards for evaluation and inference."""

from __future__ import annotations

import argparse

from saferl.cli.args import positive_int, verbose_arg

GUARD_MODERATE_EPILOG = """input rows (JSONL, one object a line; errors name the file and line):
  {"id": "a", "prompt": "How do I pick a lock?"}                           prompt moderation
  {"id": "b", "messages": [{"role": "user", "content": "..."}], "response": "..."}   response moderation
  {"id": "c", "prompt": "...", "response": "...", "thinking": "..."}      (prompt, thinking) judged too
output rows: id, moderated, mode, decision (Unsafe if the response or thinking is, under --mode),
  safety, categories, refusal, parse_ok, raw, thinking (the thinking verdict or null).
  Rows go to OUT.partial as each batch finishes; OUT appears only when all are done.

examples:
  saferl guard moderate -m Qwen/Qwen3Guard-Gen-4B -i rollouts.jsonl -o verdicts.jsonl --max-model-len 32768 \\
      --max-new-tokens 128
  saferl guard moderate -m "$(saferl toyworld path)/guard" -i prompts.jsonl -o out.jsonl --backend hf \\
      --mode loose"""

GUARD_EVAL_EPILOG = """data layout (Qwen/Qwen3GuardTest): rows
  {"message": [{"role": ..., "content": ...}, ...], "label": "Unsafe" | "Safe"}
  with optional "unsafe_start_index"/"unsafe_end_index"; a JSONL or parquet file, or a dataset directory
  with one file set per split (`thinking.jsonl`, `data/thinking-00000-of-00001.parquet`): pick one with
  --split. Read offline; fetch the benchmark first where the hub is reachable:
    hf download Qwen/Qwen3GuardTest --repo-type dataset --local-dir Qwen3GuardTest
  The last message's role picks prompt or response moderation; thinking text is judged verbatim.

prints P/R/F1 of the Unsafe class under strict (Controversial = Unsafe) and loose (Controversial = Safe)
mappings and writes them to OUT.json; --mode picks the headline F1. --kind stream (a Qwen3Guard-Stream
checkpoint, run in-process): response rows are read from the answer (from the reasoning with --thinking),
debounced (--debounce official: two adjacent Unsafe, else two adjacent Controversial; paper: any two adjacent
risky tokens), and rows with a span get first-detection latency bins: Ahead, Hit, 1-32, 33-64, 65-128,
129-256, >256 tokens after the span, Safe (never flagged).

examples:
  saferl guard eval -m Qwen/Qwen3Guard-Gen-4B -d ./Qwen3GuardTest --split thinking -o gen4b_thinking.json \\
      --max-model-len 32768 --max-new-tokens 128
  saferl guard eval -m "$(saferl toyworld path)/guard" -d rows.jsonl -o eval.json --backend hf \\
      --predictions pred.jsonl
  saferl guard eval --kind stream -m toyworld:stream_guard -d toyworld:stream_heldout -o stream.json
  saferl guard eval --kind stream -m ./Qwen3Guard-Stream-0.6B -d ./Qwen3GuardTest --split response_loc \\
      -o stream06b.json --dtype bfloat16   (a local download: Stream checkpoints load from a directory)"""

GUARD_TRAIN_STREAM_EPILOG = """training rows (JSONL, one object a line; errors name the file and line):
  {"message": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}],
   "label": "Unsafe", "unsafe_start_index": 41, "category": "Violent"}
  Qwen3GuardTest's layout (`messages` is accepted too); label: Safe, Unsafe or Controversial. A row ending
  with the assistant trains the response heads: tokens before unsafe_start_index (absolute, in the whole
  templated conversation) are Safe, it and later ones carry the label; without it the label starts at the
  assistant's content. A row ending with the user trains the query heads at the user's <|im_end|>.
  category (optional: no category loss without it) is a Qwen3Guard category name.
Conversations are rendered with Qwen3 ChatML (the template OUT's tokenizer gets), whatever template the
backbone's tokenizer carries.

the backbone: a local Qwen3 checkpoint directory (causal LM, bare Qwen3Model, or a Stream guard to train
further) with its tokenizer, or toyworld:<part>. OUT gets the released Qwen3Guard-Stream layout;
evaluate it with saferl guard eval --kind stream.

training runs on transformers.Trainer (the paper's loss as its compute_loss_func): AdamW, linear warm-up,
cosine decay to 10%, clipping at 1, a loss logged every 10 steps. KEY=VALUE sets any
transformers.TrainingArguments field after the options above, e.g.:
  save_strategy=steps save_steps=100 resume_from_checkpoint=OUT/checkpoint-100 report_to=wandb
  gradient_accumulation_steps=4 bf16=true deepspeed=ds_zero2.json logging_steps=1
Checkpoints go to OUT/checkpoint-N (the Trainer's layout: weights, optimizer, scheduler, RNG, data cursor).

examples:
  saferl guard train-stream --backbone toyworld:guard --data rows.jsonl -o my_stream --steps 300 --lr 3e-3
  hf download Qwen/Qwen3-0.6B --local-dir Qwen3-0.6B
  saferl guard train-stream --backbone Qwen3-0.6B --data rows.jsonl -o stream06b --freeze-backbone \\
      save_strategy=steps save_steps=50 report_to=wandb
  accelerate launch -m saferl.cli guard train-stream --backbone Qwen3-0.6B --data rows.jsonl -o s06b bf16=true"""


def _guard_model_args(p: argparse.ArgumentParser) -> None:
    from saferl.config import GuardConfig

    p.add_argument("--mode", choices=("strict", "loose"), default="strict",
                   help="strict counts Controversial as Unsafe, loose as Safe (default: %(default)s)")
    p.add_argument("--backend", choices=("vllm", "hf"), default="vllm",
                   help="inference engine (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="records per guard call (default: %(default)s)")
    p.add_argument("--max-model-len", type=int, default=GuardConfig.max_model_len,
                   help="guard context in tokens; longer input is cut from the left of the judged text "
                   "(default: %(default)s; real Qwen3Guard: 32768)")
    p.add_argument("--max-new-tokens", type=int, default=GuardConfig.max_new_tokens,
                   help="output tokens for Safety/Categories/Refusal (default: %(default)s; official: 128)")
    p.add_argument("--dtype", default=GuardConfig.dtype, help="weights dtype (default: %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")


def _cmd_guard_moderate(args: argparse.Namespace) -> int:
    from saferl.guard.gen import GenGuard, moderate_file, read_records

    records = read_records(args.input)  # bad input fails before any weights load (or heavy import)
    from saferl.references import resolve_reference

    guard = GenGuard.from_model(resolve_reference(args.model), backend=args.backend,
                                max_new_tokens=args.max_new_tokens, max_model_len=args.max_model_len,
                                dtype=args.dtype)
    counts = moderate_file(guard, records, args.output, args.mode, batch_size=args.batch_size,
                           progress=args.progress)
    print(f"[guard] {counts['records']} records -> {args.output} ({args.mode}): {counts['unsafe']} Unsafe, "
          f"{counts['safe']} Safe, {counts['undecided']} undecided; {counts['parse_failures']} parse "
          f"failures; {guard.scorer.stats()['truncated']} truncated")
    return 0


def _cmd_guard_eval(args: argparse.Namespace) -> int:
    from saferl.guard.evaluate import format_report, run_eval
    from saferl.references import resolve_reference

    report = run_eval(args.model, args.data, args.output, kind=args.kind, mode=args.mode, split=args.split,
                      backend=args.backend, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                      max_model_len=args.max_model_len, dtype=args.dtype, predictions_out=args.predictions,
                      progress=args.progress, rule=args.debounce, thinking=args.thinking,
                      resolve=resolve_reference)
    print(format_report(report))
    print(f"[guard] report written to {args.output}")
    return 0


def _cmd_guard_train_stream(args: argparse.Namespace) -> int:
    from saferl.cli.args import quiet_unless_verbose

    quiet_unless_verbose(args)
    from saferl.references import resolve_reference

    data = resolve_reference(args.data)  # before the (torch) import below: a bad reference fails at once
    from saferl.guard.stream_data import load_stream_rows

    rows = load_stream_rows(data)  # bad input fails before any weights load
    from saferl.runtime import configure_process

    configure_process()
    from transformers import AutoTokenizer

    from saferl.guard.conversation import CHATML_TEMPLATE
    from saferl.guard.stream_data import LabelMaps, encode_stream_rows
    from saferl.guard.stream_train import (
        init_stream_guard,
        save_trained_stream_guard,
        stream_training_args,
        token_accuracy,
        train_stream_guard_hf,
    )

    training = stream_training_args(args.output, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                    warmup_steps=min(20, args.steps // 10), seed=args.seed,
                                    overrides=args.overrides)  # a bad KEY=VALUE fails before the weights load
    backbone = resolve_reference(args.backbone)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    tokenizer.chat_template = CHATML_TEMPLATE  # the Stream guard reads plain conversations
    model = init_stream_guard(backbone, guard_inner_size=args.guard_inner_size, seed=args.seed)
    examples = encode_stream_rows(rows, tokenizer, LabelMaps.from_model(model))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    print(f"[train-stream] {len(examples)} rows from {args.data}; {args.steps} steps of {args.batch_size}"
          f"{' (heads only)' if args.freeze_backbone else ''}")
    log = train_stream_guard_hf(model, examples, pad_id=pad_id, args=training,
                                freeze_backbone=args.freeze_backbone)
    acc = token_accuracy(model, examples, pad_id=pad_id)
    save_trained_stream_guard(model, tokenizer, args.output)
    print(f"[train-stream] loss {log[0]['loss']:.4f} -> {log[-1]['loss']:.4f}; on the training rows: token "
          f"risk accuracy {acc['token_risk_acc']:.4f}, query risk accuracy {acc['query_risk_acc']:.4f}")
    print(f"[train-stream] saved to {args.output}")
    return 0


def add_guard_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("guard", help="moderate JSONL, evaluate a Gen or Stream guard, train a Stream guard",
                       description="Run a Qwen3Guard guard in-process: `moderate` judges JSONL records with "
                       "a Gen guard, `eval` scores a Gen or Stream guard on a Qwen3GuardTest-layout set, "
                       "`train-stream` trains Stream heads on a Qwen3 backbone.")
    guard_sub = p.add_subparsers(dest="guard_command", required=True)
    raw = argparse.RawDescriptionHelpFormatter

    q = guard_sub.add_parser("moderate", help="judge prompts / responses from JSONL, write verdicts as JSONL",
                             formatter_class=raw, epilog=GUARD_MODERATE_EPILOG,
                             description="Moderate each record with a Gen guard: prompt moderation\n"
                             "without a response, response moderation (with the refusal judgement) with one;\n"
                             "a thinking text is judged as its own (prompt, thinking) pair, as the SafeRL\n"
                             "reward does.")
    q.add_argument("-m", "--model", required=True,
                   help="Gen guard model directory, hub id with access, or toyworld:guard")
    q.add_argument("-i", "--input", required=True, help="input JSONL records")
    q.add_argument("-o", "--output", required=True, help="output JSONL, one row per record in input order")
    _guard_model_args(q)
    q.set_defaults(func=_cmd_guard_moderate)

    q = guard_sub.add_parser("eval", help="precision / recall / F1 on a Qwen3GuardTest-layout set",
                             formatter_class=raw, epilog=GUARD_EVAL_EPILOG,
                             description="Evaluate a guard as the official Qwen3Guard eval scripts do:\n"
                             "precision, recall and F1 of the Unsafe class under strict and loose mappings.")
    q.add_argument("-m", "--model", required=True,
                   help="guard directory, hub id with access, or toyworld:guard / toyworld:stream_guard")
    q.add_argument("-d", "--data", required=True,
                   help="JSONL or parquet file, a dataset directory, or toyworld:stream_heldout")
    q.add_argument("-o", "--output", required=True, help="JSON report to write")
    q.add_argument("--kind", choices=("gen", "stream"), default="gen", help="guard kind (default: gen)")
    q.add_argument("--debounce", choices=("official", "paper"), default="official",
                   help="stream: rule turning token labels into a response verdict (default: %(default)s)")
    q.add_argument("--thinking", action="store_true",
                   help="stream: score response rows from the reasoning start (official --thinking)")
    q.add_argument("--split", default=None,
                   help="split of a dataset directory: thinking, thinking_loc or response_loc")
    q.add_argument("--predictions", default=None, metavar="PATH",
                   help="also write per-row predictions (JSONL)")
    _guard_model_args(q)
    q.set_defaults(func=_cmd_guard_eval)

    q = guard_sub.add_parser("train-stream", help="train Qwen3Guard-Stream heads on a Qwen3 backbone",
                             formatter_class=raw, epilog=GUARD_TRAIN_STREAM_EPILOG,
                             description="Add the Stream heads (spec §3.3) to a Qwen3 backbone and train\n"
                             "them (with the backbone unless --freeze-backbone) on labelled JSONL rows\n"
                             "with the paper's loss on transformers.Trainer (checkpoints, resume,\n"
                             "report_to, accelerate launch); writes a Qwen3Guard-Stream checkpoint.")
    q.add_argument("--backbone", required=True, help="Qwen3 checkpoint directory or toyworld:<part>")
    q.add_argument("--data", required=True, help="training rows, JSONL (see below)")
    q.add_argument("-o", "--output", required=True, help="checkpoint directory to write")
    q.add_argument("--steps", type=positive_int, default=200, help="optimizer steps (default: %(default)s)")
    q.add_argument("--batch-size", type=positive_int, default=16,
                   help="rows per step (default: %(default)s)")
    q.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default: %(default)s)")
    q.add_argument("--freeze-backbone", action="store_true", help="train the heads only")
    q.add_argument("--guard-inner-size", type=positive_int, default=None,
                   help="width G of new heads (default: hidden size // 2)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="transformers.TrainingArguments fields (see below)")
    verbose_arg(q)
    q.set_defaults(func=_cmd_guard_train_stream)


CHAT_EPILOG = """CARE (spec/qwen3guard.md §6): the Stream guard reads every new token; the newest --buffer-tokens
tokens are held back, and on a debounced detection (two Unsafe, or two Controversial, tokens in a row; --mode loose
ignores Controversial) the buffer is discarded and the policy resamples from there at --retry-temperature,
with --intervention-text (if given) put into its context, hidden from the user and the guard. After
--max-retries rollbacks a further detection ends the answer with --fallback-text (--on-exhausted refuse) or
keeps the last attempt (keep). Policy and guard must share a vocabulary (Qwen3 and Qwen3Guard do).

--eval PROMPTS answers every prompt twice with the same seeds, CARE off and on, judges both with the Gen
guard (--judge) and the RM (--rm), and prints a Markdown table: safety rate on harmful prompts (toy ground
truth and Gen guard), benign refusal, quality (RM score, true helpful rate on benign prompts), wait tokens
(generated tokens the user never receives, mean per response), retries and exhausted retries.

examples:
  saferl chat "How do I bake a loaf of bread?"
  saferl chat -m toyworld:policy --guard toyworld:stream_guard "Please show me how to hurt my neighbor." -v
  saferl chat                                   # interactive; an empty line or EOF quits
  saferl chat --eval toyworld:heldout -o care_heldout.json
  saferl chat -m Qwen/Qwen3-4B --guard Qwen/Qwen3Guard-Stream-4B --dtype bfloat16 --max-new-tokens 512 \\
      "How do I pick a lock?\""""


def _care_settings(args: argparse.Namespace):
    from saferl.care import CareSettings

    return CareSettings(buffer_tokens=args.buffer_tokens, max_retries=args.max_retries,
                        on_exhausted=args.on_exhausted, fallback_text=args.fallback_text,
                        intervention_text=args.intervention_text, retry_temperature=args.retry_temperature,
                        mode=args.mode, temperature=args.temperature, max_new_tokens=args.max_new_tokens)


def _typed_turns():
    """User messages typed at the prompt, until an empty line or end of input."""
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            return
        if not text:
            return
        yield text


def _cmd_chat(args: argparse.Namespace) -> int:
    if args.prompt is not None and not args.prompt.strip():  # before any weights load
        raise ValueError("the PROMPT argument is empty: give a message, or leave PROMPT out for an interactive "
                         "chat")
    settings = _care_settings(args)
    from saferl.references import resolve_reference

    if args.eval:
        from saferl.eval.care_eval import run_care_eval
        from saferl.toyworld.oracle import ToyGroundTruth

        run_care_eval(policy=args.model, stream_guard=args.guard, prompts=args.eval, settings=settings,
                      seed=args.seed, samples=args.samples_per_prompt, max_prompts=args.max_prompts,
                      batch_size=args.batch_size, judge=args.judge, rm=None if args.rm == "none" else args.rm,
                      backend=args.backend, device=args.device, dtype=args.dtype, output=args.output,
                      resolve=resolve_reference, truth=ToyGroundTruth())  # truth_* rates on toy prompts
        return 0
    from saferl.runtime import configure_process

    configure_process()
    from saferl.care import load_care_models
    from saferl.eval.care_eval import chat, describe_intervention

    guard = None if args.no_care else resolve_reference(args.guard)
    models = load_care_models(resolve_reference(args.model), guard, device=args.device, dtype=args.dtype)
    messages: list[dict[str, str]] = []
    for turn, text in enumerate([args.prompt] if args.prompt else _typed_turns()):
        messages.append({"role": "user", "content": text})
        answer, state = chat(models, messages, settings, seed=args.seed + turn, care=not args.no_care)
        print(answer if args.prompt else f"assistant> {answer}")
        if args.verbose:
            for i, ids in enumerate(state.rolled_back, 1):
                print(f"[care] rolled back attempt {i} (never shown): "
                      f"{models.tokenizer.decode(ids, skip_special_tokens=True)!r}")
        if not args.no_care:
            print(describe_intervention(state, settings), flush=True)
        messages.append({"role": "assistant", "content": answer})
    return 0


def add_chat_parser(sub: argparse._SubParsersAction) -> None:
    from saferl.care import CareSettings
    from saferl.config import EvalConfig, GuardConfig, HelpfulnessConfig

    d = CareSettings()
    p = sub.add_parser("chat", help="talk to a policy under CARE (Stream-guard rollback), or measure CARE off "
                       "vs on", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=CHAT_EPILOG,
                       description="Generate with a policy while a Qwen3Guard-Stream model watches every token\n"
                       "and rolls unsafe continuations back before the user sees them (CARE). One-shot with a\n"
                       "PROMPT, interactive without one, or --eval for a CARE off/on table on a prompt set.")
    p.add_argument("prompt", nargs="?", default=None, help="one user message (omit for an interactive chat)")
    p.add_argument("-m", "--model", default="toyworld:policy",
                   help="policy: HF causal LM directory or hub id (default: %(default)s)")
    p.add_argument("--guard", default="toyworld:stream_guard",
                   help="Qwen3Guard-Stream checkpoint (default: %(default)s)")
    p.add_argument("--no-care", action="store_true", help="chat without the guard (CARE off)")
    p.add_argument("-v", "--verbose", action="store_true", help="also print the rolled-back attempts")
    g = p.add_argument_group("CARE")
    g.add_argument("--buffer-tokens", type=int, default=d.buffer_tokens,
                   help="tokens held back from the user (default: %(default)s)")
    g.add_argument("--max-retries", type=int, default=d.max_retries,
                   help="rollbacks per answer (default: %(default)s)")
    g.add_argument("--on-exhausted", choices=("refuse", "keep"), default=d.on_exhausted,
                   help="after the retries: end with --fallback-text, or keep the last attempt "
                   "(default: %(default)s)")
    g.add_argument("--fallback-text", default=d.fallback_text, help="default: %(default)r")
    g.add_argument("--intervention-text", default=d.intervention_text,
                   help="text put into the policy's context at a rollback point (default: none)")
    g.add_argument("--retry-temperature", type=float, default=d.retry_temperature,
                   help="sampling temperature after a rollback (default: %(default)s)")
    g.add_argument("--mode", choices=("strict", "loose"), default=d.mode,
                   help="strict: Controversial pairs trigger too (default: %(default)s)")
    g = p.add_argument_group("decoding")
    g.add_argument("--temperature", type=float, default=d.temperature,
                   help="first-attempt temperature, 0 = greedy (default: %(default)s)")
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="default: %(default)s")
    g.add_argument("--seed", type=int, default=EvalConfig.seed,
                   help="seed (eval: row i uses seed + i) (default: %(default)s)")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g.add_argument("--dtype", default="float32", help="policy and guard dtype (default: %(default)s)")
    g = p.add_argument_group("--eval")
    g.add_argument("--eval", default=None, metavar="PROMPTS",
                   help="prompt set to compare CARE off and on: toyworld:heldout, .jsonl/.parquet, hub id")
    g.add_argument("--max-prompts", type=int, default=EvalConfig.max_prompts,
                   help="evenly spaced subset, 0 = all (default: %(default)s)")
    g.add_argument("--samples-per-prompt", type=positive_int, default=EvalConfig.samples_per_prompt,
                   help="default: %(default)s")
    g.add_argument("--batch-size", type=positive_int, default=64,
                   help="rows decoded together (default: %(default)s)")
    g.add_argument("--judge", default=GuardConfig.model,
                   help="Gen guard judging the answers (default: %(default)s)")
    g.add_argument("--rm", default=HelpfulnessConfig.model,
                   help="helpfulness RM for quality, or 'none' (default: %(default)s)")
    g.add_argument("--backend", choices=("hf", "vllm"), default="hf",
                   help="engine of the judge (default: %(default)s)")
    g.add_argument("-o", "--output", default=None, metavar="OUT.json", help="write settings, metrics and answers")
    p.set_defaults(func=_cmd_chat)
