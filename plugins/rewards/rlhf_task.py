"""The true reward of the data/rlhf demo task: reply in lowercase and end with '!'.

::

    true_reward(y) = 0.6 * [y has no uppercase letter] + 0.4 * [y, stripped, ends with "!"]
                     (0 for a reply without any letter, so an empty reply earns nothing)

It lives here, in an installed plugin, because data/ does not ship with the
wheel; ``data/rlhf/task.py`` (which generates the task's data) imports it.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

__all__ = ["RlhfTaskReward", "true_reward"]


def true_reward(response: str) -> float:
    """0.6 for no uppercase letter + 0.4 for ending with '!' (after stripping spaces); 0 without any letter."""
    text = response.strip()
    if not any(c.isalpha() for c in text):
        return 0.0
    return 0.6 * float(not any(c.isupper() for c in text)) + 0.4 * float(text.endswith("!"))


class RlhfTaskReward:
    """:func:`true_reward` of each completion (the prompt and record are not needed)."""

    name = "rlhf_task"
    description = "data/rlhf's true reward: 0.6 for no uppercase letter + 0.4 for ending with '!' (0 without letters)"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], records: Sequence[Mapping[str, Any]]) -> list[float]:
        return [true_reward(c) for c in completions]
