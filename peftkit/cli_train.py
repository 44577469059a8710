"""Training commands of the ``peftkit`` CLI (train, validate, recipes, generate)."""

from __future__ import annotations

import argparse


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add the training subcommands to the ``peftkit`` parser."""
