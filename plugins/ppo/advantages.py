"""Advantages for PPO: masked statistics, whitening, and generalized advantage estimation.

Tensors here are response-aligned: ``(B, R)`` with ``R`` the longest response
of the rollout and a ``mask`` that is 1 on each row's response tokens (a
contiguous prefix) and 0 on padding after them.

GAE (Schulman et al., 2016, https://arxiv.org/abs/1506.02438)::

    delta_t = r_t + gamma * V_{t+1} - V_t          (V_{T} = 0 after the last token)
    A_t     = delta_t + gamma * lambda * A_{t+1}
    R_t     = A_t + V_t                            (the value function's target)
"""

from __future__ import annotations

import torch

__all__ = ["masked_mean", "masked_var", "whiten", "gae"]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (a scalar)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, *, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over masked positions (Bessel-corrected by default, as numpy's ``ddof=1``)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            return torch.zeros_like(var)
        var = var * n / (n - 1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over masked positions; masked-out positions become 0.

    :param shift_mean: ``False`` keeps the original mean (rescale only).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimates and returns, ``(B, R)`` each (0 where ``mask`` is 0).

    :param rewards: ``(B, R)`` per-token rewards (KL penalty, plus the score at the last token).
    :param values: ``(B, R)`` value estimates ``V(s_t)`` before each response token.
    :param mask: ``(B, R)`` 1 on response tokens.
    """
    mask = mask.to(values.dtype)
    values = values * mask  # no bootstrapping from positions after the end
    rewards = rewards * mask
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask
