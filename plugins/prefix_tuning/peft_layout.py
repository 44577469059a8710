"""Conversion between peftkit's prefix layout and Hugging Face ``peft``'s saved ``prompt_embeddings``.

peftkit keeps the prefixes as one ``(L, 2, H_kv, P, D)`` tensor (layer,
key/value, key/value head, virtual token, head dim). peft saves prefix tuning
as ``prompt_embeddings`` of shape ``(P, L * 2 * H_kv * D)`` (its
``token_dim`` is ``H_kv * D`` under grouped-query attention), whose last axis
is laid out ``((layer * 2 + kv) * H_kv + head) * D + d``. The same layout is
the output of the projection MLP in both libraries, so its weights
(``embedding``, ``transform.0.*``, ``transform.2.*``) copy over unchanged.
"""

from __future__ import annotations

import torch

from peftkit_plugins.prefix_tuning.backbone import KVGeometry

__all__ = ["to_peft_prompt_embeddings", "from_peft_prompt_embeddings"]


def to_peft_prompt_embeddings(prefix: torch.Tensor) -> torch.Tensor:
    """``(L, 2, H_kv, P, D)`` prefixes -> peft's ``(P, L * 2 * H_kv * D)`` ``prompt_embeddings``."""
    layers, two, heads, tokens, head_dim = prefix.shape
    return prefix.permute(3, 0, 1, 2, 4).reshape(tokens, layers * two * heads * head_dim)


def from_peft_prompt_embeddings(embeddings: torch.Tensor, geometry: KVGeometry) -> torch.Tensor:
    """peft's ``(P, L * 2 * H_kv * D)`` ``prompt_embeddings`` -> ``(L, 2, H_kv, P, D)`` prefixes.

    :raises ValueError: if the width does not match ``geometry``.
    """
    tokens, width = embeddings.shape
    expected = geometry.num_layers * 2 * geometry.width
    if width != expected:
        raise ValueError(
            f"prompt_embeddings have width {width}, this model needs {expected} "
            f"(= {geometry.num_layers} layers x 2 x {geometry.num_kv_heads} kv heads x {geometry.head_dim})"
        )
    shaped = embeddings.reshape(tokens, geometry.num_layers, 2, geometry.num_kv_heads, geometry.head_dim)
    return shaped.permute(1, 2, 3, 0, 4).contiguous()
