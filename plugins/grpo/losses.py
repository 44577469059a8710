"""GRPO's advantages and loss (Shao et al., 2024, DeepSeekMath, https://arxiv.org/abs/2402.03300, Eq. 3).

For a prompt q with G sampled completions o_1..o_G and rewards r_1..r_G::

    A_i        = (r_i - mean(r)) / (std(r) + eps)          (scale_rewards; else r_i - mean(r))
    rho_i,t    = pi(o_i,t | q, o_i,<t) / pi_old(o_i,t | q, o_i,<t)
    l_i,t      = -min(rho_i,t A_i, clip(rho_i,t, 1 - eps_c, 1 + eps_c) A_i) + beta * KL_i,t
    KL_i,t     = pi_ref / pi - log(pi_ref / pi) - 1         (k3: unbiased, always >= 0; Schulman 2020)

Every token of completion i shares its advantage A_i (no value function).
``std`` is the sample standard deviation of the group (Bessel-corrected, as TRL).
The loss averages ``l`` per token over the minibatch (``token``, DAPO) or per
completion first (``sequence``, the paper's ``1/G sum_i 1/|o_i| sum_t``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from peftkit_plugins.ppo.advantages import masked_mean

__all__ = ["GRPOLoss", "group_advantages", "grpo_loss", "k3_kl"]


def group_advantages(rewards: torch.Tensor, num_generations: int, *, scale_rewards: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """``(B * G,) -> (B * G,)``: each reward minus its group's mean (over ``/ (std + eps)``).

    Completions of one prompt are consecutive: rows ``[g * G, (g + 1) * G)`` form group ``g``.
    """
    groups = rewards.float().view(-1, num_generations)  # (B, G)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale_rewards:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token ``exp(ref - logp) - (ref - logp) - 1``, an unbiased, non-negative estimate of KL(pi || pi_ref)."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1.0


class GRPOLoss(NamedTuple):
    loss: torch.Tensor
    policy_loss: torch.Tensor  # the clipped surrogate part, aggregated the same way
    kl: torch.Tensor  # mean per-token k3 KL over the minibatch's completion tokens (0 without a reference)
    clip_fraction: torch.Tensor  # share of tokens where the clipped term was the one taken


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    if loss_type == "token":
        return masked_mean(per_token, mask)
    mask_f = mask.to(per_token.dtype)
    per_sequence = (per_token * mask_f).sum(-1) / mask_f.sum(-1).clamp(min=1.0)  # (B,)
    return per_sequence.mean()


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    loss_type: str = "token",
) -> GRPOLoss:
    """The GRPO loss of a minibatch: ``(B, R)`` log-probabilities and mask, ``(B,)`` advantages."""
    ratio = torch.exp(logprobs - old_logprobs)  # (B, R)
    adv = advantages.unsqueeze(-1).to(logprobs.dtype)  # (B, 1): one advantage per completion
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_token = torch.maximum(unclipped, clipped)
    policy = _aggregate(per_token, mask, loss_type)
    kl = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    if ref_logprobs is not None:
        kl_tokens = k3_kl(logprobs, ref_logprobs)
        per_token = per_token + kl_coef * kl_tokens
        with torch.no_grad():
            kl = masked_mean(kl_tokens, mask)
    loss = _aggregate(per_token, mask, loss_type)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
    return GRPOLoss(loss, policy.detach(), kl, clip_fraction)
