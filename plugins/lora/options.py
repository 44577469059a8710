"""Options of the ``lora`` method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class LoraOptions:
    """LoRA options.

    Attributes:
        r: rank of the update ``B @ A``.
        alpha: scaling numerator: the update is multiplied by ``alpha / r``
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
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"option 'dropout' = {self.dropout!r} must be in [0, 1)")
        if isinstance(self.target_modules, list) and not self.target_modules:
            problems.append("option 'target_modules' = [] is empty; name at least one module or use 'all-linear'")
        return problems

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r**0.5 if self.use_rslora else self.r)
