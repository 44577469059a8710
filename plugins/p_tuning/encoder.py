"""``PromptEncoder``: the P-tuning reparameterization that turns free vectors into virtual tokens.

Liu et al. (2021), "GPT Understands, Too" (https://arxiv.org/abs/2103.10385),
produce the virtual tokens ``h_1..h_P`` from trainable inputs ``e_1..e_P`` with
a small network instead of training them directly::

    h_i = MLP([LSTM_fwd(e_1..e_i); LSTM_bwd(e_i..e_P)])       # encoder="lstm" (the paper)
    h_i = W3 relu(W2 relu(W1 e_i))                            # encoder="mlp"

The submodule names (``embedding``, ``lstm_head``, ``mlp_head``) and the
initialisation are those of Hugging Face ``peft``'s ``PromptEncoder``, so its
weights map one to one.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PromptEncoder"]


class PromptEncoder(nn.Module):
    """Maps ``P`` trainable input vectors to ``P`` virtual-token embeddings.

    :param num_virtual_tokens: ``P``.
    :param token_dim: ``H``, the model's embedding width (input and output width).
    :param hidden_size: the encoder's hidden width.
    :param kind: ``"mlp"`` or ``"lstm"``.
    :param num_layers: LSTM layers (``"lstm"`` only).
    :param dropout: dropout between LSTM layers (``"lstm"`` only).
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        token_dim: int,
        hidden_size: int,
        kind: str = "mlp",
        num_layers: int = 2,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.kind = kind
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)  # the inputs e_1..e_P, ~ N(0, 1)
        if kind == "lstm":
            self.lstm_head = nn.LSTM(
                input_size=token_dim,
                hidden_size=hidden_size,
                num_layers=num_layers,
                dropout=dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * hidden_size, 2 * hidden_size), nn.ReLU(), nn.Linear(2 * hidden_size, token_dim)
            )
        elif kind == "mlp":
            self.mlp_head = nn.Sequential(
                nn.Linear(token_dim, hidden_size),
                nn.ReLU(),
                nn.Linear(hidden_size, hidden_size),
                nn.ReLU(),
                nn.Linear(hidden_size, token_dim),
            )
        else:
            raise ValueError(f"prompt encoder kind {kind!r} is not 'mlp' or 'lstm'")

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.embedding.num_embeddings)

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight.unsqueeze(0)  # (1, P, H)
        if self.kind == "lstm":
            x = self.lstm_head(x)[0]  # (1, P, 2 * hidden)
        return self.mlp_head(x)[0]  # (P, H)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"
