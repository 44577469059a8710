"""The shapes plugins fill in: the ``Injector``, ``Objective`` and ``AdapterLayer`` protocols.

These are :class:`typing.Protocol` classes, not base classes: a plugin
satisfies them by having the right attributes, and never needs to import
peftkit beyond :mod:`peftkit.hookspecs` (for ``hookimpl``) and the helpers it
chooses to use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from peftkit.injection import InjectionContext

__all__ = ["Injector", "Objective", "AdapterLayer", "is_adapter_layer"]


class Injector(Protocol):
    """A PEFT method, registered through ``peftkit_register_injectors``.

    Attributes:
        name: the method name users type (``"lora"``); unique across plugins.
        description: one line shown by ``peftkit methods``.
        options: a dataclass of the method's options (see :mod:`peftkit.options`).
        supports_merge: whether the adapter can be folded into the base weights.
    """

    name: str
    description: str
    options: type
    supports_merge: bool

    def inject(self, context: "InjectionContext", options: Any) -> None:
        """Insert adapter ``context.adapter_name`` into ``context.model`` in place.

        Weight-side methods call ``context.wrap(...)`` on each target; input- or
        attention-side methods ``context.attach(...)`` a standalone module.
        Every module that holds adapter state must satisfy :class:`AdapterLayer`.
        """
        ...


class Objective(Protocol):
    """A training objective, registered through ``peftkit_register_objectives``."""

    name: str
    description: str
    options: type


@runtime_checkable
class AdapterLayer(Protocol):
    """A module that holds the state of one or more named adapters.

    Weight-side wrappers also have a ``base_layer`` attribute (the module they
    wrap) and are replaced by it when their last adapter is deleted.
    """

    def adapter_names(self) -> list[str]:
        """Names of the adapters this layer holds."""
        ...

    def set_active_adapters(self, names: Sequence[str]) -> None:
        """Make exactly ``names`` (possibly none) take part in ``forward``."""
        ...

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        """The trainable parameters of adapter ``name``."""
        ...

    def adapter_state_dict(self, name: str, *, training: bool = False) -> dict[str, torch.Tensor]:
        """Tensors to save for adapter ``name``.

        :param training: ``True`` for a resumable checkpoint (keep whatever
            training-only parameters exist, e.g. a reparameterization network);
            ``False`` for the inference form.
        """
        ...

    def load_adapter_state_dict(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        """Load tensors saved by :meth:`adapter_state_dict` (either form)."""
        ...

    def delete_adapter(self, name: str) -> None:
        """Drop adapter ``name`` and everything it registered."""
        ...

    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into the base weights (raise ``MergeNotSupportedError`` if impossible)."""
        ...

    def unmerge(self, name: str) -> None:
        """Undo :meth:`merge`."""
        ...


def is_adapter_layer(module: nn.Module) -> bool:
    """Whether ``module`` satisfies :class:`AdapterLayer`."""
    return isinstance(module, AdapterLayer)
