"""The scalar head of a reward (or value) model, and where it reads the sequence: the last real token.

A reward model is the frozen base + one adapter (any method) + a linear head
``r(x, y) = w^T h_last + b`` on the decoder's last hidden state ``h_last`` of
the last non-padding token of (prompt, response) (Ouyang et al., 2022,
https://arxiv.org/abs/2203.02155, Sec. 3.5; Stiennon et al., 2020).

Heads live in a ``ModuleDict`` called ``heads`` on the :class:`peftkit.TunedModel`
so that they move with the model (``.to``), appear in its trainable
parameters, and several roles (reward, value) can share one base. They are not
adapters: the core's adapter format never sees them; :mod:`.saving` writes them
to their own file.

Prompt-side methods (prompt tuning, P-tuning, prefix tuning) never shift the
real tokens' hidden states: input-side adapters cut their virtual positions
off the decoder output and prefix tuning adds none, so ``hidden[:, t]`` always
belongs to ``input_ids[:, t]`` and the last real token is found from the
attention mask alone, with left or right padding.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.training.losses import lm_hidden_states

__all__ = ["LinearHead", "ScalarHead", "heads_of", "last_token_index", "last_token_hidden", "sequence_scores"]


class LinearHead(nn.Linear):
    """``nn.Linear(hidden_size, outputs)`` with a small init: ``w ~ N(0, 1/(H+1))``, ``b = 0``.

    The small init (as in OpenAI's lm-human-preferences value head) gives
    outputs with a standard deviation about the RMS of the hidden state, so
    the first ranking losses are near ``log 2`` when responses score alike.
    """

    def __init__(self, hidden_size: int, outputs: int = 1, *, generator: torch.Generator | None = None):
        super().__init__(hidden_size, outputs)
        with torch.no_grad():
            self.weight.normal_(0.0, 1.0 / math.sqrt(hidden_size + 1), generator=generator)
            self.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (..., H) -> (..., outputs)
        return super().forward(hidden.to(self.weight.dtype))


class ScalarHead(LinearHead):
    """A :class:`LinearHead` with one output, squeezed: a score per sequence (reward or value)."""

    def __init__(self, hidden_size: int, *, generator: torch.Generator | None = None):
        super().__init__(hidden_size, 1, generator=generator)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (..., H) -> (...)
        return super().forward(hidden).squeeze(-1)


def heads_of(model: nn.Module) -> nn.ModuleDict:
    """The ``heads`` ModuleDict of a tuned model, created empty on first use."""
    heads = model._modules.get("heads")
    if heads is None:
        heads = nn.ModuleDict()
        model.add_module("heads", heads)
    return heads


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding position of each row, for left or right padding.

    :param attention_mask: ``(B, T)`` with 1 on real tokens.
    :returns: ``(B,)`` long tensor.
    :raises PeftkitError: if a row has no real token.
    """
    mask = attention_mask.bool()
    if not bool(mask.any(-1).all()):
        rows = (~mask.any(-1)).nonzero().flatten().tolist()
        raise PeftkitError(f"rows {rows} of the batch are all padding (attention_mask all 0); drop empty examples")
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)  # (B, T)
    return positions.masked_fill(~mask, -1).amax(-1)  # (B,)


def last_token_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``hidden[b, last_token_index[b]]`` for every row: ``(B, T, H) -> (B, H)``."""
    index = last_token_index(attention_mask)  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def sequence_scores(model: nn.Module, head: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar scores ``(B,)`` of ``model`` (its active adapter) + ``head`` at each row's last real token."""
    hidden = lm_hidden_states(model, {"input_ids": input_ids, "attention_mask": attention_mask})  # (B, T, H)
    return head(last_token_hidden(hidden, attention_mask))
