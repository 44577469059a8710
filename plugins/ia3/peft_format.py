"""(IA)^3 <-> Hugging Face peft (``peft_type: IA3``): the same vectors under peft's key prefix.

A vector of shape ``(1, in)`` rescales its layer's input (a feed-forward
module), ``(out, 1)`` its output, in both libraries.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftkit.errors import AdapterFormatError
from peftkit.interop import ANY_VALUE, PEFT_PREFIX, PeftField, one_of
from peftkit.targeting import innermost_base
from peftkit_plugins.ia3.options import IA3Options

__all__ = ["IA3PeftFormat", "ACCEPTED_FIELDS"]

#: The peft IA3 config fields import reads (any other field must be null/false/empty): the vectors' shapes say
#: which modules are feed-forward, and the saved vectors replace whatever init_ia3_weights chose.
ACCEPTED_FIELDS: dict[str, PeftField] = {
    "task_type": one_of(None, "CAUSAL_LM", "FEATURE_EXTRACTION", "SEQ_CLS", "TOKEN_CLS"),
    "target_modules": ANY_VALUE,
    "feedforward_modules": ANY_VALUE,
    "exclude_modules": ANY_VALUE,
    "fan_in_fan_out": PeftField(lambda v: isinstance(v, bool), "true or false"),
    "init_ia3_weights": PeftField(lambda v: isinstance(v, bool), "true or false"),
}

_SUFFIX = ".ia3_l"


def _split(tensors: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    modules = sorted(k[: -len(_SUFFIX)] for k in tensors)
    feedforward = sorted(k[: -len(_SUFFIX)] for k, v in tensors.items() if v.dim() == 2 and v.shape[0] == 1 and v.shape[1] > 1)
    return modules, feedforward


class IA3PeftFormat:
    peft_type = "IA3"
    accepted_fields = ACCEPTED_FIELDS

    def to_peft(self, options: IA3Options, tensors: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        modules, feedforward = _split(tensors)
        conv1d = any(type(innermost_base(model.get_submodule(m))).__name__ == "Conv1D" for m in modules)
        fields = {
            "target_modules": modules,  # exact module names: peft targets exactly what peftkit did
            "feedforward_modules": feedforward,
            "fan_in_fan_out": conv1d,
            "init_ia3_weights": True,
        }
        return fields, {PEFT_PREFIX + k: v for k, v in tensors.items()}

    def from_peft(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        state = {}
        for key, value in tensors.items():
            if not key.startswith(PEFT_PREFIX) or not key.endswith(_SUFFIX):
                raise AdapterFormatError(f"unexpected tensor {key!r} in a peft IA3 adapter (expected {PEFT_PREFIX}<module>{_SUFFIX})")
            state[key[len(PEFT_PREFIX):]] = value
        modules, feedforward = _split(state)
        return {"target_modules": modules, "feedforward_modules": feedforward}, state
