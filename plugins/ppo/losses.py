"""The PPO losses and diagnostics (Schulman et al., 2017, https://arxiv.org/abs/1707.06347).

With ``rho_t = pi(a_t|s_t) / pi_old(a_t|s_t)`` and whitened advantages ``A_t``::

    L_policy = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))
    L_value  = 0.5 mean_t max((V_t - R_t)^2, (V_old,t + clip(V_t - V_old,t, -eps_v, eps_v) - R_t)^2)

Means run over every response token of the minibatch (masked). The per-token
KL penalty of InstructGPT's objective ``r(x, y) - beta log(pi_RL(y|x) / pi_SFT(y|x))``
is spread over the tokens: ``r_t = -beta (log pi_RL(y_t) - log pi_SFT(y_t))``,
plus the reward model's score at the last token (Ziegler et al., 2019).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from peftkit_plugins.ppo.advantages import masked_mean

__all__ = ["PolicyLoss", "ValueLoss", "policy_loss", "value_loss", "token_rewards", "entropy_from_logits", "token_logprobs"]


class PolicyLoss(NamedTuple):
    loss: torch.Tensor
    clip_fraction: torch.Tensor  # share of tokens where the clipped term was the larger one
    approx_kl: torch.Tensor  # 0.5 * mean (log rho)^2, an estimate of KL(pi_old || pi)


class ValueLoss(NamedTuple):
    loss: torch.Tensor
    clip_fraction: torch.Tensor


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float) -> PolicyLoss:
    """The clipped surrogate loss over response tokens, ``(B, R)`` inputs."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
        approx_kl = 0.5 * masked_mean(log_ratio**2, mask)
    return PolicyLoss(loss, clip_fraction, approx_kl)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_range: float) -> ValueLoss:
    """The clipped value loss over response tokens, ``(B, R)`` inputs."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_error > unclipped_error).to(values.dtype), mask)
    return ValueLoss(loss, clip_fraction)


def token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``-beta * kl_t`` plus each row's score at its last response token.

    :param scores: ``(B,)`` reward-model scores (any penalties already applied).
    :param logprobs, ref_logprobs: ``(B, R)`` log-probabilities of the sampled tokens under policy and reference.
    :returns: ``(rewards, kl)``, both ``(B, R)``; ``kl = log pi - log pi_ref`` (0 where ``mask`` is 0).
    """
    mask_f = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * mask_f
    rewards = -beta * kl
    last = mask.long().sum(-1).clamp(min=1) - 1  # (B,)
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards * mask_f, kl


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[token]`` for each position: ``(..., V), (...) -> (...)``, in float32."""
    logits = logits.float()
    return torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax of ``logits`` at each position, ``(..., V) -> (...)``."""
    logits = logits.float()
    log_z = torch.logsumexp(logits, -1, keepdim=True)
    probs = torch.exp(logits - log_z)
    return (log_z.squeeze(-1) - (probs * logits).sum(-1))
