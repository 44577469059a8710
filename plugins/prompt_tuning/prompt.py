"""``PromptEmbeddings``: ``P`` trainable virtual-token embeddings, used as they are.

The prompt source of prompt tuning, and of a P-tuning adapter loaded in its
inference form (the encoder's output saved as plain embeddings).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

__all__ = ["PromptEmbeddings", "PROMPT_KEY"]

PROMPT_KEY = "prompt_embeddings"  # also Hugging Face peft's key for the same (P, H) tensor


class PromptEmbeddings(nn.Module):
    """Virtual-token embeddings ``E`` (P x H), a :class:`~peftkit_plugins.prompt_tuning.virtual_tokens.PromptSource`.

    :param initial: the starting embeddings, ``(P, H)``; kept in at least float32
        (cast to the model's dtype when prepended).
    """

    def __init__(self, initial: torch.Tensor):
        super().__init__()
        if initial.dim() != 2:
            raise ValueError(f"virtual-token embeddings must be (num_virtual_tokens, hidden), got shape {tuple(initial.shape)}")
        dtype = torch.promote_types(initial.dtype, torch.float32)
        self.prompt_embeddings = nn.Parameter(initial.detach().to(dtype).clone())  # (P, H)

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.prompt_embeddings.shape[0])

    def forward(self) -> torch.Tensor:
        return self.prompt_embeddings  # (P, H)

    def prompt_state_dict(self, *, training: bool) -> dict[str, torch.Tensor]:
        return {PROMPT_KEY: self.prompt_embeddings.detach()}

    def load_prompt_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        unexpected = sorted(set(state) - {PROMPT_KEY})
        if PROMPT_KEY not in state or unexpected:
            raise KeyError(f"expected exactly {[PROMPT_KEY]}, got {sorted(state)}")
        tensor = state[PROMPT_KEY]
        if tuple(tensor.shape) != tuple(self.prompt_embeddings.shape):
            raise ValueError(f"{PROMPT_KEY} has shape {tuple(tensor.shape)}, expected {tuple(self.prompt_embeddings.shape)}")
        with torch.no_grad():
            self.prompt_embeddings.copy_(tensor)

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, hidden={self.prompt_embeddings.shape[1]}"
