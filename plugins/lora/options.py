"""Options of the ``lora`` method."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Literal

from peftkit.targeting import pattern_key

__all__ = ["LoraOptions", "MAX_RANK", "MAX_ALPHA"]

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
        use_dora: DoRA (Liu et al., 2024): a trainable magnitude per output feature rescales the
            column-normalised ``W + scale B A`` (see :mod:`peftkit_plugins.lora.layer`).
        rank_pattern: per-module ranks overriding ``r``: key (a module-name suffix or a regex) -> rank.
            A key applies to a module whose name it matches at the end after a ``.`` (peft's
            ``get_pattern_key``: ``re.match(rf"(.*\\.)?({key})$", name)``); the first matching key wins.
        alpha_pattern: per-module alphas overriding ``alpha``, matched like ``rank_pattern``.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    layers: int | list[int] | None = None
    bias: Literal["none"] = "none"
    use_rslora: bool = False
    init: Literal["default", "gaussian"] = "default"
    use_dora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

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
        for option, pattern, low, high in (("rank_pattern", self.rank_pattern, 1, MAX_RANK), ("alpha_pattern", self.alpha_pattern, 0, MAX_ALPHA)):
            for key, value in pattern.items():
                try:
                    re.compile(key)
                except re.error as exc:
                    problems.append(f"option '{option}' key {key!r} is not a valid regular expression ({exc}); use a module-name suffix such as 'q_proj'")
                if not (low <= value <= high if option == "rank_pattern" else low < value <= high):
                    bound = f"in 1..{MAX_RANK}" if option == "rank_pattern" else f"in (0, {MAX_ALPHA:g}]"
                    problems.append(f"option '{option}' = {{{key!r}: {value!r}}}: the value must be {bound}")
        return problems

    def for_module(self, name: str) -> "LoraOptions":
        """These options with ``r`` and ``alpha`` of the module called ``name`` (``rank_pattern``/``alpha_pattern`` applied)."""
        r_key, alpha_key = pattern_key(self.rank_pattern, name), pattern_key(self.alpha_pattern, name)
        r = self.rank_pattern[r_key] if r_key is not None else self.r
        alpha = self.alpha_pattern[alpha_key] if alpha_key is not None else self.alpha
        return dataclasses.replace(self, r=r, alpha=alpha) if (r, alpha) != (self.r, self.alpha) else self

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r**0.5 if self.use_rslora else self.r)
