"""Options of the ``ia3`` method."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["IA3Options"]


@dataclass
class IA3Options:
    """(IA)^3 options.

    Attributes:
        target_modules: the layers to rescale: module-name suffixes, a full-match
            regex, or ``"all-linear"``. ``None``: the architecture's default
            (Llama-style ``k_proj``, ``v_proj``, ``down_proj``; GPT-2-style
            ``c_attn``, ``mlp.c_proj``; see ``IA3_LAYOUTS``).
        feedforward_modules: which targets have their *input* rescaled (the
            feed-forward down-projection, so the vector rescales the FFN
            activations); every other target has its *output* rescaled. It must
            select a subset of the targets. ``None``: the architecture's default
            feed-forward modules (none for an architecture outside the table);
            ``[]``: rescale every target's output.
        layers: restrict to these block indices (``None``: all blocks).
    """

    target_modules: str | list[str] | None = None
    feedforward_modules: str | list[str] | None = None
    layers: int | list[int] | None = None

    def validate(self) -> list[str]:
        problems = []
        if isinstance(self.target_modules, list) and not self.target_modules:
            problems.append(
                "option 'target_modules' = [] is empty; name at least one module, or leave it unset for the default"
            )
        return problems
