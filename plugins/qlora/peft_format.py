"""QLoRA -> Hugging Face peft: a peft LoRA adapter for the 4-bit base (export only).

peft has no QLoRA type: a QLoRA adapter *is* a LoRA adapter whose base model is
loaded in 4-bit (``BitsAndBytesConfig(load_in_4bit=True, ...)``), so export
writes ``peft_type: LORA`` with LoRA's fields and tensors. peft's own adapter
config has no field for the base's quantization; peft records it in the
adapter's model card (``README.md``, "The following `bitsandbytes` quantization
config was used during training:"), and so does this export, from the qlora
options. Import of a peft LoRA adapter is ``lora``'s (load it onto a 4-bit base
to get the QLoRA model back): ``exports_only`` keeps ``LORA`` imports with it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftkit_plugins.lora.peft_format import ACCEPTED_FIELDS, LoraPeftFormat
from peftkit_plugins.qlora.loading import bnb_config
from peftkit_plugins.qlora.options import QLoraOptions

__all__ = ["QLoraPeftFormat", "QUANTIZATION_PREFIX"]

#: The line peft's model card puts before the quantization settings.
QUANTIZATION_PREFIX = "The following `bitsandbytes` quantization config was used during training:"


class QLoraPeftFormat:
    peft_type = "LORA"
    exports_only = True
    accepted_fields = ACCEPTED_FIELDS

    def to_peft(self, options: QLoraOptions, tensors: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        # GPT-2's Conv1D targets are (out x in) 4-bit Linears by now, as transformers' 4-bit loading makes them:
        # LoRA's converter then writes fan_in_fan_out false, as peft expects on such a base.
        return LoraPeftFormat().to_peft(options, tensors, model)

    def from_peft(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return LoraPeftFormat().from_peft(config, tensors)

    def model_card(self, options: QLoraOptions) -> str:
        """peft's model-card section naming the 4-bit quantization of the base these weights were trained on."""
        settings = bnb_config(options).to_dict()
        lines = "\n".join(f"- {name}: {value}" for name, value in settings.items())
        return f"---\nlibrary_name: peft\n---\n\n## Training procedure\n\n{QUANTIZATION_PREFIX}\n{lines}\n"
