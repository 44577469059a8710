"""The causal-LM loss without full-vocabulary logits for every position: chunked LM head + cross-entropy.

At small model sizes activations, not weights, set peak training memory, and
the largest single activation is the logits tensor: ``(B, T, V)`` in float32
for the loss (SmolLM2: V = 49,152, so batch 4 x 256 is 200 MB, plus the same
again for its gradient and the upcast copy). This module computes the same loss
from the decoder's last hidden states instead:

1. keep only the positions that have a target (labels != -100 after the shift:
   in SFT most positions are prompt tokens and carry no loss);
2. run the output head and the cross-entropy on ``chunk_size`` positions at a
   time under activation checkpointing, so only one chunk's logits exist at
   once, in the forward and in the backward (the head is re-run per chunk in
   the backward).

The result equals ``CrossEntropyLoss(head(h))`` in value and gradient up to
float rounding (sums over chunks in float32); ``tests/core/test_losses.py``
checks 1e-5.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["IGNORE_INDEX", "chunked_cross_entropy", "decoder_and_head", "lm_hidden_states", "supports_chunked_loss"]

IGNORE_INDEX = -100


def _chunk_loss(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # (N, V): one chunk only
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    *,
    chunk_size: int = 1024,
    shift: bool = True,
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and how many there are.

    :param hidden: last hidden states, ``(B, T, C)``.
    :param head: the output head (a module or function ``(N, C) -> (N, V)``).
    :param labels: ``(B, T)`` token ids; ``-100`` marks positions without a target.
    :param chunk_size: positions per head call; ``0`` runs them all at once
        (still only the labelled ones).
    :param shift: position ``t`` predicts ``labels[t + 1]`` (the usual causal-LM layout).
    :returns: ``(sum of losses, number of targets)``; the caller divides. The sum
        is a float32 scalar (zero, with a graph, when there are no targets).
    """
    if shift:
        hidden, labels = hidden[:, :-1, :], labels[:, 1:]
    keep = labels != IGNORE_INDEX  # (B, T-1)
    h = hidden[keep]  # (N, C)
    y = labels[keep]  # (N,)
    count = int(y.numel())
    if count == 0:
        return hidden.sum().float() * 0.0, 0
    if chunk_size <= 0 or count <= chunk_size:
        if torch.is_grad_enabled() and chunk_size > 0:
            return checkpoint(_chunk_loss, head, h, y, use_reentrant=False), count
        return _chunk_loss(head, h, y), count
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, count, chunk_size):
        h_chunk, y_chunk = h[start : start + chunk_size], y[start : start + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, h_chunk, y_chunk, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h_chunk, y_chunk)
    return total, count


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder (input ids -> last hidden states) and the output head of a transformers causal LM.

    ``model`` may be a :class:`peftkit.TunedModel` or the transformers model
    itself. The decoder is ``model.base_model`` in transformers' sense (e.g.
    ``LlamaModel``): input-side and attention-side adapters hook exactly that
    module, so calling it directly keeps them in play.
    """
    hf_model = model.base_model if hasattr(model, "adapters") else model  # a TunedModel holds the HF model
    decoder = getattr(hf_model, "base_model", None)
    head = hf_model.get_output_embeddings() if hasattr(hf_model, "get_output_embeddings") else None
    if not isinstance(decoder, nn.Module) or decoder is hf_model or head is None:
        raise TypeError(f"{type(hf_model).__name__} is not a transformers causal LM with a separate decoder and head")
    return decoder, head


def supports_chunked_loss(model: nn.Module) -> bool:
    """Whether the chunked loss computes exactly what the model's own head does.

    Models that scale or soft-cap their logits after the head (Gemma 2's
    ``final_logit_softcapping``, Cohere's ``logit_scale``) need their own forward.
    """
    try:
        decoder_and_head(model)
    except TypeError:
        return False
    config = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            return False
    return True


def lm_hidden_states(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Last hidden states ``(B, T, C)`` of ``model``'s decoder for ``input_ids``/``attention_mask``."""
    decoder, _ = decoder_and_head(model)
    out = decoder(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state
