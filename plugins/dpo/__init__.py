"""Built-in plugin ``dpo``: direct preference optimisation (Rafailov et al., 2023) with any PEFT method.

    L = -log sigmoid(beta * ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))))

with log-probabilities summed over each response's tokens, ``pi`` the trained
adapter and ``ref`` the frozen SFT adapter (or the bare base) on the same base
model; cDPO label smoothing and the IPO loss are options (:mod:`.loss`). It
reads the reward objective's preference files and runs in the trainer's
ordinary loop (:mod:`.objective`).
"""

from __future__ import annotations

from typing import Callable

from peftkit.hookspecs import hookimpl
from peftkit_plugins.dpo.loss import PreferenceLosses, preference_losses, sequence_logprobs
from peftkit_plugins.dpo.objective import DPOObjective, evaluate_preferences, reference_logprobs, setup_reference
from peftkit_plugins.dpo.options import DPOOptions

__all__ = [
    "DPOObjective",
    "DPOOptions",
    "PreferenceLosses",
    "evaluate_preferences",
    "preference_losses",
    "reference_logprobs",
    "sequence_logprobs",
    "setup_reference",
]


@hookimpl
def peftkit_register_objectives(register: Callable[[object], None]) -> None:
    register(DPOObjective())
