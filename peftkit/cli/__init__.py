"""The ``peftkit`` command line: one module per command group (:mod:`.plugins`: ``methods``/``plugins``;
:mod:`.training`: ``train``/``validate``/``recipes``/``generate``), plus what plugins add."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from peftkit._version import __version__

    parser = argparse.ArgumentParser(prog="peftkit", description="Parameter-efficient fine-tuning with pluggable methods.")
    parser.add_argument("--version", action="version", version=f"peftkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from peftkit.cli import plugins as plugin_commands
    from peftkit.cli import training as training_commands

    plugin_commands.add_subcommands(sub)
    training_commands.add_subcommands(sub)
    from peftkit.plugins import plugin_manager

    plugin_manager().hook.peftkit_register_commands(subparsers=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from peftkit.errors import PeftkitError

    try:
        return int(args.func(args) or 0)
    except PeftkitError as exc:
        print(f"peftkit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
