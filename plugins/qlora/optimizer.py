"""The optimizer QLoRA trains with: bitsandbytes paged AdamW on CUDA, torch AdamW elsewhere.

Paged optimizers (Dettmers et al., 2023, https://arxiv.org/abs/2305.14314,
section 3) keep optimizer state in CUDA unified memory so that memory spikes
page it to CPU RAM instead of failing. Paging and bitsandbytes' 8-bit states
only exist on CUDA, so on CPU the plain torch AdamW is returned.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

__all__ = ["make_optimizer"]


def make_optimizer(
    params: Iterable[nn.Parameter],
    lr: float,
    *,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    state_bits: int = 32,
    paged: bool = True,
) -> torch.optim.Optimizer:
    """AdamW for the adapter parameters ``params``.

    :param params: the parameters to train (e.g. ``tuned.trainable_parameters()``).
    :param lr: learning rate.
    :param weight_decay: decoupled weight decay.
    :param betas: Adam's moment decay rates.
    :param eps: Adam's epsilon.
    :param state_bits: 32 or 8, the bits of bitsandbytes' optimizer states (CUDA only).
    :param paged: use a paged optimizer (CUDA only).
    :returns: ``bitsandbytes.optim.[Paged]AdamW{8,32}bit`` when every parameter
        is on a CUDA device, ``torch.optim.AdamW`` otherwise.
    :raises ValueError: for ``state_bits`` other than 8 or 32, or no parameters.
    """
    if state_bits not in (8, 32):
        raise ValueError(f"make_optimizer: state_bits={state_bits!r} is not supported; use 8 or 32")
    params = list(params)
    if not params:
        raise ValueError("make_optimizer: got no parameters to optimize; pass tuned.trainable_parameters()")
    kwargs = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if torch.cuda.is_available() and all(p.device.type == "cuda" for p in params):
        import bitsandbytes as bnb

        name = f"{'Paged' if paged else ''}AdamW{state_bits}bit"
        return getattr(bnb.optim, name)(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)
