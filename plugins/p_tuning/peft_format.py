"""P-tuning <-> Hugging Face peft (``peft_type: P_TUNING``), in the inference form.

Both libraries save the encoder's *output* (``prompt_embeddings``, P x H) as the
adapter, and peft in inference mode uses it directly; so export and import
move that tensor and the encoder settings, and an imported adapter runs
without its encoder (as any peftkit inference-form P-tuning adapter does).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftkit.errors import AdapterFormatError
from peftkit.interop import PeftField
from peftkit_plugins.prompt_tuning.peft_format import OURS, THEIRS, VIRTUAL_TOKEN_FIELDS, virtual_token_fields

__all__ = ["PTuningPeftFormat", "ACCEPTED_FIELDS"]

#: The peft P-tuning config fields import reads (any other field must be null/false/empty). The encoder
#: settings are kept for further training; the saved prompt is the encoder's output, used as it is.
ACCEPTED_FIELDS: dict[str, PeftField] = {
    **VIRTUAL_TOKEN_FIELDS,
    "encoder_reparameterization_type": PeftField(lambda v: str(v).upper() in ("MLP", "LSTM"), "'MLP' or 'LSTM'"),
    "encoder_hidden_size": VIRTUAL_TOKEN_FIELDS["num_layers"],
    "encoder_num_layers": VIRTUAL_TOKEN_FIELDS["num_layers"],
    "encoder_dropout": PeftField(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
}


class PTuningPeftFormat:
    peft_type = "P_TUNING"
    accepted_fields = ACCEPTED_FIELDS

    def to_peft(self, options: Any, tensors: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        prompt = tensors[OURS]
        fields = {
            **virtual_token_fields(prompt, model),
            "encoder_reparameterization_type": options.encoder.upper(),
            "encoder_hidden_size": options.encoder_hidden_size or int(prompt.shape[1]),
            "encoder_num_layers": options.encoder_num_layers,
            "encoder_dropout": options.encoder_dropout,
        }
        return fields, {THEIRS: prompt}

    def from_peft(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        if set(tensors) != {THEIRS}:
            raise AdapterFormatError(f"a peft P-tuning adapter file holds only {THEIRS!r}; found {sorted(tensors)}")
        encoder = str(config.get("encoder_reparameterization_type", "MLP")).lower()
        if encoder not in ("mlp", "lstm"):
            raise AdapterFormatError(f"encoder_reparameterization_type={encoder!r}: peftkit's p_tuning has 'mlp' and 'lstm'")
        prompt = tensors[THEIRS]
        options = {
            "num_virtual_tokens": int(prompt.shape[0]),
            "encoder": encoder,
            "encoder_hidden_size": config.get("encoder_hidden_size"),
            "encoder_num_layers": int(config.get("encoder_num_layers", 2)),
            "encoder_dropout": float(config.get("encoder_dropout", 0.0)),
        }
        return options, {OURS: prompt}
