"""The `saferl` command: train, eval, report, toyworld, sft, reward, serve, guard and chat subcommands
(argparse; lazy heavy imports). Guard and chat live in `saferl.cli.guard`, eval and report in
`saferl.cli.eval`, sft in `saferl.cli.sft`, reward in `saferl.cli.reward`."""

from __future__ import annotations

import argparse
import sys

from saferl.cli.args import EPILOG_OVERRIDES, config_args, overrides
from saferl.cli.config_show import add_config_parser
from saferl.cli.eval import add_eval_report_parsers
from saferl.cli.guard import add_chat_parser, add_guard_parser
from saferl.cli.serve_stream import STREAM_KINDS, add_stream_serve_args, serve_stream
from saferl.cli.reward import add_reward_parser
from saferl.cli.sft import add_sft_parser

def _cmd_train(args: argparse.Namespace) -> int:
    from saferl.config import load_config

    cfg = load_config(args.config, overrides(args))
    if not cfg.logging.verbose:
        from saferl.quiet import quiet_output

        quiet_output()  # before Ray and the model libraries are imported
    if args.dry_run:
        from saferl.placement import format_plan
        from saferl.roles import role_specs

        # The role specs a real run would start (nothing built, no weights loaded).
        print(f"config OK: {args.config or '(defaults)'}\n{format_plan(role_specs(cfg, build=False), cfg)}")
        return 0
    from saferl.toyworld.oracle import ToyGroundTruth
    from saferl.train import train

    train(cfg, truth=ToyGroundTruth())  # truth_* metrics on the toy world's prompts
    return 0


