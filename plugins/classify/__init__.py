"""Built-in plugin ``classify``: GPT-1 style text classification with any PEFT method.

A classifier is the frozen base + an adapter + a label head on the last real
token's hidden state (:mod:`.head`, the reward model's head with one output
per label), trained on ``{text, label}`` records with cross-entropy plus
``lm_weight`` x the LM loss on the text (GPT-1's ``L3 = L2 + lambda L1``,
:mod:`.objective`). The head and its label names are saved beside the adapter;
``peftkit classify`` labels texts with it (:mod:`.cli`).
"""

from __future__ import annotations

from typing import Any, Callable

from peftkit.hookspecs import hookimpl
from peftkit_plugins.classify.head import LabelHead, attach_label_head, load_label_head, save_label_head
from peftkit_plugins.classify.metrics import accuracy, macro_f1
from peftkit_plugins.classify.objective import ClassifyObjective, evaluate_classifier, install_head, label_logits, predict
from peftkit_plugins.classify.options import ClassifyOptions

__all__ = [
    "ClassifyObjective",
    "ClassifyOptions",
    "LabelHead",
    "accuracy",
    "attach_label_head",
    "evaluate_classifier",
    "install_head",
    "label_logits",
    "load_label_head",
    "macro_f1",
    "predict",
    "save_label_head",
]


@hookimpl
def peftkit_register_commands(subparsers: Any) -> None:
    from peftkit_plugins.classify.cli import add_subcommands

    add_subcommands(subparsers)


@hookimpl
def peftkit_register_objectives(register: Callable[[object], None]) -> None:
    register(ClassifyObjective())
