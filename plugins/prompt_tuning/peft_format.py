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

__all__ = ["PromptTuningPeftFormat", "virtual_token_fields"]

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