def _cmd_toyworld(args: argparse.Namespace) -> int:
    from saferl.config import load_config
    from saferl.toyworld.build import build, ensure_built, toyworld_paths

    full = load_config(args.config, overrides(args))
    cfg = full.toyworld
    if not full.logging.verbose:
        from saferl.quiet import quiet_output

        quiet_output()
    if args.action == "path":
        print(toyworld_paths(cfg, args.trainer).root)
        return 0
    import json
    import time

    start = time.monotonic()
    cached = (toyworld_paths(cfg, args.trainer).root / "metrics.json").is_file()
    # stream_guard: it is ensured below, and the build trains it on an otherwise idle core
    paths = (build(cfg, args.trainer, stream_guard=True) if args.force
             else ensure_built(cfg, args.trainer, stream_guard=True))
    metrics = json.loads((paths.root / "metrics.json").read_text())
    if cached and not args.force:
        from saferl.toyworld.evaluate import format_metrics

        print(f"[toyworld] reusing cached build {paths.root} ({time.monotonic() - start:.1f}s)")
        print(format_metrics(metrics))
    from saferl.toyworld.build import EXTRA_PARTS, ensure_part
    from saferl.toyworld.stream import ensure_toy_stream

    # once: the judge and the RM ensemble (toyworld:judge, :reward_model_1/_2)
    ensure_part(cfg, EXTRA_PARTS[0], args.trainer)
    stream = ensure_toy_stream(paths.root)  # once, ~1 min: toyworld:stream_guard and toyworld:stream_heldout
    print(f"[toyworld] Stream guard {stream.guard}; its held-out set {stream.heldout}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    from saferl.serving.server import bind_socket, build_app, check_bind

    token = os.environ.get("SAFERL_SERVE_TOKEN")
    if args.token_file:
        token = open(args.token_file, encoding="utf-8").read().strip()
        if not token:
            raise ValueError(f"{args.token_file}: the token file is empty")
    check_bind(args.host, token)  # before any weights load
    sock = bind_socket(args.host, args.port)  # a busy port fails now, not after the model has loaded
    from saferl.references import resolve_reference
    from saferl.runtime import configure_process

    configure_process()
    if args.kind in STREAM_KINDS:
        return serve_stream(args, token, sock)
    model = resolve_reference(args.model)
    if args.kind == "guard":
        from saferl.guard.scorer import GuardScorer

        scorer = GuardScorer(model, backend=args.backend, max_new_tokens=args.max_new_tokens,
                             max_model_len=args.max_model_len, dtype=args.dtype)
    else:
        from saferl.helpfulness import HelpfulnessScorer

        scorer = HelpfulnessScorer(model, backend=args.backend, dtype=args.dtype, max_length=args.max_model_len)
    app = build_app(args.kind, scorer, model=args.model, token=token, max_body_bytes=args.max_body_mib << 20,
                    max_batch=args.max_batch, max_wait_s=args.max_wait_ms / 1000)
    import uvicorn

    print(f"[saferl] serving {args.kind} {args.model} on http://{args.host}:{sock.getsockname()[1]} "
          f"(auth: {'bearer token' if token else 'none, loopback only'})", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saferl", description="Safety RL for chat models against a "
                                     "Qwen3Guard-style guard (Ray + vLLM rollouts, hybrid reward, GSPO).")
    from saferl import __version__

    parser.add_argument("--version", action="version", version=f"saferl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run an RL experiment", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run a SafeRL experiment: rollouts on vLLM, guard + helpfulness rewards, GSPO "
                       "updates, weight sync, held-out evaluation before and after, HF checkpoints in "
                       "<run.dir>/checkpoints/. Running the same command again continues an interrupted run "
                       "from its latest checkpoint (checkpoint.resume=auto; 'never' starts afresh). "
                       "Data-parallel trainers: trainer.workers=N trainer.strategy=torch|deepspeed "
                       "trainer.zero_stage=0-3; LoRA: trainer.lora.rank=R.", epilog=EPILOG_OVERRIDES)
    config_args(p)
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
    p.add_argument("--trainer", choices=("saferl", "trl"), default="saferl",
                   help="saferl: the hand-written loop; trl: trl.SFTTrainer and transformers.Trainer with SafeRL's "
                   "shared-prefix batches and target-only head (saferl.sft_batched), cached under a key of its "
                   "own (default: %(default)s)")
    config_args(p)
    p.set_defaults(func=_cmd_toyworld)

    add_sft_parser(sub)
    add_reward_parser(sub)

    p = sub.add_parser("serve", help="serve a guard or helpfulness RM over HTTP (JSON) for training or eval",
                       description="An HTTP reward server: POST /v1/moderate (guard) or /v1/score (rm), GET "
                       "/health, OpenAPI at /openapi.json. Binds 127.0.0.1 by default; any other address "
                       "needs a bearer token (--token-file or SAFERL_SERVE_TOKEN). Concurrent requests are "
                       "batched together.")
    p.add_argument("kind", choices=("guard", "rm", *STREAM_KINDS),
                   help="guard: Qwen3Guard-Gen-format model; rm: reward model; stream-guard: Qwen3Guard-Stream "
                   "moderation streams; chat: an OpenAI-compatible chat of policy -m under CARE (--stream-guard)")
    p.add_argument("-m", "--model", required=True,
                   help="model directory, hub id on a machine with access, or toyworld:guard / toyworld:reward_model")
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
    add_stream_serve_args(p)
    p.set_defaults(func=_cmd_serve)

    add_config_parser(sub)
    add_eval_report_parsers(sub)
    add_guard_parser(sub)
    add_chat_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from saferl.actor_group import PlacementError
    from saferl.config import ConfigError

    try:
        return args.func(args)
    except ConfigError as e:
        print(f"saferl: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"saferl: error: {e}", file=sys.stderr)
        return 2
    except PlacementError as e:  # the Ray cluster cannot hold the roles: the message names them and the nodes
        print(f"saferl: error: {e}", file=sys.stderr)
        return 2
    except ConnectionError as e:  # an endpoint or Ray cluster that nothing answers, checked before any work
        print(f"saferl: error: {e}", file=sys.stderr)
        return 3

