"""Options of the ``p_tuning`` method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: Most virtual tokens: each one is prepended to every input, and 65536 is past any context window
#: a PEFT run trains with (the paper's best settings use 5-100).
MAX_VIRTUAL_TOKENS = 65536
#: Widest encoder and deepest LSTM: past any model's hidden size, and 16x the paper's 2 layers.
MAX_ENCODER_HIDDEN_SIZE = 65536
MAX_ENCODER_LAYERS = 32

__all__ = ["PTuningOptions"]


@dataclass
class PTuningOptions:
    """P-tuning options.

    Attributes:
        num_virtual_tokens: ``P``, the number of virtual tokens prepended to every input.
        encoder: the prompt encoder: ``"mlp"`` (3 linear layers with ReLU, as Hugging Face
            ``peft`` recommends) or ``"lstm"`` (the paper's bidirectional LSTM, then a 2-layer MLP).
        encoder_hidden_size: hidden width of the encoder (``None``: the model's hidden size).
        encoder_num_layers: LSTM layers (``encoder="lstm"`` only).
        encoder_dropout: dropout between LSTM layers (``encoder="lstm"`` only; needs
            ``encoder_num_layers >= 2``).
    """

    num_virtual_tokens: int = 20
    encoder: Literal["mlp", "lstm"] = "mlp"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def validate(self) -> list[str]:
        problems = []
        if self.num_virtual_tokens < 1:
            problems.append(f"option 'num_virtual_tokens' = {self.num_virtual_tokens!r} must be >= 1")
        if self.num_virtual_tokens > MAX_VIRTUAL_TOKENS:
            problems.append(
                f"option 'num_virtual_tokens' = {self.num_virtual_tokens!r} is too large: must be <= {MAX_VIRTUAL_TOKENS} "
                "(every input gets that many tokens more)"
            )
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            problems.append(f"option 'encoder_hidden_size' = {self.encoder_hidden_size!r} must be >= 1 (or None)")
        if self.encoder_num_layers < 1:
            problems.append(f"option 'encoder_num_layers' = {self.encoder_num_layers!r} must be >= 1")
        if self.encoder_num_layers > MAX_ENCODER_LAYERS:
            problems.append(f"option 'encoder_num_layers' = {self.encoder_num_layers!r} is too large: must be <= {MAX_ENCODER_LAYERS}")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size > MAX_ENCODER_HIDDEN_SIZE:
            problems.append(
                f"option 'encoder_hidden_size' = {self.encoder_hidden_size!r} is too large: must be <= {MAX_ENCODER_HIDDEN_SIZE} (or None)"
            )
        if not 0.0 <= self.encoder_dropout < 1.0:
            problems.append(f"option 'encoder_dropout' = {self.encoder_dropout!r} must be in [0, 1)")
        if self.encoder == "mlp":
            for name, default in (("encoder_num_layers", 2), ("encoder_dropout", 0.0)):
                if getattr(self, name) != default:
                    problems.append(
                        f"option {name!r} = {getattr(self, name)!r} only applies to encoder='lstm' (the MLP encoder "
                        "has a fixed 3 layers and no dropout); remove it or set encoder='lstm'"
                    )
        elif self.encoder_dropout > 0 and self.encoder_num_layers < 2:
            problems.append(
                f"option 'encoder_dropout' = {self.encoder_dropout!r} acts between LSTM layers but "
                f"encoder_num_layers = {self.encoder_num_layers}; use encoder_num_layers >= 2 or encoder_dropout=0"
            )
        return problems
