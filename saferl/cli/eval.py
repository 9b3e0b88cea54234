"""`saferl eval` (held-out policy evaluation) and `saferl report` (run figures, multi-run tables)."""

from __future__ import annotations

import argparse

from saferl.cli.args import positive_int

EVAL_EPILOG = """prompt sets (--prompts):
  toyworld:heldout (default: eval.prompts), a .jsonl or .parquet file, a local dataset directory (written by
  datasets' save_to_disk, or one of .jsonl/.parquet files per split), or a Hugging Face dataset id (read
  with datasets.load_dataset, --split; download it first on an offline machine). Training's data.train
  takes the same sets and mapping (data.prompt_column, data.kind_column, data.kind, data.category_column,
  data.split).
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
runs of each label (n shown), judged by the reward guard, the independent judge (eval.judge) and the toy
ground truth, a baseline row from the evaluations before training, how often each guard was fooled, and the
alarm's lead time over the garbled rate doubling (per run in OUT.json); writes OUT (Markdown), OUT.json and
OUT.png. Runs without eval.json are skipped (noted).
A --table YAML:  {baseline: SFT (before), rows: {hybrid: hybrid-s*, guard_only: guard_only-s*}}

examples:
  saferl report runs/toy
  saferl report --compare hybrid='runs/toy_saferl_table/hybrid-s*' \\
      guard_only='runs/toy_saferl_table/guard_only-s*' --baseline SFT -o results.md
  saferl report --table experiments/toy_saferl_table/table.yaml --runs runs/toy_saferl_table \\
      -o experiments/toy_saferl_table/results.md"""


def _cmd_eval(args: argparse.Namespace) -> int:
    from functools import partial

    from saferl.config import load_config
    from saferl.data import Columns
    from saferl.eval.run import run
    from saferl.references import resolve_reference
    from saferl.toyworld.oracle import ToyGroundTruth

    columns = Columns(prompt=args.prompt_column, kind=args.kind_column, kind_value=args.kind,
                      category=args.category_column)
    toyworld = load_config(args.config).toyworld  # the world the config's toyworld:<part> references name
    run(policies=args.model, config=args.config, prompts=args.prompts, columns=columns, split=args.split,
        guard=args.guard, rm=args.rm, seed=args.seed, samples=args.samples_per_prompt,
        max_prompts=args.max_prompts, backend=args.backend, output=args.output,
        resolve=partial(resolve_reference, toyworld=toyworld),
        truth=ToyGroundTruth())  # truth_* rates when the prompts are the toy world's
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


def add_eval_report_parsers(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--split", default=None,
                   help="split of a hub dataset (default: train) or a dataset directory (default: its only one)")
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
    p.add_argument("--samples-per-prompt", type=positive_int, default=None,
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
