"""What prefix tuning needs from the base model: its decoder backbone, and the keys/values it caches.

The prefixes' shape is read from the mechanism that uses them: the base
model runs on a few tokens with a ``DynamicCache`` and every cache layer says
how many key/value heads and which head size it stores. So grouped-query
attention (``num_key_value_heads < num_attention_heads``), explicit
``head_dim`` values or odd config names need no per-architecture code.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.compat import CACHE_NAMES, cache_argument
from peftkit.errors import AdapterError

__all__ = ["KVGeometry", "find_backbone", "attention_modules", "cached_keys_values", "input_embedding_weight"]


@dataclass(frozen=True)
class KVGeometry:
    """The shape of what each attention layer caches: ``L`` layers of ``(H_kv, ·, D)`` keys and values."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @property
    def width(self) -> int:
        """Key (or value) width per token and layer, ``H_kv * D``."""
        return self.num_kv_heads * self.head_dim


def find_backbone(model: nn.Module) -> nn.Module:
    """The decoder stack of a transformers model: the module that takes the tokens and ``past_key_values``.

    It is the closest ancestor of all attention modules whose forward takes
    ``past_key_values`` and ``input_ids``/``inputs_embeds``: ``LlamaModel`` in
    ``LlamaForCausalLM``, ``GPT2Model`` in ``GPT2LMHeadModel``, ``OPTDecoder`` in
    ``OPTForCausalLM`` (whose head calls the decoder directly, past ``OPTModel``).
    The same backbone serves every head (causal LM, sequence classification).

    :raises AdapterError: for encoder-decoder models and modules without a KV cache.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise AdapterError(
            f"prefix_tuning needs a transformers model (with a .config), got {type(model).__name__}; "
            "wrap a model loaded with AutoModelForCausalLM or similar"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise AdapterError(
            f"prefix_tuning supports decoder-only models; {type(model).__name__} is an encoder-decoder model"
        )
    paths = [name.split(".") for name, _ in attention_modules(model)]
    if paths:
        common = paths[0]
        for path in paths[1:]:
            shared = 0
            while shared < min(len(common), len(path)) and common[shared] == path[shared]:
                shared += 1
            common = common[:shared]
        for depth in range(len(common), -1, -1):
            candidate = model.get_submodule(".".join(common[:depth]))
            if _takes_tokens_and_cache(candidate):
                return candidate
    backbone = getattr(model, "base_model", model)
    if isinstance(backbone, nn.Module) and _takes_tokens_and_cache(backbone):
        return backbone
    raise AdapterError(
        f"prefix_tuning needs a decoder whose forward takes input_ids and past_key_values; "
        f"found none in {type(model).__name__}"
    )


def _takes_tokens_and_cache(module: nn.Module) -> bool:
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    takes_cache = any(name in parameters for name in CACHE_NAMES)
    return takes_cache and ("input_ids" in parameters or "inputs_embeds" in parameters)


def input_embedding_weight(module: nn.Module) -> torch.Tensor:
    """The input embedding matrix of ``module`` (its first floating-point parameter if it has no getter)."""
    getter = getattr(module, "get_input_embeddings", None)
    try:
        embeddings = getter() if getter is not None else None
    except (NotImplementedError, AttributeError):
        embeddings = None
    if embeddings is not None:
        return embeddings.weight
    return next(p for p in module.parameters() if p.dtype.is_floating_point)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every self-attention module (an ``*Attention`` class with an integer ``layer_idx``)."""
    found = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith("Attention") and isinstance(getattr(module, "layer_idx", None), int):
            found.append((name, module))
    return found


def cached_keys_values(backbone: nn.Module, token_ids: torch.Tensor, config: Any) -> tuple[torch.Tensor, KVGeometry]:
    """Run ``backbone`` on ``token_ids`` and return the keys/values every layer caches for them.

    The backbone runs in eval mode (no dropout) and without gradients, at
    positions ``0 .. P-1``: exactly what a prefix of ``P`` real tokens would
    leave in the cache (keys after RoPE where the model uses it).

    :param token_ids: ``(P,)`` token ids.
    :param config: the model's config (the cache's layer types).
    :returns: ``(L, 2, H_kv, P, D)`` keys (index 0) and values (index 1), and their geometry.
    :raises AdapterError: if the layers cache different shapes (not supported).
    """
    from transformers import DynamicCache

    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            cache = DynamicCache(config=config)
            backbone(input_ids=token_ids.unsqueeze(0), use_cache=True, **{cache_argument(backbone.forward): cache})
    finally:
        backbone.train(was_training)
    per_layer = []
    for layer_idx in range(len(cache)):
        stored_k, stored_v = _stored(cache, layer_idx)
        per_layer.append(torch.stack([stored_k[0], stored_v[0]]))  # (2, H_kv, P, D)
    shapes = {tuple(t.shape) for t in per_layer}
    if len(shapes) != 1 or not per_layer:
        raise AdapterError(
            f"prefix_tuning needs every attention layer of {type(backbone).__name__} to cache keys/values "
            f"of one shape; got per-layer shapes {sorted(shapes)}"
        )
    prefix = torch.stack(per_layer)  # (L, 2, H_kv, P, D)
    if prefix.shape[3] != token_ids.shape[0]:
        raise AdapterError(
            f"{type(backbone).__name__} cached {prefix.shape[3]} of {token_ids.shape[0]} prefix tokens "
            "(a sliding-window or shared-KV layer?); prefix_tuning does not support this model"
        )
    geometry = KVGeometry(num_layers=prefix.shape[0], num_kv_heads=prefix.shape[2], head_dim=prefix.shape[4])
    return prefix, geometry


def _stored(cache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(1, H_kv, P, D)`` keys and values cache layer ``layer_idx`` holds."""
    if cache.get_seq_length(layer_idx) == 0:
        raise AdapterError(
            f"attention layer {layer_idx} cached no keys/values (shared-KV layer?); "
            "prefix_tuning does not support this model"
        )
    keys, values = cache.layers[layer_idx].keys, cache.layers[layer_idx].values
    return keys, values
