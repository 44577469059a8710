"""LoRA <-> Hugging Face peft (``peft_type: LORA``): option names and tensor names.

Tensors keep their names apart from peft's ``base_model.model.`` prefix
(``<module>.lora_A.weight``, ``<module>.lora_B.weight``); the update is the same
``(alpha / r) B A`` (``alpha / sqrt(r)`` with rsLoRA) in both libraries.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftkit.errors import AdapterFormatError
from peftkit.interop import PEFT_PREFIX
from peftkit.targeting import innermost_base
from peftkit_plugins.lora.options import LoraOptions

__all__ = ["LoraPeftFormat"]

# peft features with no peftkit LoRA equivalent: field -> value meaning "not used".
_UNSUPPORTED = {
    "use_dora": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "modules_to_save": None,
    "layer_replication": None,
    "lora_bias": False,
    "target_parameters": None,
    "exclude_modules": None,
}


class LoraPeftFormat:
    peft_type = "LORA"

    def to_peft(self, options: LoraOptions, tensors: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        modules = {k.rsplit(".", 2)[0] for k in tensors}
        conv1d = any(type(innermost_base(model.get_submodule(m))).__name__ == "Conv1D" for m in modules)
        fields = {
            "r": options.r,
            "lora_alpha": options.alpha,
            "lora_dropout": options.dropout,
            # The exact modules, so peft targets exactly what peftkit did.
            "target_modules": sorted(modules),
            "bias": "none",
            "use_rslora": options.use_rslora,
            "init_lora_weights": True if options.init == "default" else "gaussian",
            "fan_in_fan_out": conv1d,
        }
        return fields, {PEFT_PREFIX + k: v for k, v in tensors.items()}

    def from_peft(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        problems = [
            f"{field}={config[field]!r}" for field, unused in _UNSUPPORTED.items() if config.get(field, unused) not in (unused, None, {}, False)
        ]
        if config.get("bias", "none") != "none":
            problems.append(f"bias={config['bias']!r}")
        if problems:
            raise AdapterFormatError(
                f"this peft LoRA adapter uses features peftkit's lora does not have: {', '.join(problems)}"
            )
        init = config.get("init_lora_weights", True)
        prefix_free = {}
        for key, value in tensors.items():
            if not key.startswith(PEFT_PREFIX):
                raise AdapterFormatError(f"unexpected tensor {key!r} in a peft LoRA adapter (expected {PEFT_PREFIX}...)")
            prefix_free[key[len(PEFT_PREFIX):]] = value
        a_weights = {k: v for k, v in prefix_free.items() if k.endswith(".lora_A.weight")}
        if not a_weights:
            raise AdapterFormatError("the peft LoRA adapter holds no lora_A weights")
        options = {
            "r": int(config.get("r", 8)),
            "alpha": float(config.get("lora_alpha", 8)),
            "dropout": float(config.get("lora_dropout", 0.0)),
            # Target exactly the modules the weights are for.
            "target_modules": sorted(k[: -len(".lora_A.weight")] for k in a_weights),
            "use_rslora": bool(config.get("use_rslora", False)),
            "init": "gaussian" if init == "gaussian" else "default",
        }
        return options, prefix_free
