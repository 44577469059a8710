"""TRL's fused LM head on a ``TunedModel``: put it on the transformers model inside.

TRL's trainers call ``trl.trainer.add_fused_lm_head(model)`` on any model that is
not a ``peft.PeftModel`` (trl/trainer/sft_trainer.py:1144, dpo_trainer.py:960,
grpo_trainer.py:1068). The head replaces ``model.forward`` and, when called with
``fused_lm_head=True``, runs ``model.base_model`` expecting the decoder's
``last_hidden_state`` (trl/trainer/utils.py:1593, 1616-1618): on a transformers model
``base_model`` is the decoder, on a ``TunedModel`` it is the whole causal LM,
hence ``'CausalLMOutputWithPast' object has no attribute 'last_hidden_state'``.
TRL's own documentation says to add the head before wrapping; this does that
afterwards: ``TunedModel.forward`` passes ``fused_lm_head``/``labels`` through to
the patched transformers model, whose decoder carries the adapters (and the
virtual-token hooks of prompt-side methods).
"""

from __future__ import annotations

import inspect
from typing import Any

from peftkit.errors import AdapterError
from peftkit.registry import is_adapter_layer
from peftkit.tuned_model import TunedModel

__all__ = ["move_fused_lm_head_inside"]


def move_fused_lm_head_inside(tuned: TunedModel, own_forward: Any) -> bool:
    """If TRL patched ``tuned.forward`` with its fused LM head, patch ``tuned.base_model`` instead.

    :param own_forward: ``tuned``'s instance ``forward`` before the trainer was built.
    :returns: whether a head was moved.
    :raises AdapterError: if an adapter sits on the output head, which the fused head would skip.
    """
    patched = vars(tuned).get("forward")
    function = getattr(patched, "__func__", None)
    # add_fused_lm_head wraps with functools.wraps(type(model).forward)
    if patched is own_forward or getattr(function, "__wrapped__", None) is not type(tuned).forward:
        return False
    head = tuned.get_output_embeddings()
    if is_adapter_layer(head):
        raise AdapterError(
            f"TRL's fused LM head projects with the output head's weight directly (trl/trainer/utils.py:1633), so the "
            f"adapter on it ({type(head).__name__}) would be skipped; remove the output head (e.g. 'lm_head') from "
            "target_modules for TRL training"
        )
    from trl.trainer import add_fused_lm_head

    settings = inspect.getclosurevars(function).nonlocals  # exactly what the trainer asked for
    if own_forward is not None:
        tuned.forward = own_forward
    else:
        del tuned.forward
    add_fused_lm_head(
        tuned.base_model,
        temperature=settings.get("temperature", 1.0),
        cast_lm_head_to_fp32=settings.get("cast_lm_head_to_fp32", False),
        outputs=settings.get("outputs", ("log_probs",)),
    )
    return True
