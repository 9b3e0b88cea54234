"""The `saferl` command: train, eval, report, toyworld, sft, serve, guard and chat subcommands (argparse; lazy
heavy imports)."""

from __future__ import annotations

import argparse
import sys

EPILOG_OVERRIDES = """overrides are dotted config keys, e.g.:
  trainer.lr=1e-4 trainer.steps=10 rollout.num_engines=1 reward.recipe=guard_only run.executor=local
every key and its default lives in saferl/config.py; an unknown key is rejected with the closest valid ones."""


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", default=None, help="YAML config file (default: schema defaults = toy run)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, applied after the file")


def _cmd_train(args: argparse.Namespace) -> int:
    from saferl.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from saferl.placement import format_plan

        print(f"config OK: {args.config or '(defaults)'}\n{format_plan(cfg)}")
        return 0
    from saferl.train import train

    train(cfg)
    return 0


def _cmd_toyworld(args: argparse.Namespace) -> int:
    from saferl.config import load_config
    from saferl.toyworld.build import build, ensure_built, toyworld_paths

    cfg = load_config(args.config, args.overrides).toyworld
    if args.action == "path":
        print(toyworld_paths(cfg).root)
        return 0
    import json
    import time

    start = time.monotonic()
    cached = (toyworld_paths(cfg).root / "metrics.json").is_file()
    paths = build(cfg) if args.force else ensure_built(cfg)
    metrics = json.loads((paths.root / "metrics.json").read_text())
    if cached and not args.force:
        from saferl.toyworld.evaluate import format_metrics

        print(f"[toyworld] reusing cached build {paths.root} ({time.monotonic() - start:.1f}s)")
        print(format_metrics(metrics))
    from saferl.guard.stream_toy import ensure_toy_stream

    stream = ensure_toy_stream(paths.root)  # once, ~1 min: toyworld:stream_guard and toyworld:stream_heldout
    print(f"[toyworld] Stream guard {stream.guard}; its held-out set {stream.heldout}")
    if not metrics.get("meets_targets"):
        print("[toyworld] WARNING: the built world misses some of its acceptance ranges (see above)")
    return 0


