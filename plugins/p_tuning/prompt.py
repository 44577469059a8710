"""``PTuningPrompt``: the prompt source of a P-tuning adapter, in its training or inference form.

Training form: a :class:`PromptEncoder` computes the virtual tokens on each
forward that prepends them. Inference form: the encoder's output stored as
plain embeddings (:class:`PromptEmbeddings`), so inference needs no encoder.

Saved tensors: ``prompt_embeddings`` (the encoder output, P x H) always, plus
``encoder.<name>`` for each encoder weight when ``training=True``. Loading
either form works: with encoder weights the encoder is restored (a resumable
checkpoint); with ``prompt_embeddings`` alone the encoder is dropped and the
embeddings are used as they are; they then train directly, as in prompt
tuning, if the adapter is loaded trainable.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from peftkit_plugins.p_tuning.encoder import PromptEncoder
from peftkit_plugins.prompt_tuning.prompt import PROMPT_KEY, PromptEmbeddings

__all__ = ["PTuningPrompt", "ENCODER_PREFIX"]

ENCODER_PREFIX = "encoder."


class PTuningPrompt(nn.Module):
    """Either ``encoder`` (a :class:`PromptEncoder`) or ``fixed`` (a :class:`PromptEmbeddings`) is set."""

    def __init__(self, encoder: PromptEncoder):
        super().__init__()
        self.encoder: PromptEncoder | None = encoder
        self.fixed: PromptEmbeddings | None = None

    @property
    def num_virtual_tokens(self) -> int:
        source = self.encoder if self.encoder is not None else self.fixed
        return source.num_virtual_tokens

    def forward(self) -> torch.Tensor:
        if self.encoder is not None:
            return self.encoder()  # (P, H)
        return self.fixed()  # (P, H)

    def virtual_tokens(self) -> torch.Tensor:
        """The virtual tokens as inference uses them (encoder in eval mode, no graph), ``(P, H)``."""
        if self.encoder is None:
            return self.fixed.prompt_embeddings.detach()
        was_training = self.encoder.training
        self.encoder.eval()
        try:
            with torch.no_grad():
                return self.encoder().detach()
        finally:
            self.encoder.train(was_training)

    def prompt_state_dict(self, *, training: bool) -> dict[str, torch.Tensor]:
        state = {PROMPT_KEY: self.virtual_tokens()}
        if training and self.encoder is not None:
            state.update({ENCODER_PREFIX + k: v.detach() for k, v in self.encoder.state_dict().items()})
        return state

    def load_prompt_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        encoder_state = {k[len(ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
        unexpected = sorted(k for k in state if k != PROMPT_KEY and not k.startswith(ENCODER_PREFIX))
        if unexpected:
            raise KeyError(f"unexpected tensors {unexpected[:5]}; expected {PROMPT_KEY!r} and optionally 'encoder.*'")
        if encoder_state:
            if self.encoder is None:
                raise KeyError("this P-tuning adapter holds fixed embeddings and no encoder to load encoder weights into")
            with torch.no_grad():
                self.encoder.load_state_dict(encoder_state, strict=True)
            return  # prompt_embeddings, if present, is the encoder's output: derived, not loaded
        if PROMPT_KEY not in state:
            raise KeyError(f"expected {PROMPT_KEY!r} (inference form) or 'encoder.*' tensors (training form), got none")
        tensor = state[PROMPT_KEY]
        expected = (self.num_virtual_tokens, self._token_dim())
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{PROMPT_KEY} has shape {tuple(tensor.shape)}, expected {expected}")
        reference = next(iter(self.parameters()))
        fixed = PromptEmbeddings(tensor.to(device=reference.device, dtype=reference.dtype))
        # Keep the trainable flag the core set on the encoder (load(is_trainable=...)).
        fixed.prompt_embeddings.requires_grad_(reference.requires_grad)
        self.fixed, self.encoder = fixed, None

    def _token_dim(self) -> int:
        if self.encoder is not None:
            return int(self.encoder.embedding.embedding_dim)
        return int(self.fixed.prompt_embeddings.shape[1])
