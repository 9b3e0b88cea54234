"""The `saferl` command line (`saferl --help`); `main` is the console entry point."""

from saferl.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
