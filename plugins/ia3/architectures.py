"""Default (IA)^3 targets per architecture family, as module-name suffixes.

The layout of a model is detected from its module names (see
:func:`peftkit_plugins.adapter.architectures.detect_layout`), so any model built
like one of the listed families is recognised. The defaults are those of the paper and of
Hugging Face ``peft``: rescale the keys and the values (outputs of the key and
value projections) and the feed-forward activations (input of the feed-forward
down-projection).

GPT-2 computes queries, keys and values with one fused ``c_attn`` layer (GPT-NeoX,
BLOOM and Falcon with ``query_key_value``), so its vector rescales the queries
too (3 x hidden entries); ``peft`` does the same, which keeps the two
interchangeable. Rescaling the queries is one more diagonal degree of freedom,
not a different method.

Where ``peft``'s defaults stray from the paper (OPT: ``q_proj`` and ``k_proj``;
Gemma, Qwen2: ``q_proj`` and ``v_proj``) these follow the paper: keys and values.
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
    "opt": {
        "target_modules": ["self_attn.k_proj", "self_attn.v_proj", "fc2"],
        "feedforward_modules": ["fc2"],
    },
    "gpt_neox": {
        "target_modules": ["attention.query_key_value", "mlp.dense_4h_to_h"],
        "feedforward_modules": ["mlp.dense_4h_to_h"],
    },
    "bloom": {
        "target_modules": ["self_attention.query_key_value", "mlp.dense_4h_to_h"],
        "feedforward_modules": ["mlp.dense_4h_to_h"],
    },
}
