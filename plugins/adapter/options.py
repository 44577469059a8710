"""Options of the ``adapter`` method (bottleneck adapters)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from peftkit_plugins.adapter.architectures import ROLES

__all__ = ["AdapterOptions", "DEFAULT_REDUCTION_FACTOR"]

# AdapterHub's default for both the Houlsby and the Pfeiffer configurations.
DEFAULT_REDUCTION_FACTOR = 16.0
# Widest bottleneck: past the width of any released model's layers (16384 for Llama-3.1-405B).
MAX_BOTTLENECK_SIZE = 65536


@dataclass
class AdapterOptions:
    """Bottleneck adapter options.

    The bottleneck width is set by *exactly one* of ``bottleneck_size`` and
    ``reduction_factor``; giving both is an error, giving neither means
    ``reduction_factor=16``.

    Attributes:
        bottleneck_size: width ``m`` of the bottleneck (the same in every adapted layer; 1..MAX_BOTTLENECK_SIZE).
        reduction_factor: ``hidden / m``; the width is ``max(1, floor(hidden / reduction_factor))``
            where ``hidden`` is the output width of each adapted layer.
        nonlinearity: the activation ``f`` between the down- and up-projection.
        placement: ``"houlsby"``: after the attention output projection and after
            the feed-forward output (Houlsby et al., 2019); ``"pfeiffer"``: after the
            feed-forward output only (Pfeiffer et al., 2020).
        target_modules: override of the per-architecture defaults, for models the
            default table does not know: ``{"attention": spec, "feedforward": spec}``
            where each spec is a list of module-name suffixes or a full-match regex.
            ``placement`` still decides which roles are used ("pfeiffer" needs only
            ``"feedforward"``).
        layers: restrict to these block indices (``None``: all blocks).
    """

    bottleneck_size: int | None = None
    reduction_factor: float | None = None
    nonlinearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    placement: Literal["houlsby", "pfeiffer"] = "houlsby"
    target_modules: dict[str, str | list[str]] | None = None
    layers: int | list[int] | None = None

    def validate(self) -> list[str]:
        problems = []
        if self.bottleneck_size is not None and self.reduction_factor is not None:
            problems.append(
                f"options 'bottleneck_size' = {self.bottleneck_size!r} and 'reduction_factor' = "
                f"{self.reduction_factor!r} both set the bottleneck width; give only one"
            )
        if self.bottleneck_size is not None and self.bottleneck_size < 1:
            problems.append(f"option 'bottleneck_size' = {self.bottleneck_size!r} must be >= 1")
        if self.bottleneck_size is not None and self.bottleneck_size > MAX_BOTTLENECK_SIZE:
            problems.append(
                f"option 'bottleneck_size' = {self.bottleneck_size!r} is too large: must be <= {MAX_BOTTLENECK_SIZE} "
                "(wider than any model's layers); use reduction_factor for a width relative to the layer"
            )
        if self.reduction_factor is not None and not self.reduction_factor > 0:
            problems.append(f"option 'reduction_factor' = {self.reduction_factor!r} must be > 0")
        if self.target_modules is not None:
            unknown = sorted(set(self.target_modules) - set(ROLES))
            if unknown:
                problems.append(
                    f"option 'target_modules' has unknown role(s) {unknown}; allowed roles: {', '.join(ROLES)}"
                )
            missing = [r for r in self.roles if r not in self.target_modules]
            if missing:
                problems.append(
                    f"option 'target_modules' = {self.target_modules!r} lacks role(s) {missing} "
                    f"needed by placement {self.placement!r}"
                )
            empty = [r for r, spec in self.target_modules.items() if isinstance(spec, list) and not spec]
            if empty:
                problems.append(f"option 'target_modules' has an empty list for role(s) {empty}")
        return problems

    @property
    def roles(self) -> tuple[str, ...]:
        """The roles ``placement`` puts adapters after."""
        return ROLES if self.placement == "houlsby" else ("feedforward",)

    def bottleneck_for(self, hidden: int) -> int:
        """Bottleneck width for a layer whose output has ``hidden`` features."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        factor = self.reduction_factor if self.reduction_factor is not None else DEFAULT_REDUCTION_FACTOR
        return max(1, int(hidden // factor))
