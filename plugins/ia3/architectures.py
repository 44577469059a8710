"""Default (IA)^3 targets per architecture family, as module-name suffixes.

The layout of a model is detected from its module names (see
:func:`peftkit_plugins.adapter.architectures.detect_layout`), so any model built
like Llama or GPT-2 is recognised. The defaults are those of the paper and of
Hugging Face ``peft``: rescale the keys and the values (outputs of the key and
value projections) and the feed-forward activations (input of the feed-forward
down-projection).

GPT-2 computes queries, keys and values with one fused ``c_attn`` layer, so its
vector rescales the queries too (3 x hidden entries); ``peft`` does the same,
which keeps the two interchangeable. Rescaling the queries is one more
diagonal degree of freedom, not a different method.
"""

from __future__ import annotations

__all__ = ["IA3_LAYOUTS"]

IA3_LAYOUTS: dict[str, dict[str, list[str]]] = {
    "llama": {
        "target_modules": ["self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"],
        "feedforward_modules": ["mlp.down_proj"],
    },
    "gpt2": {
        "target_modules": ["attn.c_attn", "mlp.c_proj"],
        "feedforward_modules": ["mlp.c_proj"],
    },
}
