"""``modules_to_save``: full trainable copies of named modules, with any method (peft's option of that name).

An adapter may carry, besides its method's own weights, complete copies of a
few modules of the base model (an ``lm_head``, a classification ``score``
head, ``embed_tokens``) that train in full. Each such module is wrapped by a
:class:`ModulesToSaveLayer`, an ordinary :class:`peftkit.registry.AdapterLayer`,
so the existing machinery handles it: the copy is saved with the adapter
(under the module's own path: ``lm_head.weight``, as peft names it), restored on
load, bypassed under ``disable_adapters()`` and dropped by ``delete_adapter``.

Tied weights: a copy has weights of its own, so a saved ``lm_head`` of a model
whose ``lm_head`` shares its weight with ``embed_tokens`` is untied from it
(the input embeddings stay the base model's), as in peft.

Merge swaps the copy in for the original module (``unmerge`` swaps back), and
``merge_and_unload`` leaves the copy in the model, again as peft does: writing
the copy's values into the original instead would also change every module
tied to it.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from peftkit.errors import TargetError
from peftkit.injection import copy_adapter_tensors
from peftkit.targeting import find_targets

if TYPE_CHECKING:
    from peftkit.injection import InjectionContext
    from peftkit.tuned_model import TunedModel

__all__ = ["ModulesToSaveLayer", "inject_modules_to_save", "check_modules_to_save", "saved_module_prefixes"]

OPTION = "modules_to_save"


class ModulesToSaveLayer(nn.Module):
    """A module of the base model plus one full trainable copy of it per adapter.

    ``forward`` runs the active adapter's copy, or the original (``base_layer``)
    when no adapter of this layer is active or the active one is merged (merging
    makes the copy the ``base_layer``).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str):
        super().__init__()
        self.base_layer = base_layer
        self.copies = nn.ModuleDict()
        self._active: list[str] = []
        self._set_aside: list[nn.Module] = []  # the original while a copy is merged; a list so it is no submodule
        self._merged: str | None = None
        self.add_adapter(adapter_name)

    def add_adapter(self, name: str) -> None:
        original = self._set_aside[0] if self._set_aside else self.base_layer
        self.copies[name] = copy.deepcopy(original)  # own tensors: tied weights are not shared with the copy

    def adapter_names(self) -> list[str]:
        return list(self.copies.keys())

    def set_active_adapters(self, names: Sequence[str]) -> None:
        self._active = [n for n in names if n in self.copies]

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        yield from self.copies[name].parameters()

    def adapter_state_dict(self, name: str, *, training: bool = False) -> dict[str, torch.Tensor]:
        return dict(self.copies[name].state_dict(keep_vars=True))

    def load_adapter_state_dict(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        copy_adapter_tensors(self.adapter_state_dict(name), state)

    def delete_adapter(self, name: str) -> None:
        # merge_and_unload deletes a merged adapter: its copy stays as the base_layer that replaces this wrapper.
        if self._merged == name:
            self._merged = None
            self._set_aside.clear()
        del self.copies[name]
        self._active = [n for n in self._active if n != name]

    def merge(self, name: str) -> None:
        if self._merged == name:
            return
        self._set_aside.append(self.base_layer)
        self.base_layer = self.copies[name]
        self._merged = name

    def unmerge(self, name: str) -> None:
        if self._merged != name:
            return
        self.base_layer = self._set_aside.pop()
        self._merged = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        for name in self._active:
            if name != self._merged:
                return self.copies[name](*args, **kwargs)
        return self.base_layer(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names()}"


def check_modules_to_save(names: Any) -> list[str]:
    """``names`` as a list of module names (``None`` -> ``[]``; a single string is one name).

    :raises TargetError: naming the option and the value if it is not a list of non-empty strings.
    """
    if names is None:
        return []
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
        raise TargetError(f"{OPTION}={names!r} must be a list of module names such as ['lm_head']")
    return list(names)


def inject_modules_to_save(context: "InjectionContext", names: Sequence[str]) -> None:
    """Give adapter ``context.adapter_name`` a trainable copy of each module in ``names``.

    A name matches a module whose path is the name or ends with ``.`` + name
    (``"lm_head"``, ``"embed_tokens"``, ``"model.layers.0.mlp"``), as in peft.

    :raises TargetError: naming the option, every name that matches no module (with the
        candidate names), and every module another adapter method already wraps.
    """
    model = context.model
    problems, targets, unknown, candidates = [], [], [], ""
    for name in names:
        try:
            matched = find_targets(model, [name], linear_only=False, option=OPTION)
        except TargetError as exc:
            unknown.append(name)
            candidates = str(exc).split("; ", 1)[-1]
            continue
        for path, module in matched:
            if getattr(module, "base_layer", None) is not None and not isinstance(module, ModulesToSaveLayer):
                problems.append(
                    f"{name!r} names {path}, which method {getattr(module, 'peftkit_method', type(module).__name__)!r} "
                    "already adapts; a module is either adapted or saved in full: drop it from target_modules or from modules_to_save"
                )
            else:
                targets.append((path, module))
    if unknown:
        problems.insert(0, f"{', '.join(map(repr, unknown))} {'matches' if len(unknown) == 1 else 'match'} no module ({candidates})")
    if problems:
        raise TargetError(f"{OPTION}={list(names)!r}: " + "; ".join(problems) + "; fix the names (module paths or their last parts)")
    for path, module in targets:
        context.record_target(path, module)
        if isinstance(module, ModulesToSaveLayer):
            module.add_adapter(context.adapter_name)
        else:
            context.replace(path, ModulesToSaveLayer(module, context.adapter_name))


def saved_module_prefixes(tuned: "TunedModel", name: str) -> list[str]:
    """Key prefixes (``"lm_head."``) of the modules adapter ``name`` saves in full, as in its state dict."""
    return [prefix for prefix, layer in tuned._keyed_layers_of(name) if isinstance(layer, ModulesToSaveLayer)]
