"""Reference computations that do not depend on ``generate()`` or a KV cache."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["greedy_by_full_forward"]


@torch.no_grad()
def greedy_by_full_forward(
    model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, suppress: Sequence[int] = ()
) -> torch.Tensor:
    """Greedy continuation of unpadded ``input_ids`` (``(B, T)``), re-running the whole sequence for every token.

    No cache and no ``generate()``: the reference for a model whose forward is
    trusted but whose generation path is not (e.g. ``peft``'s prompt-learning
    generation under transformers >= 5.24, which renamed ``past_key_values``).

    :param suppress: token ids never chosen (what ``generate(min_new_tokens=...)`` does to the EOS token).
    :returns: ``(B, T + max_new_tokens)`` token ids, the prompt first.
    """
    ids = input_ids
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1].clone()
        logits[:, list(suppress)] = float("-inf")
        ids = torch.cat([ids, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return ids