def _cmd_sft(args: argparse.Namespace) -> int:
    from saferl.runtime import configure_process

    configure_process()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from saferl.sft import chat_example, load_chat_jsonl, train_causal_lm

    rows = load_chat_jsonl(args.data)  # validate the data before loading any weights
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    examples = [chat_example(tokenizer, messages, completion) for messages, completion in rows]
    print(f"[sft] {len(examples)} examples from {args.data}; {args.steps} steps of {args.batch_size}")
    train_causal_lm(model, examples, pad_id=tokenizer.pad_token_id, steps=args.steps, batch_size=args.batch_size,
                    lr=args.lr, seed=args.seed, share_prefix=args.share_prefix, label="sft")
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"[sft] saved to {args.out}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    from saferl.serving.server import build_app, check_bind

    token = os.environ.get("SAFERL_SERVE_TOKEN")
    if args.token_file:
        token = open(args.token_file, encoding="utf-8").read().strip()
        if not token:
            raise ValueError(f"{args.token_file}: the token file is empty")
    check_bind(args.host, token)  # before any weights load
    from saferl.runtime import configure_process

    configure_process()
    if args.kind == "guard":
        from saferl.guard.scorer import GuardScorer

        scorer = GuardScorer(args.model, backend=args.backend, max_new_tokens=args.max_new_tokens,
                             max_model_len=args.max_model_len, dtype=args.dtype)
    else:
        from saferl.helpfulness import HelpfulnessScorer

        scorer = HelpfulnessScorer(args.model, backend=args.backend, dtype=args.dtype, max_length=args.max_model_len)
    app = build_app(args.kind, scorer, model=args.model, token=token, max_body_bytes=args.max_body_mib << 20,
                    max_batch=args.max_batch, max_wait_s=args.max_wait_ms / 1000)
    import uvicorn

    print(f"[saferl] serving {args.kind} {args.model} on http://{args.host}:{args.port} "
          f"(auth: {'bearer token' if token else 'none, loopback only'})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


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

examples:
  saferl guard train-stream --backbone toyworld:guard --data rows.jsonl -o my_stream --steps 300 --lr 3e-3
  hf download Qwen/Qwen3-0.6B --local-dir Qwen3-0.6B
  saferl guard train-stream --backbone Qwen3-0.6B --data rows.jsonl -o stream06b --freeze-backbone"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _guard_model_args(p: argparse.ArgumentParser) -> None:
    from saferl.config import GuardConfig

    p.add_argument("--mode", choices=("strict", "loose"), default="strict",
                   help="strict counts Controversial as Unsafe, loose as Safe (default: %(default)s)")
    p.add_argument("--backend", choices=("vllm", "hf"), default="vllm",
                   help="inference engine (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=32,
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

    records = read_records(args.input)  # bad input fails before any weights load
    guard = GenGuard.from_model(args.model, backend=args.backend, max_new_tokens=args.max_new_tokens,
                                max_model_len=args.max_model_len, dtype=args.dtype)
    counts = moderate_file(guard, records, args.output, args.mode, batch_size=args.batch_size,
                           progress=args.progress)
    print(f"[guard] {counts['records']} records -> {args.output} ({args.mode}): {counts['unsafe']} Unsafe, "
          f"{counts['safe']} Safe, {counts['undecided']} undecided; {counts['parse_failures']} parse "
          f"failures; {guard.scorer.stats()['truncated']} truncated")
    return 0


def _cmd_guard_eval(args: argparse.Namespace) -> int:
    from saferl.guard.evaluate import format_report, run_eval

    report = run_eval(args.model, args.data, args.output, kind=args.kind, mode=args.mode, split=args.split,
                      backend=args.backend, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                      max_model_len=args.max_model_len, dtype=args.dtype, predictions_out=args.predictions,
                      progress=args.progress, rule=args.debounce, thinking=args.thinking)
    print(format_report(report))
    print(f"[guard] report written to {args.output}")
    return 0


def _cmd_guard_train_stream(args: argparse.Namespace) -> int:
    from saferl.guard.stream_toy import resolve_toy_ref
    from saferl.guard.stream_train import load_stream_rows

    rows = load_stream_rows(resolve_toy_ref(args.data))  # bad input fails before any weights load
    from saferl.runtime import configure_process

    configure_process()
    from transformers import AutoTokenizer

    from saferl.guard.stream_train import (
        LabelMaps,
        encode_stream_rows,
        init_stream_guard,
        save_trained_stream_guard,
        token_accuracy,
        train_stream_guard,
    )
    from saferl.toyworld.tokenizer import POLICY_CHAT_TEMPLATE

    backbone = resolve_toy_ref(args.backbone)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    tokenizer.chat_template = POLICY_CHAT_TEMPLATE
    model = init_stream_guard(backbone, guard_inner_size=args.guard_inner_size, seed=args.seed)
    examples = encode_stream_rows(rows, tokenizer, LabelMaps.from_model(model))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    print(f"[train-stream] {len(examples)} rows from {args.data}; {args.steps} steps of {args.batch_size}"
          f"{' (heads only)' if args.freeze_backbone else ''}")
    losses = train_stream_guard(model, examples, pad_id=pad_id, steps=args.steps, batch_size=args.batch_size,
                                lr=args.lr, warmup_steps=min(20, args.steps // 10), seed=args.seed,
                                freeze_backbone=args.freeze_backbone, label="train-stream")
    acc = token_accuracy(model, examples, pad_id=pad_id)
    save_trained_stream_guard(model, tokenizer, args.output)
    print(f"[train-stream] loss {losses[0]:.4f} -> {losses[-1]:.4f}; on the training rows: token risk "
          f"accuracy {acc['token_risk_acc']:.4f}, query risk accuracy {acc['query_risk_acc']:.4f}")
    print(f"[train-stream] saved to {args.output}")
    return 0


def _add_guard_parser(sub: argparse._SubParsersAction) -> None:
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
    q.add_argument("-m", "--model", required=True, help="Gen guard model directory (or hub id with access)")
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
                             "with the paper's loss; writes a Qwen3Guard-Stream checkpoint.")
    q.add_argument("--backbone", required=True, help="Qwen3 checkpoint directory or toyworld:<part>")
    q.add_argument("--data", required=True, help="training rows, JSONL (see below)")
    q.add_argument("-o", "--output", required=True, help="checkpoint directory to write")
    q.add_argument("--steps", type=_positive_int, default=200, help="optimizer steps (default: %(default)s)")
    q.add_argument("--batch-size", type=_positive_int, default=16,
                   help="rows per step (default: %(default)s)")
    q.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default: %(default)s)")
    q.add_argument("--freeze-backbone", action="store_true", help="train the heads only")
    q.add_argument("--guard-inner-size", type=_positive_int, default=None,
                   help="width G of new heads (default: hidden size // 2)")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=_cmd_guard_train_stream)


