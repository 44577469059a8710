"""Built-in plugin ``grpo``: group-relative policy optimisation (GRPO) with any PEFT method, on one frozen base model.

Objective (Shao et al., 2024, DeepSeekMath, https://arxiv.org/abs/2402.03300, Eq. 3), per prompt q
with G sampled completions o_i and rewards r_i::

    J(theta) = E[ 1/G sum_i 1/|o_i| sum_t min(rho_i,t A_i, clip(rho_i,t, 1-eps, 1+eps) A_i) - beta KL_k3(pi || pi_ref) ]
    A_i = (r_i - mean(r)) / (std(r) + eps)

No value head and no reward model needed: the reward is a registered function
(``peftkit_register_rewards``; the built-in ``rewards`` plugin ships
``arithmetic_exact_match`` and ``rlhf_task``) or, as in PPO, a reward model
directory. Sampling, role switching (policy / reference on one base) and
log-probabilities are PPO's (:mod:`peftkit_plugins.ppo`); :mod:`.losses` holds
the group advantages and the loss, :mod:`.learner` one iteration,
:mod:`.objective` the trainer's loop.
"""

from __future__ import annotations

from typing import Callable

from peftkit.hookspecs import hookimpl
from peftkit_plugins.grpo.learner import GRPOLearner, average_gradients
from peftkit_plugins.grpo.losses import GRPOLoss, group_advantages, grpo_loss, k3_kl
from peftkit_plugins.grpo.objective import GRPOObjective, prepare_prompts_with_records
from peftkit_plugins.grpo.options import GRPOOptions, resolve_reward

__all__ = [
    "GRPOLearner",
    "GRPOLoss",
    "GRPOObjective",
    "GRPOOptions",
    "average_gradients",
    "group_advantages",
    "grpo_loss",
    "k3_kl",
    "prepare_prompts_with_records",
    "resolve_reward",
]


@hookimpl
def peftkit_register_objectives(register: Callable[[object], None]) -> None:
    register(GRPOObjective())
