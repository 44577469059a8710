"""P-tuning: virtual tokens produced by a trainable prompt encoder (Liu et al., 2021, https://arxiv.org/abs/2103.10385).

"GPT Understands, Too" reparameterizes the virtual tokens: instead of training
``E`` (P x H) directly as in prompt tuning, a prompt encoder computes it from
trainable inputs ``e_1..e_P``, which trains more stably::

    E = Encoder(e_1..e_P)                     # MLP, or BiLSTM + MLP (see .encoder)
    h = Decoder([E; Embed(x)])[P:]            # the frozen model on the extended input

The virtual tokens are prepended exactly as in prompt tuning (shared code in
:mod:`peftkit_plugins.prompt_tuning.virtual_tokens`). After training only ``E``
matters: ``adapter_state_dict(training=False)`` saves the encoder output as
``prompt_embeddings`` (P x H, Hugging Face ``peft``'s key and shape), so
inference needs no encoder; ``training=True`` also keeps the encoder weights.

Merging is refused: the virtual tokens are inputs, not a change of weights.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from peftkit.hookspecs import hookimpl
from peftkit.injection import InjectionContext
from peftkit_plugins.p_tuning.encoder import PromptEncoder
from peftkit_plugins.p_tuning.options import PTuningOptions
from peftkit_plugins.p_tuning.peft_format import PTuningPeftFormat
from peftkit_plugins.p_tuning.prompt import PTuningPrompt
from peftkit_plugins.prompt_tuning.virtual_tokens import (
    MERGE_REFUSAL,
    VirtualTokenAdapter,
    find_decoder,
    find_input_embeddings,
)

__all__ = ["PTuningInjector", "PTuningOptions", "PTuningPrompt", "PromptEncoder"]


class PTuningInjector:
    name = "p_tuning"
    description = "P-tuning: virtual tokens from a trainable MLP/LSTM prompt encoder (Liu et al., 2021); encoder droppable"
    options = PTuningOptions
    peft_format = PTuningPeftFormat()
    supports_merge = False
    recommended_lr = 3e-3  # train.lr: auto; the prompt encoder MLP/LSTM sits between the rates of weight- and prompt-side methods
    merge_refusal = MERGE_REFUSAL

    def inject(self, context: InjectionContext, options: PTuningOptions) -> None:
        model = context.model
        find_decoder(model)
        embedding_name, embeddings = find_input_embeddings(model)
        weight = embeddings.weight
        token_dim = int(weight.shape[1])
        encoder = PromptEncoder(
            options.num_virtual_tokens,
            token_dim,
            options.encoder_hidden_size or token_dim,
            kind=options.encoder,
            num_layers=options.encoder_num_layers,
            dropout=options.encoder_dropout,
        )
        # At least float32, as the base embedding may be half precision.
        dtype = torch.promote_types(weight.dtype, torch.float32) if weight.dtype.is_floating_point else torch.float32
        # Only when needed: a no-op .to() still swaps every parameter, which fails while peftkit rehearses
        # an injection on fake tensors to check a saved adapter's shapes before allocating anything.
        if any(p.device != weight.device or p.dtype != dtype for p in encoder.parameters()):
            encoder.to(device=weight.device, dtype=dtype)
        context.record_target(embedding_name, embeddings)
        context.attach(VirtualTokenAdapter(model, context.adapter_name, PTuningPrompt(encoder)))


@hookimpl
def peftkit_register_injectors(register: Callable[[Any], None]) -> None:
    register(PTuningInjector())