EVAL_EPILOG = """prompt sets (--prompts):
  toyworld:heldout (default: eval.prompts), a .jsonl or .parquet file, or a Hugging Face dataset id
  (read with datasets.load_dataset, --split; download it first on an offline machine).
  Rows: the prompt (--prompt-column; default `messages`, else `prompt`): a string or a list of
  {role, content} ending with the user's turn; the kind (--kind-column, default `kind`): harmful | benign |
  controversial, or --kind for the whole set; the category (--category-column, default `category` if present).
  Errors name the file and line (parquet / hub: the row) and come before any model loads.

reports, one column per -m: safety rate on harmful prompts (answer and thinking judged Safe by the guard;
Controversial counts as unsafe), benign refusal rate (guard `Refusal: Yes`), mean helpfulness RM score on
benign prompts, safety rate per harmful category, and the toy world's ground truth (true unsafe / refusal /
garbled rates, guard fooled) when the prompts carry it. Sampling as training's held-out eval: rollout.*
temperature, top_p and max_new_tokens, one seed per prompt from --seed.

examples:
  saferl eval -m sft=toyworld:policy -m rl=runs/toy/checkpoints/final -o runs/toy/eval_heldout
  saferl eval -c runs/toy/config.yaml -m runs/toy/checkpoints/final --backend hf --max-prompts 64
  saferl eval -m Qwen/Qwen3-4B --guard Qwen/Qwen3Guard-Gen-4B --rm none --prompts harmful.parquet \\
      --prompt-column question --kind harmful --category-column category -o eval_qwen3"""

REPORT_EPILOG = """one run: RUN_DIR/report/README.md embedding one PNG per concern: reward and its components,
held-out safety and benign refusal, GSPO clip fraction, KL and entropy, reward hacking (toy ground truth).
A figure whose metrics the run did not log is skipped and the summary says so.

several runs (--compare or --table): the held-out metrics after training as mean ± sample std over the
runs of each label (n shown), a baseline row from the evaluations before training, and reward-hacking
columns; writes OUT (Markdown), OUT.json and OUT.png. Runs without eval.json are skipped (noted).
A --table YAML:  {baseline: SFT (before), rows: {hybrid: hybrid-s*, guard_only: guard_only-s*}}

examples:
  saferl report runs/toy
  saferl report --compare hybrid='runs/toy_saferl_table/hybrid-s*' \\
      guard_only='runs/toy_saferl_table/guard_only-s*' --baseline SFT -o results.md
  saferl report --table experiments/toy_saferl_table/table.yaml --runs runs/toy_saferl_table \\
      -o experiments/toy_saferl_table/results.md"""


def _cmd_eval(args: argparse.Namespace) -> int:
    from saferl.eval.prompt_sets import Columns
    from saferl.eval.run import run

    columns = Columns(prompt=args.prompt_column, kind=args.kind_column, kind_value=args.kind,
                      category=args.category_column)
    run(policies=args.model, config=args.config, prompts=args.prompts, columns=columns, split=args.split,
        guard=args.guard, rm=args.rm, seed=args.seed, samples=args.samples_per_prompt,
        max_prompts=args.max_prompts, backend=args.backend, output=args.output)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    modes = sum(map(bool, (args.run_dirs, args.compare, args.table)))
    if modes != 1:
        raise ValueError("give RUN_DIR..., or --compare LABEL=GLOB..., or --table YAML (exactly one)")
    if args.run_dirs:
        from saferl.eval.report import write_report

        for run_dir in args.run_dirs:
            print(f"[report] {write_report(run_dir)}")
        return 0
    if not args.output:
        raise ValueError("--compare / --table need -o OUT.md")
    from saferl.eval.compare import compare, parse_spec, read_table_spec

    baseline = args.baseline
    if args.table:
        table_baseline, specs = read_table_spec(args.table)
        baseline = baseline or table_baseline
    else:
        specs = [parse_spec(s) for s in args.compare]
    print(compare(specs, args.output, baseline=baseline, root=args.runs))
    print(f"\n[report] wrote {args.output} (+ .json, .png)")
    return 0


