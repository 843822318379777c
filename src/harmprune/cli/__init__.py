"""Command-line entry point. The CLI only parses arguments and calls library functions.

Each command group lives in its own module with an ``add_commands(subparsers)`` function that registers its
sub-commands and sets ``func`` to a handler taking the parsed namespace. Modules import heavy libraries inside
their handlers, so ``harmprune --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from harmprune import __version__

# One module per command group; adding a group is adding its name here.
COMMAND_MODULES = ("core", "models", "data", "evals", "organism", "finetune", "judge", "attack", "experiments", "plan")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harmprune", description="Targeted weight pruning as a causal probe of harmful generation."
    )
    parser.add_argument("--version", action="version", version=f"harmprune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:  # a listed module that is missing is a broken install: fail loudly
        importlib.import_module(f"harmprune.cli.{name}").add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    from harmprune.errors import HarmpruneError

    try:
        result = args.func(args)
    except (HarmpruneError, FileNotFoundError) as e:
        print(f"harmprune {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(result or 0)
