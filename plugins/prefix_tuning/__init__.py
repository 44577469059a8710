"""Prefix tuning: trainable key/value prefixes in every attention layer.

Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation",
https://arxiv.org/abs/2101.00190.

Each attention layer ``l`` attends over ``P`` learned key/value vectors before
the real tokens::

    head_l(x) = softmax(q [K_l^prefix ; K_l(x)]^T / sqrt(D) + mask) [V_l^prefix ; V_l(x)]

with ``K_l^prefix, V_l^prefix`` of shape ``(H_kv, P, D)`` (grouped-query
attention: the key/value head count). During training the prefixes may be
reparameterized as ``W2 tanh(W1 E + b1) + b2`` (``projection=True``), which is
folded into plain prefixes when the adapter is saved for inference.

Semantics (the same as the paper's code and Hugging Face ``peft``): the
prefix is ``P`` virtual tokens at positions ``0 .. P-1`` that the model has
already processed; real tokens follow at positions ``P, P+1, ...``; prefix
keys are used as cached keys, i.e. not rotated again. So a prefix built from
the base model's own keys/values for tokens ``X`` (``init="activations"``,
the default) gives exactly the base model's output on ``X`` followed by the
input, which is why training starts near the base model's loss, and why an
adapter exported to peft's format behaves the same there.

Mechanism, and why: the prefixes enter through the KV cache, prefilled at a
forward pre-hook on the decoder backbone (``kv_cache.py``; a forward hook
takes back a cache the caller did not ask for with ``use_cache=False``). The
backbone is the closest ancestor of the attention modules whose forward takes
tokens and ``past_key_values`` (``backbone.py``), so every head on it (causal
LM, sequence classification for reward models) sees the prefix. The alternatives
were rejected because they depend on internals that change every release:

* extending keys/values inside each attention module (wrapping ``k_proj``, a
  hook on the attention module, or a custom ``ALL_ATTENTION_FUNCTIONS`` entry)
  must also extend the attention mask in each backend's format (additive float,
  boolean, ``None`` + ``is_causal`` for SDPA, which aligns the causal triangle
  top-left and would hide the prefix, flex ``BlockMask``, flash varlen), and
  must re-derive positions;
* peft's way, passing a prefilled cache from the top-level model, needs
  patches to ``prepare_inputs_for_generation`` (cache_position, input slicing).

A prefilled ``DynamicCache`` with a 2-D padding mask is the contract every
transformers decoder honours for ``generate()``: the model builds the causal
mask for whatever backend is configured, derives positions from the cache
length, and repeats key/value heads for GQA. The hook changes only three
public forward arguments (``past_key_values``, a 2-D ``attention_mask``,
``position_ids``) and does not touch ``generate()`` at all: ``generate()``
passes an empty cache on its first step, which is filled in place, and later
steps find the prefix there. Known limits (clear errors): gradient
checkpointing (transformers drops the cache in checkpointed layers), caches
other than ``DynamicCache``, 4-D masks, encoder-decoder models, and
``generate(past_key_values=...)`` restarting from a cache that holds a prefix
(generate counts the prefix as prompt tokens). Not handled: models split over
several devices (the prefixes sit on the input-embedding device). Sliding-window
layers keep the prefix only while it is inside their window, as in peft.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from peftkit.errors import AdapterError
from peftkit.hookspecs import hookimpl
from peftkit.injection import InjectionContext
from peftkit.targeting import innermost_base
from peftkit_plugins.prefix_tuning.backbone import (
    KVGeometry,
    attention_modules,
    cached_keys_values,
    find_backbone,
    input_embedding_weight,
)
from peftkit_plugins.prefix_tuning.layer import MERGE_REFUSAL, PrefixTuningLayer
from peftkit_plugins.prefix_tuning.options import PrefixTuningOptions
from peftkit_plugins.prefix_tuning.peft_layout import (
    PrefixTuningPeftFormat,
    from_peft_prompt_embeddings,
    to_peft_prompt_embeddings,
)

__all__ = [
    "PrefixTuningInjector",
    "PrefixTuningLayer",
    "PrefixTuningOptions",
    "KVGeometry",
    "to_peft_prompt_embeddings",
    "from_peft_prompt_embeddings",
]


def _init_token_ids(model: torch.nn.Module, options: PrefixTuningOptions, device: torch.device) -> torch.Tensor:
    vocab_size = int(model.get_input_embeddings().num_embeddings)
    if options.init_token_ids is None:
        return torch.randint(vocab_size, (options.num_virtual_tokens,)).to(device)
    too_large = [i for i in options.init_token_ids if i >= vocab_size]
    if too_large:
        raise AdapterError(
            f"option 'init_token_ids' holds ids {too_large[:5]} outside the vocabulary of {type(model).__name__} "
            f"(size {vocab_size}); use ids from this model's tokenizer"
        )
    return torch.tensor(options.init_token_ids, dtype=torch.long, device=device)


class PrefixTuningInjector:
    name = "prefix_tuning"
    description = "Prefix tuning: trainable key/value prefixes in every attention layer (Li & Liang, 2021)"
    options = PrefixTuningOptions
    supports_merge = False
    recommended_lr = 1e-2  # train.lr: auto; per-layer key/value prefixes of activation magnitude
    merge_refusal = MERGE_REFUSAL
    peft_format = PrefixTuningPeftFormat()

    def inject(self, context: InjectionContext, options: PrefixTuningOptions) -> None:
        model = context.model
        backbone = find_backbone(model)
        for name, attention in attention_modules(model):
            # The attention projections fingerprint the head geometry the prefixes are shaped for.
            for child_name, child in attention.named_children():
                if hasattr(innermost_base(child), "weight"):
                    context.record_target(f"{name}.{child_name}", child)
        token_ids = _init_token_ids(model, options, input_embedding_weight(backbone).device)
        with context.tuned_model.disable_adapters():  # the base model's own keys/values
            keys_values, geometry = cached_keys_values(backbone, token_ids, model.config)
        if options.projection and options.init == "activations":
            hidden = options.projection_hidden_size or geometry.width
            if hidden < options.num_virtual_tokens:
                raise AdapterError(
                    f"prefix_tuning with projection and init='activations' needs projection_hidden_size >= "
                    f"num_virtual_tokens ({options.num_virtual_tokens}) to start exactly at the activations, got "
                    f"{hidden}; raise projection_hidden_size or use fewer virtual tokens"
                )
        initial = keys_values if options.init == "activations" else None
        context.attach(PrefixTuningLayer(backbone, model.config, context.adapter_name, options, geometry, initial))


@hookimpl
def peftkit_register_injectors(register: Callable[[Any], None]) -> None:
    register(PrefixTuningInjector())
