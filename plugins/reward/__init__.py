"""Built-in plugin ``reward``: reward models with any PEFT method (InstructGPT's pairwise ranking loss).

A reward model is the frozen base + an adapter + a scalar head on the last
non-padding token's hidden state (:mod:`.head`), trained on (prompt, chosen,
rejected) pairs or ranked groups of K responses with all C(K, 2) comparisons
of a prompt in one batch element (:mod:`.loss`, :mod:`.data`). Saved as one
directory, adapter + ``reward_head.safetensors`` (:mod:`.saving`);
:func:`score` rates a (prompt, response) pair.
"""

from __future__ import annotations

from typing import Any, Callable

from peftkit.hookspecs import hookimpl
from peftkit_plugins.reward.head import LinearHead, ScalarHead, heads_of, last_token_hidden, last_token_index, sequence_scores
from peftkit_plugins.reward.loss import ranking_loss
from peftkit_plugins.reward.objective import RewardObjective, attach_head, evaluate_ranking
from peftkit_plugins.reward.options import RewardOptions
from peftkit_plugins.reward.saving import load_head, load_reward_model, save_head, save_reward_model, score

__all__ = [
    "LinearHead",
    "RewardObjective",
    "RewardOptions",
    "ScalarHead",
    "attach_head",
    "evaluate_ranking",
    "heads_of",
    "last_token_hidden",
    "last_token_index",
    "load_head",
    "load_reward_model",
    "ranking_loss",
    "save_head",
    "save_reward_model",
    "score",
    "sequence_scores",
]


@hookimpl
def peftkit_register_commands(subparsers: Any) -> None:
    from peftkit_plugins.reward.cli import add_subcommands

    add_subcommands(subparsers)


@hookimpl
def peftkit_register_objectives(register: Callable[[object], None]) -> None:
    register(RewardObjective())
