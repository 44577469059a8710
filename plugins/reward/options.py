"""Options of the ``reward`` objective."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RewardOptions"]


@dataclass
class RewardOptions:
    """``objective.options`` for ``objective.name: reward``.

    Attributes:
        chat_template: render prompts with the tokenizer's chat template (when it has one),
            exactly as the SFT and PPO objectives do.
        head_seed: seed of the head's initialisation (its weights ~ N(0, 1/(H+1))).
    """

    chat_template: bool = True
    head_seed: int = 0
