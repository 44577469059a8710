"""Options of the ``reward`` objective."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RewardOptions"]

#: Seeds are 32-bit unsigned, as train.seed (numpy's range).
MAX_SEED = 2**32 - 1


@dataclass
class RewardOptions:
    """``objective.options`` for ``objective.name: reward``.

    Attributes:
        chat_template: render prompts with the tokenizer's chat template (when it has one),
            exactly as the SFT and PPO objectives do.
        head_seed: seed of the head's initialisation (its weights ~ N(0, 1/(H+1))); 0..MAX_SEED.
    """

    chat_template: bool = True
    head_seed: int = 0

    def validate(self) -> list[str]:
        if 0 <= self.head_seed <= MAX_SEED:
            return []
        return [f"option 'head_seed' = {self.head_seed!r} must be in [0, {MAX_SEED}] (2**32 - 1, as train.seed); e.g. 0"]
