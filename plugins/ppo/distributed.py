"""What PPO and GRPO need from ``torch.distributed`` when ``torchrun``/``accelerate launch`` starts several processes.

Each process (rank) samples, scores and updates on its own prompts; these
all-reduces make the ranks behave as one run over their union:

* :func:`average_gradients` before every optimizer step, so every rank keeps the same adapter and head;
* :func:`whiten_over_ranks`: advantages whitened with the mean and variance of all ranks' tokens;
* :func:`sum_over_ranks` / :func:`mean_over_ranks`: global statistics (the KL the adaptive controller
  sees, the logged metrics).

In one process (or without an initialised process group) every function is
the plain single-process computation, bit for bit.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from peftkit_plugins.ppo.advantages import whiten

__all__ = ["world_size", "average_gradients", "sum_over_ranks", "mean_over_ranks", "whiten_over_ranks"]


def world_size() -> int:
    """The number of processes of the ``torch.distributed`` group (1 when none is initialised)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` over the processes of ``torch.distributed`` (no-op in one process)."""
    world = world_size()
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])  # one collective per step
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n


def sum_over_ranks(values: Sequence[float], device: Any = None) -> list[float]:
    """The element-wise sum of ``values`` over all ranks (float64; ``values`` unchanged in one process)."""
    if world_size() == 1:
        return [float(v) for v in values]
    total = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return total.tolist()


def mean_over_ranks(metrics: dict[str, float], device: Any = None) -> dict[str, float]:
    """Each metric averaged over the ranks (every rank must pass the same keys)."""
    world = world_size()
    if world == 1:
        return metrics
    keys = sorted(metrics)
    return {k: v / world for k, v in zip(keys, sum_over_ranks([metrics[k] for k in keys], device))}


def whiten_over_ranks(x: torch.Tensor, mask: torch.Tensor, *, eps: float = 1e-8) -> torch.Tensor:
    """:func:`~.advantages.whiten` with the mean and (Bessel-corrected) variance of the masked positions of all ranks.

    One all-reduce of (sum, sum of squares, count) in float64; in one process it is ``whiten(x, mask)``.
    """
    if world_size() == 1:
        return whiten(x, mask, eps=eps)
    m = mask.to(torch.float64)
    values = x.detach().to(torch.float64) * m
    stats = torch.stack([values.sum(), (values * values).sum(), m.sum()])
    torch.distributed.all_reduce(stats)
    total, squares, n = stats.tolist()
    mean = total / max(n, 1.0)
    var = (squares - n * mean * mean) / (n - 1) if n >= 2 else 0.0
    out = (x - mean) * (max(var, 0.0) + eps) ** -0.5
    return out * mask.to(x.dtype)