def _add_eval_report_parsers(sub: argparse._SubParsersAction) -> None:
    from saferl.config import EvalConfig, GuardConfig, HelpfulnessConfig

    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("eval", help="evaluate policies on held-out prompts (safety, over-refusal, "
                       "helpfulness)", formatter_class=raw, epilog=EVAL_EPILOG,
                       description="Sample each policy on a held-out prompt set, judge the answers with the\n"
                       "Gen guard and the helpfulness RM, and print a Markdown table, one column per policy.\n"
                       "Runs in this process: the policies generate one after another, then the guard and\n"
                       "RM score. Defaults come from the config (-c, else the schema defaults: the toy world).")
    p.add_argument("-m", "--model", action="append", required=True, metavar="[LABEL=]MODEL",
                   help="policy checkpoint directory, hub id or toyworld:policy; repeat for side-by-side "
                   "columns")
    p.add_argument("-c", "--config", default=None,
                   help="YAML config supplying the defaults below and rollout/guard/RM settings "
                   "(e.g. a run's config.yaml; default: schema defaults = toy world)")
    p.add_argument("--prompts", default=None,
                   help=f"prompt set (default: eval.prompts = {EvalConfig.prompts})")
    p.add_argument("--split", default="train", help="split of a hub dataset (default: %(default)s)")
    p.add_argument("--prompt-column", default=None,
                   help="column holding the prompt (default: messages or prompt)")
    p.add_argument("--kind-column", default="kind",
                   help="column holding harmful/benign (default: %(default)s)")
    p.add_argument("--kind", choices=("harmful", "benign", "controversial"), default=None,
                   help="one kind for every prompt of the set (instead of --kind-column)")
    p.add_argument("--category-column", default=None,
                   help="column holding the harmful category (default: category, when present)")
    p.add_argument("--guard", default=None,
                   help=f"Gen guard model (default: guard.model = {GuardConfig.model})")
    p.add_argument("--rm", default=None,
                   help=f"helpfulness RM (default: helpfulness.model = {HelpfulnessConfig.model}; "
                   "'none' to skip)")
    p.add_argument("--seed", type=int, default=None,
                   help=f"evaluation seed (default: eval.seed = {EvalConfig.seed})")
    p.add_argument("--samples-per-prompt", type=_positive_int, default=None,
                   help="answers per prompt (default: eval.samples_per_prompt = "
                   f"{EvalConfig.samples_per_prompt})")
    p.add_argument("--max-prompts", type=int, default=None,
                   help="evenly spaced subset of the prompts (default: eval.max_prompts = "
                   f"{EvalConfig.max_prompts}; 0 = all)")
    p.add_argument("--backend", choices=("vllm", "hf"), default="vllm",
                   help="engine for the policies and the guard (the RM uses helpfulness.backend) "
                   "(default: %(default)s)")
    p.add_argument("-o", "--output", default=None, metavar="DIR",
                   help="write results.json, results.md and samples.jsonl here")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("report", help="plots and a Markdown summary of a run, or a table comparing runs",
                       formatter_class=raw, epilog=REPORT_EPILOG,
                       description="Turn runs' metrics.jsonl, eval.json and config.yaml into PNG plots and\n"
                       "Markdown: one report per RUN_DIR, or one comparison over groups of runs (seeds).")
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="run directories to report on")
    p.add_argument("--compare", nargs="+", metavar="LABEL=GLOB", help="groups of run directories to compare")
    p.add_argument("--table", metavar="YAML", help="the --compare groups (and baseline name) from a file")
    p.add_argument("--runs", default=".", metavar="DIR",
                   help="directory the globs are relative to (default: .)")
    p.add_argument("--baseline", default=None, metavar="NAME",
                   help="name of the before-training row (default: the table file's, else "
                   "'baseline (before training)')")
    p.add_argument("-o", "--output", default=None, metavar="OUT.md", help="comparison Markdown to write")
    p.set_defaults(func=_cmd_report)


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
    settings = _care_settings(args)
    if args.eval:
        from saferl.eval.care_eval import run_care_eval

        run_care_eval(policy=args.model, stream_guard=args.guard, prompts=args.eval, settings=settings,
                      seed=args.seed, samples=args.samples_per_prompt, max_prompts=args.max_prompts,
                      batch_size=args.batch_size, judge=args.judge, rm=None if args.rm == "none" else args.rm,
                      backend=args.backend, device=args.device, dtype=args.dtype, output=args.output)
        return 0
    from saferl.guard.stream_toy import resolve_toy_ref
    from saferl.runtime import configure_process

    configure_process()
    from saferl.care import load_care_models
    from saferl.eval.care_eval import chat, describe_intervention

    models = load_care_models(resolve_toy_ref(args.model), None if args.no_care else resolve_toy_ref(args.guard),
                              device=args.device, dtype=args.dtype)
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


def _add_chat_parser(sub: argparse._SubParsersAction) -> None:
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
    g.add_argument("--samples-per-prompt", type=_positive_int, default=EvalConfig.samples_per_prompt,
                   help="default: %(default)s")
    g.add_argument("--batch-size", type=_positive_int, default=64,
                   help="rows decoded together (default: %(default)s)")
    g.add_argument("--judge", default=GuardConfig.model,
                   help="Gen guard judging the answers (default: %(default)s)")
    g.add_argument("--rm", default=HelpfulnessConfig.model,
                   help="helpfulness RM for quality, or 'none' (default: %(default)s)")
    g.add_argument("--backend", choices=("hf", "vllm"), default="hf",
                   help="engine of the judge (default: %(default)s)")
    g.add_argument("-o", "--output", default=None, metavar="OUT.json", help="write settings, metrics and answers")
    p.set_defaults(func=_cmd_chat)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saferl", description="Safety RL for chat models against a "
                                     "Qwen3Guard-style guard (Ray + vLLM rollouts, hybrid reward, GSPO).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run an RL experiment", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run a SafeRL experiment: rollouts on vLLM, guard + helpfulness rewards, GSPO "
                       "updates, weight sync, held-out evaluation before and after, HF checkpoints in "
                       "<run.dir>/checkpoints/. Running the same command again continues an interrupted run "
                       "from its latest checkpoint (checkpoint.resume=auto; 'never' starts afresh). "
                       "Data-parallel trainers: trainer.workers=N trainer.strategy=torch|deepspeed "
                       "trainer.zero_stage=0-3; LoRA: trainer.lora.rank=R.", epilog=EPILOG_OVERRIDES)
    _config_args(p)
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config and print the placement plan without loading any weights")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("toyworld", help="build or locate the embedded offline toy world",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="The toy world: synthetic prompts over 5 benign topics, 4 harmful categories "
                       "and a controversial group, with a tiny policy, Gen-format guard and helpfulness RM "
                       "trained offline. Cached under toyworld.cache_dir by a hash of the toyworld.* config.",
                       epilog=EPILOG_OVERRIDES)
    p.add_argument("action", choices=("build", "path"), help="build: build unless cached; path: print its dir")
    p.add_argument("--force", action="store_true", help="rebuild even when a cached build exists")
    _config_args(p)
    p.set_defaults(func=_cmd_toyworld)

    p = sub.add_parser("sft", help="supervised fine-tuning on chat JSONL (e.g. train a Gen-format guard)",
                       description='Fine-tune a causal LM on rows {"messages": [...], "completion": "..."}; the '
                       "prompt is rendered by the model's own chat template and only the completion is learned.")
    p.add_argument("--model", required=True, help="model directory to start from")
    p.add_argument("--data", required=True, help="JSONL file of {messages, completion}")
    p.add_argument("--out", required=True, help="output directory (HF format)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--share-prefix", action="store_true",
                   help="compute a batch's common prompt prefix once (guards: the moderation instruction)")
    p.set_defaults(func=_cmd_sft)

    p = sub.add_parser("serve", help="serve a guard or helpfulness RM over HTTP (JSON) for training or eval",
                       description="An HTTP reward server: POST /v1/moderate (guard) or /v1/score (rm), GET "
                       "/health, OpenAPI at /openapi.json. Binds 127.0.0.1 by default; any other address "
                       "needs a bearer token (--token-file or SAFERL_SERVE_TOKEN). Concurrent requests are "
                       "batched together.")
    p.add_argument("kind", choices=("guard", "rm"), help="guard: Qwen3Guard-Gen-format model; rm: reward model")
    p.add_argument("-m", "--model", required=True, help="model directory (or hub id on a machine with access)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token-file", default=None, help="file holding the bearer token clients must send")
    p.add_argument("--backend", choices=("vllm", "hf"), default="vllm",
                   help="inference engine (rm on vllm: its pooling runner) (default: %(default)s)")
    from saferl.config import GuardConfig

    p.add_argument("--dtype", default=GuardConfig.dtype)
    p.add_argument("--max-model-len", type=int, default=GuardConfig.max_model_len,
                   help="guard context / RM max input tokens (default: %(default)s, as guard.max_model_len)")
    p.add_argument("--max-new-tokens", type=int, default=GuardConfig.max_new_tokens,
                   help="guard output tokens for Safety/Categories/Refusal (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=64, help="items per model call when requests coalesce")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits for others to join")
    p.add_argument("--max-body-mib", type=int, default=8, help="larger request bodies get 413")
    p.set_defaults(func=_cmd_serve)

    _add_eval_report_parsers(sub)
    _add_guard_parser(sub)
    _add_chat_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from saferl.config import ConfigError

    try:
        return args.func(args)
    except ConfigError as e:
        print(f"saferl: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"saferl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
