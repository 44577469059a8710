"""Built-in plugin ``rewards``: programmatic reward functions for objectives that score sampled completions (``grpo``).

* ``arithmetic_exact_match``: 1.0 when the reply is exactly the record's ``answer``
  (data/arithmetic; the same rule as its evaluation's ``exact_match``);
* ``arithmetic_first_number``: 1.0 when the first integer in the reply is the ``answer``
  (the evaluation's ``first_number_match``: credits a right number wrapped in words);
* ``rlhf_task``: the true reward of the data/rlhf demo task (lowercase, ending with '!').

Each is a :class:`peftkit.registry.Reward`: ``reward(prompts, completions, records) -> list[float]``.
"""

from __future__ import annotations

from typing import Callable

from peftkit.hookspecs import hookimpl
from peftkit_plugins.rewards.arithmetic import ArithmeticExactMatch, ArithmeticFirstNumber, exact_match, first_number_match
from peftkit_plugins.rewards.rlhf_task import RlhfTaskReward, true_reward

__all__ = [
    "ArithmeticExactMatch",
    "ArithmeticFirstNumber",
    "RlhfTaskReward",
    "exact_match",
    "first_number_match",
    "true_reward",
]


@hookimpl
def peftkit_register_rewards(register: Callable[[object], None]) -> None:
    register(ArithmeticExactMatch())
    register(ArithmeticFirstNumber())
    register(RlhfTaskReward())
