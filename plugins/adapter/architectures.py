"""Where bottleneck adapters go by default: module-name suffixes per architecture family.

A *layout* maps a role (``"attention"``: the attention output projection,
``"feedforward"``: the feed-forward output projection) to the module-name
suffixes that play it. The layout of a model is found from its module names,
not from ``config.model_type``, so every model built like one of the listed
families is recognised without being listed: Mistral, Qwen2, Gemma, ... like
Llama; BART's decoder like OPT; Falcon like BLOOM.
"""

from __future__ import annotations

from typing import Mapping

from torch import nn

__all__ = ["ADAPTER_LAYOUTS", "ROLES", "detect_layout", "has_suffix"]

ROLES = ("attention", "feedforward")

# Suffixes include the parent module's name so that GPT-2's two ``c_proj``
# layers (attention and feed-forward) are told apart.
ADAPTER_LAYOUTS: dict[str, dict[str, list[str]]] = {
    "llama": {"attention": ["self_attn.o_proj"], "feedforward": ["mlp.down_proj"]},
    "gpt2": {"attention": ["attn.c_proj"], "feedforward": ["mlp.c_proj"]},
    "opt": {"attention": ["self_attn.out_proj"], "feedforward": ["fc2"]},
    "gpt_neox": {"attention": ["attention.dense"], "feedforward": ["mlp.dense_4h_to_h"]},
    "bloom": {"attention": ["self_attention.dense"], "feedforward": ["mlp.dense_4h_to_h"]},
}


def has_suffix(name: str, suffix: str) -> bool:
    """Whether module path ``name`` ends with ``suffix`` at a ``.`` boundary (the targeting rule)."""
    return name == suffix or name.endswith("." + suffix)


def detect_layout(model: nn.Module, layouts: Mapping[str, Mapping[str, list[str]]]) -> str | None:
    """The first layout in ``layouts`` all of whose suffixes name a module of ``model``, or ``None``."""
    names = [n for n, _ in model.named_modules() if n]
    for layout, roles in layouts.items():
        suffixes = [s for spec in roles.values() for s in spec]
        if suffixes and all(any(has_suffix(n, s) for n in names) for s in suffixes):
            return layout
    return None
