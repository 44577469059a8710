"""The top-level functions: ``wrap``, ``load``, ``available_methods``."""

from __future__ import annotations

import os
from typing import Any, Callable

from torch import nn

from peftkit.plugins import plugin_manager
from peftkit.tuned_model import TunedModel

__all__ = ["wrap", "load", "available_methods"]


def wrap(
    model: nn.Module, method: Any, *, adapter_name: str = "default", modules_to_save: list[str] | None = None, **options: Any
) -> TunedModel:
    """Freeze ``model`` and inject one adapter of ``method`` into it.

    :param model: a ``transformers`` model or any ``torch.nn.Module``.
    :param method: a registered method name (``"lora"``) or its options object.
    :param adapter_name: name of the new adapter.
    :param modules_to_save: modules the adapter also trains as full copies, with any method
        (``["lm_head"]``, ``["score"]``; see :mod:`peftkit.modules_to_save`).
    :param options: the method's options; unknown ones raise ``OptionsError``
        listing the valid ones.
    :returns: a :class:`TunedModel` whose only trainable parameters are the adapter's (and the saved modules' copies).
    :raises TargetError: naming ``modules_to_save`` for a name that matches no module.
    """
    add = lambda tuned: tuned.add_adapter(adapter_name, method, modules_to_save=modules_to_save, **options)  # noqa: E731
    return attach_adapter(model, add, is_trainable=True)


def load(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    adapter_name: str | None = None,
    is_trainable: bool = False,
) -> TunedModel:
    """Load an adapter directory onto ``model``.

    :param model: the base model the adapter was trained on (or a ``TunedModel``).
    :param path: a directory written by :meth:`TunedModel.save`.
    :param adapter_name: name to give it (default ``"default"``).
    :param is_trainable: keep its parameters trainable (to continue training);
        otherwise the model is put in eval mode.
    :raises AdapterFormatError: missing, corrupt, or made for another model.
    :raises UnknownMethodError: the adapter's method is not installed.
    """
    return attach_adapter(model, lambda tuned: tuned.load_adapter(path, adapter_name, is_trainable=is_trainable), is_trainable)


def attach_adapter(model: nn.Module, add: Callable[[TunedModel], Any], is_trainable: bool) -> TunedModel:
    """Run ``add(tuned)`` on ``model`` (wrapped in a new ``TunedModel`` unless it is one).

    A failure leaves ``model`` exactly as it was (a ``TunedModel``'s own
    methods are all or nothing; a plain model gets its modules, ``requires_grad``
    flags and train/eval modes back); an inference-only adapter leaves the
    model in eval mode.
    """
    if isinstance(model, TunedModel):
        tuned = model
        add(tuned)
    else:
        modes = [(module, module.training) for module in model.modules()]
        tuned = TunedModel(model)  # puts every module in the model's own mode
        try:
            add(tuned)
        except BaseException:
            tuned.unload()
            for module, mode in modes:
                module.training = mode
            raise
    if not is_trainable:
        tuned.eval()
    return tuned


def available_methods() -> list[str]:
    """Names of every installed method, sorted."""
    return sorted(plugin_manager().injectors())
