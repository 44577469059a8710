"""Prompt tuning: trainable virtual tokens prepended to the input (Lester et al., 2021, https://arxiv.org/abs/2104.08691).

For an input ``x`` of ``T`` tokens the frozen model runs on::

    h = Decoder([E; Embed(x)])[P:]          # E: P x H trainable, Embed frozen

with the attention mask extended by ``P`` ones and positions ``0..P-1`` for
``E``. Only ``E`` trains (``P * H`` parameters). Outputs (logits, hidden states,
loss) cover the real tokens only; see :mod:`.virtual_tokens` for how inputs,
masks, positions, labels and ``generate()`` are handled.

Merging is refused: the virtual tokens are inputs, not a change of weights.

Options: :class:`PromptTuningOptions`. Saved tensors: ``prompt_embeddings``
(P x H), the same key and shape as Hugging Face ``peft``'s prompt-tuning file.
"""

from __future__ import annotations

from typing import Any, Callable

from peftkit.hookspecs import hookimpl
from peftkit.injection import InjectionContext
from peftkit_plugins.prompt_tuning.init import initial_prompt, resolve_init_token_ids, token_ids_for_text
from peftkit_plugins.prompt_tuning.options import PromptTuningOptions
from peftkit_plugins.prompt_tuning.peft_format import PromptTuningPeftFormat
from peftkit_plugins.prompt_tuning.prompt import PromptEmbeddings
from peftkit_plugins.prompt_tuning.virtual_tokens import (
    MERGE_REFUSAL,
    VirtualTokenAdapter,
    find_decoder,
    find_input_embeddings,
)

__all__ = ["PromptTuningInjector", "PromptTuningOptions", "PromptEmbeddings", "token_ids_for_text"]


class PromptTuningInjector:
    name = "prompt_tuning"
    description = "Prompt tuning: trainable virtual-token embeddings prepended to the input (Lester et al., 2021)"
    options = PromptTuningOptions
    peft_format = PromptTuningPeftFormat()
    supports_merge = False
    recommended_lr = 3e-2  # train.lr: auto; a few virtual-token embeddings carry the whole adaptation (peft's examples use 3e-2)
    merge_refusal = MERGE_REFUSAL

    def inject(self, context: InjectionContext, options: PromptTuningOptions) -> None:
        model = context.model
        find_decoder(model)  # fail before any work on a model without a usable decoder
        embedding_name, embeddings = find_input_embeddings(model)
        token_ids = resolve_init_token_ids(options, model)
        if options.init == "text" and options.init_token_ids is None:
            # Record what init_text resolved to, so the saved config reloads without the tokenizer.
            options.init_token_ids = token_ids
        prompt = PromptEmbeddings(initial_prompt(embeddings, options, token_ids))
        context.record_target(embedding_name, embeddings)
        context.attach(VirtualTokenAdapter(model, context.adapter_name, prompt))


@hookimpl
def peftkit_register_injectors(register: Callable[[Any], None]) -> None:
    register(PromptTuningInjector())
