"""Built-in plugin ``ppo``: InstructGPT's PPO and PPO-ptx with any PEFT method, on one frozen base model.

Objective (Ouyang et al., 2022, https://arxiv.org/abs/2203.02155, Eq. 2)::

    objective(phi) = E_{(x,y) ~ pi_RL}[ r(x, y) - beta log(pi_RL(y|x) / pi_SFT(y|x)) ]
                     + gamma E_{x ~ D_pretrain}[ log pi_RL(x) ]        (PPO-ptx: ptx_coef = gamma > 0)

optimised with PPO (clipped ratio, clipped value loss, GAE, whitened
advantages). Policy, reference, value and reward are adapters and heads on
ONE base model (:mod:`.roles`); the algorithm is plain functions
(:mod:`.advantages`, :mod:`.losses`, :mod:`.kl_control`, :mod:`.rollout`,
:mod:`.learner`) and :mod:`.objective` drives them from the trainer.
"""

from __future__ import annotations

from typing import Callable

from peftkit.hookspecs import hookimpl
from peftkit_plugins.ppo.advantages import gae, masked_mean, masked_var, whiten
from peftkit_plugins.ppo.kl_control import KLController
from peftkit_plugins.ppo.learner import PPOLearner, ptx_loss
from peftkit_plugins.ppo.losses import entropy_from_logits, policy_loss, token_logprobs, token_rewards, value_loss
from peftkit_plugins.ppo.objective import PPOObjective, check_train_settings, setup_roles, stop_token_ids
from peftkit_plugins.ppo.options import PPOOptions
from peftkit_plugins.ppo.roles import Roles, attach_value_head
from peftkit_plugins.ppo.rollout import Rollout, generate_responses, pack_episodes

__all__ = [
    "KLController",
    "PPOLearner",
    "PPOObjective",
    "PPOOptions",
    "Roles",
    "Rollout",
    "attach_value_head",
    "check_train_settings",
    "entropy_from_logits",
    "gae",
    "generate_responses",
    "masked_mean",
    "masked_var",
    "pack_episodes",
    "policy_loss",
    "ptx_loss",
    "setup_roles",
    "stop_token_ids",
    "token_logprobs",
    "token_rewards",
    "value_loss",
    "whiten",
]


@hookimpl
def peftkit_register_objectives(register: Callable[[object], None]) -> None:
    register(PPOObjective())
