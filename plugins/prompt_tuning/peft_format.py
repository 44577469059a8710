"""Prompt tuning <-> Hugging Face peft (``peft_type: PROMPT_TUNING``).

The virtual-token embeddings are the whole adapter in both libraries
(peft ``prompt_embeddings`` = peftkit ``attached.prompt_embeddings``, P x H).
Exports declare ``prompt_tuning_init: RANDOM`` so that peft never needs a
tokenizer (or the hub) to rebuild the module the saved weights then overwrite.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftkit.errors import AdapterFormatError
from peftkit.interop import ANY_VALUE, PeftField, one_of

__all__ = ["PromptTuningPeftFormat", "virtual_token_fields", "VIRTUAL_TOKEN_FIELDS", "ACCEPTED_FIELDS"]

_INT = PeftField(lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)), "an integer")

#: Fields every peft prompt-learning config has; the saved tensor's shape is what import reads.
VIRTUAL_TOKEN_FIELDS: dict[str, PeftField] = {
    # Other task types change what peft's forward does with the virtual tokens (classification, seq2seq).
    "task_type": one_of("CAUSAL_LM", fix="peftkit's prompt-side methods run decoder-only causal LMs"),
    "num_virtual_tokens": _INT,
    "token_dim": _INT,
    "num_transformer_submodules": one_of(1, None, fix="peftkit's prompt-side methods support decoder-only models (1)"),
    "num_attention_heads": _INT,
    "num_layers": _INT,
}

#: The peft prompt-tuning config fields import reads (any other field must be null/false/empty).
ACCEPTED_FIELDS: dict[str, PeftField] = {
    **VIRTUAL_TOKEN_FIELDS,
    # How peft chose the starting embeddings; the saved embeddings replace them.
    "prompt_tuning_init": ANY_VALUE,
    "prompt_tuning_init_text": ANY_VALUE,
    "tokenizer_name_or_path": ANY_VALUE,
    "tokenizer_kwargs": ANY_VALUE,
}

OURS, THEIRS = "attached.prompt_embeddings", "prompt_embeddings"


def virtual_token_fields(prompt: torch.Tensor, model: nn.Module) -> dict[str, Any]:
    """peft config fields shared by its prompt-learning methods, for a P x H prompt on ``model``."""
    config = model.config
    return {
        "num_virtual_tokens": int(prompt.shape[0]),
        "token_dim": int(prompt.shape[1]),
        "num_transformer_submodules": 1,
        "num_attention_heads": getattr(config, "num_attention_heads", None),
        "num_layers": getattr(config, "num_hidden_layers", None),
    }


class PromptTuningPeftFormat:
    peft_type = "PROMPT_TUNING"
    accepted_fields = ACCEPTED_FIELDS

    def to_peft(self, options: Any, tensors: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        prompt = tensors[OURS]
        fields = {
            **virtual_token_fields(prompt, model),
            "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": None,
            "tokenizer_name_or_path": None,
        }
        return fields, {THEIRS: prompt}

    def from_peft(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        if set(tensors) != {THEIRS}:
            raise AdapterFormatError(f"a peft prompt-tuning adapter holds only {THEIRS!r}; found {sorted(tensors)}")
        if config.get("num_transformer_submodules", 1) != 1:
            raise AdapterFormatError(
                f"num_transformer_submodules={config['num_transformer_submodules']!r}: peftkit's prompt_tuning "
                "supports decoder-only models (1)"
            )
        prompt = tensors[THEIRS]
        return {"num_virtual_tokens": int(prompt.shape[0]), "init": "random"}, {OURS: prompt}
