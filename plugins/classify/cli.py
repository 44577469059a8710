"""``peftkit classify``: label texts with a trained classifier (adapter + label head).

    peftkit classify --adapter runs/classify-lora/adapter --text "What is your favourite food?"
    peftkit classify --adapter runs/classify-lora/adapter --file texts.jsonl   # {"text": ...} per line

Prints the most likely label and every label's probability (one JSON line per
record with ``--file``). Hooked into the ``peftkit`` parser by
:func:`add_subcommands`, called from this plugin's ``peftkit_register_commands``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["add_subcommands", "load_classifier"]


def load_classifier(adapter: Path, model_name: str | None = None) -> tuple[Any, Any]:
    """``(tuned, tokenizer)`` for a classifier directory: adapter + ``heads[<adapter>]`` (its base from ``base_model.txt`` unless given)."""
    import peftkit
    from peftkit.training.models import load_model_and_tokenizer, recorded_base_model, saved_tokenizer
    from peftkit_plugins.classify.head import load_label_head
    from peftkit_plugins.classify.objective import install_head

    head = load_label_head(adapter)  # first: a wrong directory fails before the model loads
    model, tokenizer = load_model_and_tokenizer(model_name if model_name is not None else recorded_base_model(adapter))
    if (adapter / "tokenizer").is_dir():
        tokenizer = saved_tokenizer(adapter / "tokenizer")
    tuned = peftkit.load(model, adapter)
    install_head(tuned, head, trainable=False)
    tuned.eval()
    return tuned, tokenizer


def _cmd_classify(args: argparse.Namespace) -> int:
    from peftkit.errors import PeftkitError
    from peftkit_plugins.classify.objective import predict

    if args.file:
        records = [json.loads(line) for line in Path(args.file).read_text().splitlines() if line.strip()]
        bad = [i for i, r in enumerate(records, 1) if not isinstance(r, dict) or not isinstance(r.get("text"), str)]
        if bad:
            raise PeftkitError(f"{args.file}: line(s) {bad[:10]} have no string 'text' field; each line is {{\"text\": ...}}")
    elif args.text is not None:
        records = [{"text": args.text}]
    else:
        raise PeftkitError("peftkit classify needs --text TEXT, or --file with {\"text\": ...} lines")
    tuned, tokenizer = load_classifier(Path(args.adapter), args.model)
    for record in records:
        [probabilities] = predict(tuned, tokenizer, [record["text"]])
        label = next(iter(probabilities))
        if args.file:
            print(json.dumps({**record, "predicted": label, "probabilities": probabilities}))
        else:
            print(label)
            for name, p in probabilities.items():
                print(f"  {name}\t{p:.4f}")
    return 0


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``classify`` to the ``peftkit`` parser."""
    p = subparsers.add_parser("classify", help="label texts with a classifier (adapter + label head of a classify run)")
    p.add_argument("--adapter", required=True, help="classifier directory (output.dir/adapter of a classify run)")
    p.add_argument("--text", help="the text to classify")
    p.add_argument("--file", help="a .jsonl file of {\"text\": ...} records (prints one JSON line each)")
    p.add_argument("--model", default=None, help="base model (default: the one recorded in the adapter directory)")
    p.set_defaults(func=_cmd_classify)
