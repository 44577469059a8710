"""Options of the ``lora`` method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: Largest rank and alpha: past the width of any released model's layers (16384 for Llama-3.1-405B),
#: where a rank stops adding anything but memory, and alpha / r past any published scaling.
MAX_RANK = 65536
MAX_ALPHA = 65536.0


@dataclass
class LoraOptions:
    """LoRA options.

    Attributes:
        r: rank of the update ``B @ A`` (1..MAX_RANK).
        alpha: scaling numerator (0 < alpha <= MAX_ALPHA): the update is multiplied by ``alpha / r``
            (``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: dropout probability on the adapter's input (0 disables it).
        target_modules: module-name suffixes, a full-match regex, or ``"all-linear"``.
        layers: restrict to these block indices (``None``: all blocks).
        bias: only ``"none"``: the base biases stay frozen.
        use_rslora: rank-stabilized scaling ``alpha / sqrt(r)`` (Kalajdzievski, 2023).
        init: ``"default"`` (A Kaiming-uniform, B zero) or ``"gaussian"`` (A ~ N(0, 1/r), B zero).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    layers: int | list[int] | None = None
    bias: Literal["none"] = "none"
    use_rslora: bool = False
    init: Literal["default", "gaussian"] = "default"

    def validate(self) -> list[str]:
        problems = []
        if self.r < 1:
            problems.append(f"option 'r' = {self.r!r} must be >= 1")
        if self.alpha <= 0:
            problems.append(f"option 'alpha' = {self.alpha!r} must be > 0")
        if self.r > MAX_RANK:
            problems.append(f"option 'r' = {self.r!r} is too large: must be <= {MAX_RANK} (wider than any model's layers)")
        if self.alpha > MAX_ALPHA:
            problems.append(f"option 'alpha' = {self.alpha!r} is too large: must be <= {MAX_ALPHA:g} (alpha / r scales the update)")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"option 'dropout' = {self.dropout!r} must be in [0, 1)")
        if isinstance(self.target_modules, list) and not self.target_modules:
            problems.append("option 'target_modules' = [] is empty; name at least one module or use 'all-linear'")
        return problems

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r**0.5 if self.use_rslora else self.r)
