"""The ``kbit`` command line: one subcommand per module in :mod:`kbit.commands`."""

from __future__ import annotations

import argparse
import sys

from .commands import estimate, export, generate, report
from .train import cli as train_cli


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = argparse.ArgumentParser(prog="kbit", description="QLoRA fine-tuning with bitsandbytes-exact quantization")
    sub = p.add_subparsers(dest="command", required=True)
    for module in (train_cli, report, export, generate, estimate):
        module.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kbit`` command; user errors print one line and exit with status 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"kbit {args.command}: error: {e}", file=sys.stderr)
        return 2
