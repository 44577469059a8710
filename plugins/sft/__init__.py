"""Built-in plugin ``sft``: supervised fine-tuning on prompt/response pairs and chat conversations.

Registers the :class:`~peftkit_plugins.sft.objective.SftObjective` through
``peftkit_register_objectives``. Targets are the assistant replies only, the
end-of-turn token included (see :mod:`peftkit_plugins.sft.tokenize`); an
optional auxiliary LM loss on prompt tokens has weight ``lm_weight``. Packing
is off: each example is its own padded row.
"""

from __future__ import annotations

from typing import Callable

from peftkit.hookspecs import hookimpl
from peftkit_plugins.sft.objective import SftObjective
from peftkit_plugins.sft.options import SftOptions

__all__ = ["SftObjective", "SftOptions"]


@hookimpl
def peftkit_register_objectives(register: Callable[[object], None]) -> None:
    register(SftObjective())
