"""Starting values for prompt-tuning virtual tokens: vocabulary samples, noise, or a text's embeddings.

Lester et al. (2021) found that starting from real token embeddings (sampled
vocabulary or a task description) trains faster and more stably than noise;
``"vocab"`` is therefore the default.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from peftkit.errors import AdapterError
from peftkit_plugins.prompt_tuning.options import PromptTuningOptions

__all__ = ["initial_prompt", "token_ids_for_text", "resolve_init_token_ids"]

_STD_SAMPLE = 1024  # vocabulary rows used to estimate the embedding scale


def token_ids_for_text(tokenizer: Any, text: str) -> list[int]:
    """The token ids of ``text`` without special tokens: the value to pass as ``init_token_ids``.

    :param tokenizer: a transformers tokenizer (anything callable returning ``{"input_ids": [...]}``).
    :param text: e.g. a task description, ``"Classify the sentiment of this review:"``.
    """
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise AdapterError(f"init_text {text!r} has no tokens with tokenizer {type(tokenizer).__name__}")
    return [int(i) for i in ids]


def resolve_init_token_ids(options: PromptTuningOptions, model: nn.Module) -> list[int] | None:
    """The ids ``init="text"`` starts from: ``init_token_ids``, else ``init_text`` tokenized.

    The tokenizer is ``options.tokenizer`` or, when unset, the one saved with the
    model (``model.config.name_or_path``, set by ``from_pretrained``).

    :raises AdapterError: when no tokenizer can be found or loaded.
    """
    if options.init != "text":
        return None
    if options.init_token_ids is not None:
        return list(options.init_token_ids)
    config = getattr(model, "config", None)
    source = options.tokenizer or getattr(config, "name_or_path", "") or getattr(model, "name_or_path", "") or ""
    if not source:
        raise AdapterError(
            f"prompt_tuning: init_text = {options.init_text!r} needs a tokenizer, but option 'tokenizer' is unset and "
            f"the model ({type(model).__name__}) has no config.name_or_path; pass tokenizer='<path or name>' or give "
            "init_token_ids=token_ids_for_text(tokenizer, text)"
        )
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # transformers raises OSError, ValueError, ... depending on the cause
        raise AdapterError(
            f"prompt_tuning: cannot load tokenizer {source!r} for init_text ({type(exc).__name__}: {exc}); "
            "pass option tokenizer='<local path>' or init_token_ids instead"
        ) from None
    return token_ids_for_text(tokenizer, str(options.init_text))


def initial_prompt(embeddings: nn.Module, options: PromptTuningOptions, token_ids: list[int] | None) -> torch.Tensor:
    """The starting virtual-token embeddings, ``(P, H)``, in the embedding's dtype and device.

    Embeddings are looked up through the module (not its raw weight) so models
    that scale inside their embedding module (e.g. Gemma 3) start at the right scale.

    :param embeddings: the model's input embedding.
    :param token_ids: the resolved ids for ``init="text"`` (see :func:`resolve_init_token_ids`).
    """
    weight = embeddings.weight
    vocab_size, device = int(weight.shape[0]), weight.device
    count = options.num_virtual_tokens
    with torch.no_grad():
        if options.init == "vocab":
            ids = torch.randint(0, vocab_size, (count,), device=device)
            return embeddings(ids).detach().clone()
        if options.init == "random":
            sample = torch.randint(0, vocab_size, (min(vocab_size, _STD_SAMPLE),), device=device)
            std = float(embeddings(sample).float().std())
            return torch.randn(count, weight.shape[1], device=device) * std
        assert token_ids is not None
        too_large = [i for i in token_ids if i >= vocab_size]
        if too_large:
            raise AdapterError(
                f"prompt_tuning: init_token_ids holds ids {too_large[:5]} outside the model's vocabulary of "
                f"{vocab_size} tokens; tokenize init_text with this model's tokenizer"
            )
        repeated = (token_ids * math.ceil(count / len(token_ids)))[:count]
        return embeddings(torch.tensor(repeated, device=device)).detach().clone()
