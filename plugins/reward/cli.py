"""``peftkit score``: rate (prompt, response) pairs with a trained reward model.

    peftkit score --adapter runs/rm-lora/adapter --prompt "Tell me about cats." --response "cats are great!"
    peftkit score --adapter runs/rm-lora/adapter --file pairs.jsonl   # {"prompt", "response"} per line

Hooked into the ``peftkit`` parser by calling :func:`add_subcommands` with its
subparsers (as :mod:`peftkit.cli.training` does).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["add_subcommands", "load_for_scoring"]


def load_for_scoring(adapter: Path, model_name: str | None = None) -> tuple[Any, Any, Any]:
    """``(tuned, head, tokenizer)`` for a reward model directory (its base from ``base_model.txt`` unless given)."""
    import peftkit
    from peftkit.training.models import load_model_and_tokenizer, recorded_base_model, saved_tokenizer
    from peftkit_plugins.reward.saving import load_reward_model

    model, tokenizer = load_model_and_tokenizer(model_name if model_name is not None else recorded_base_model(adapter))
    if (adapter / "tokenizer").is_dir():
        tokenizer = saved_tokenizer(adapter / "tokenizer")
    tuned = peftkit.TunedModel(model)
    head = load_reward_model(tuned, adapter, "reward")
    tuned.eval()
    return tuned, head, tokenizer


def _cmd_score(args: argparse.Namespace) -> int:
    from peftkit.errors import PeftkitError
    from peftkit_plugins.reward.saving import score

    if args.file:
        pairs = [json.loads(line) for line in Path(args.file).read_text().splitlines() if line.strip()]
    elif args.prompt is not None and args.response is not None:
        pairs = [{"prompt": args.prompt, "response": args.response}]
    else:
        raise PeftkitError("peftkit score needs --prompt and --response, or --file with {\"prompt\", \"response\"} lines")
    tuned, head, tokenizer = load_for_scoring(Path(args.adapter), args.model)
    for pair in pairs:
        value = score(tuned, head, tokenizer, pair["prompt"], pair["response"])
        print(json.dumps({**pair, "score": value}) if args.file else f"{value:.4f}")
    return 0


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``score`` to the ``peftkit`` parser."""
    p = subparsers.add_parser("score", help="score (prompt, response) pairs with a reward model (adapter + head)")
    p.add_argument("--adapter", required=True, help="reward model directory (output.dir/adapter of a reward run)")
    p.add_argument("--prompt", help="the prompt")
    p.add_argument("--response", help="the response to score")
    p.add_argument("--file", help="a .jsonl file of {\"prompt\", \"response\"} records (prints one JSON line each)")
    p.add_argument("--model", default=None, help="base model (default: the one recorded in the adapter directory)")
    p.set_defaults(func=_cmd_score)
