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

from peftkit.interop import ANY_VALUE, PeftField
from peftkit_plugins.prefix_tuning.backbone import KVGeometry
from peftkit_plugins.prompt_tuning.peft_format import VIRTUAL_TOKEN_FIELDS

__all__ = ["to_peft_prompt_embeddings", "from_peft_prompt_embeddings", "ACCEPTED_FIELDS"]

#: The peft prefix-tuning config fields import reads (any other field must be null/false/empty). peft saves the
#: projected (folded) prefixes with or without prefix_projection, so the projection settings do not matter.
ACCEPTED_FIELDS: dict[str, PeftField] = {
    **VIRTUAL_TOKEN_FIELDS,
    "prefix_projection": PeftField(lambda v: isinstance(v, bool), "true or false"),
    "encoder_hidden_size": ANY_VALUE,
    "init_weights": ANY_VALUE,
}


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


class PrefixTuningPeftFormat:
    """Prefix tuning <-> Hugging Face peft (``peft_type: PREFIX_TUNING``), folded form both ways.

    peft keeps the KV-head geometry in its config (``num_layers``, and under GQA
    ``num_attention_heads = H_kv``, ``token_dim = H_kv * D``), which is what
    :func:`from_peft_prompt_embeddings` needs.
    """

    peft_type = "PREFIX_TUNING"
    accepted_fields = ACCEPTED_FIELDS

    def to_peft(self, options, tensors: dict[str, torch.Tensor], model) -> tuple[dict, dict[str, torch.Tensor]]:
        prefix = tensors["attached.prefix"]  # (L, 2, H_kv, P, D)
        layers, _, heads, tokens, head_dim = prefix.shape
        fields = {
            "num_virtual_tokens": int(tokens),
            "num_layers": int(layers),
            "num_attention_heads": int(heads),
            "token_dim": int(heads * head_dim),
            "num_transformer_submodules": 1,
            "prefix_projection": False,  # exported folded: inference needs no MLP
            "encoder_hidden_size": int(heads * head_dim),
        }
        return fields, {"prompt_embeddings": to_peft_prompt_embeddings(prefix)}

    def from_peft(self, config: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
        from peftkit.errors import AdapterFormatError

        if set(tensors) != {"prompt_embeddings"}:
            raise AdapterFormatError(f"a peft prefix-tuning adapter holds only 'prompt_embeddings'; found {sorted(tensors)}")
        missing = [k for k in ("num_layers", "num_attention_heads", "token_dim") if not isinstance(config.get(k), int)]
        if missing:
            raise AdapterFormatError(f"the peft prefix-tuning config lacks {missing}, needed to lay out the prefixes")
        heads = config["num_attention_heads"]
        geometry = KVGeometry(config["num_layers"], heads, config["token_dim"] // heads)
        try:
            prefix = from_peft_prompt_embeddings(tensors["prompt_embeddings"], geometry)
        except ValueError as exc:
            raise AdapterFormatError(str(exc)) from None
        options = {"num_virtual_tokens": int(prefix.shape[3]), "projection": False, "init": "random"}
        return options, {"attached.prefix": prefix}
