"""Argument helpers shared by the `saferl` subcommands."""

from __future__ import annotations

import argparse

EPILOG_OVERRIDES = """overrides are dotted config keys, e.g.:
  trainer.lr=1e-4 trainer.steps=10 rollout.num_engines=1 reward.recipe=guard_only run.executor=local
every key and its default lives in saferl/config.py; an unknown key is rejected with the closest valid ones."""


def config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", default=None, help="YAML config file (default: schema defaults = toy run)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, applied after the file")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show every log line (logging.verbose=true): the known-harmless vLLM/Ray/torch ones too")


def verbose_arg(p: argparse.ArgumentParser) -> None:
    """-v for the commands without a config (`saferl sft`, `reward`, `guard train-stream`)."""
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show every log line: the known-harmless DeepSpeed/torch/transformers ones too")


def quiet_unless_verbose(args: argparse.Namespace) -> None:
    """Filter this process's output (`saferl.quiet`) unless -v; first thing in a command, before the model
    libraries are imported, so their logging handlers write through the filter."""
    if not args.verbose:
        from saferl.quiet import quiet_output

        quiet_output()


def overrides(args: argparse.Namespace) -> list[str]:
    """The command's KEY=VALUE overrides, with -v as logging.verbose=true (after them: -v wins)."""
    return [*args.overrides, *(["logging.verbose=true"] if args.verbose else [])]


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
