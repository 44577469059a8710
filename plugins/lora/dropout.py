"""Dropout fused into LoRA's first projection, without saving a dropped copy of the input.

``F.linear(F.dropout(x), A)`` saves the dropped copy of ``x`` for the backward
pass: one full activation per adapted layer (q, k and v projections each keep
their own). Here the backward pass regenerates the mask from a seed instead, so
the only tensor saved is ``x`` itself, which is shared by every adapter reading
it and which ``F.linear(x, A)`` would save anyway. The seed comes from torch's
default generator, so runs stay reproducible under ``torch.manual_seed`` and
activation checkpointing (which restores that generator) recomputes the same mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dropout_linear"]


def _mask(x: torch.Tensor, keep: float, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    return torch.empty_like(x).bernoulli_(keep, generator=gen)


class _DropoutLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        keep = 1.0 - p
        h = F.linear(x * _mask(x, keep, seed), weight) / keep  # (B, T, r); the masked x is freed here
        ctx.save_for_backward(x, weight)
        ctx.keep, ctx.seed = keep, seed
        return h

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        x, weight = ctx.saved_tensors
        mask = _mask(x, ctx.keep, ctx.seed)
        grad_h = grad_h / ctx.keep
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = F.linear(grad_h, weight.t()) * mask  # (B, T, in)
        if ctx.needs_input_grad[1]:
            dropped = (x * mask).reshape(-1, x.shape[-1])
            grad_w = grad_h.reshape(-1, grad_h.shape[-1]).t() @ dropped  # (r, in)
        return grad_x, grad_w, None, None


def dropout_linear(x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
    """``F.linear(F.dropout(x, p, training=True), weight)``, saving only ``x`` for backward."""
    seed = int(torch.randint(0, 2**62, (1,)).item())
    return _DropoutLinear.apply(x, weight, p, seed)
