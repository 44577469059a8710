"""The ``InjectionContext`` an injector receives: the model plus the helpers every method needs.

Keeping these helpers here (targeting, wrapper dispatch through the
``peftkit_layer_wrapper`` hook, module replacement, attaching standalone
modules) keeps each method's ``inject`` short and free of core internals.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping

import torch
from torch import nn

from peftkit.errors import TargetError
from peftkit.registry import is_adapter_layer
from peftkit.targeting import TargetSpec, find_targets, innermost_base

if TYPE_CHECKING:
    from peftkit.plugins import PluginManager
    from peftkit.tuned_model import TunedModel

__all__ = ["InjectionContext", "replace_module", "layer_features", "layer_shape", "copy_adapter_tensors"]


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` of ``root`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def copy_adapter_tensors(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> None:
    """Copy saved ``state`` into the adapter tensors ``expected``, strictly (for ``load_adapter_state_dict``).

    :raises KeyError: listing missing and unexpected keys.
    :raises ValueError: naming a tensor whose shape differs.
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(f"missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for key, param in expected.items():
            if tuple(state[key].shape) != tuple(param.shape):
                raise ValueError(f"{key} has shape {tuple(state[key].shape)}, expected {tuple(param.shape)}")
            param.copy_(state[key])


def layer_features(layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a Linear-like layer, seen through any adapter wrappers.

    Supported: ``torch.nn.Linear``; transformers' ``Conv1D`` (GPT-2's projections,
    which ``"all-linear"`` selects there), whose weight is stored *in x out*, so
    ``nf`` is the output size; and bitsandbytes' quantized linears (``Linear4bit``,
    ``Linear8bitLt``; also what ``"all-linear"`` selects on a quantized model), whose
    packed ``weight`` has no meaningful shape, so their ``in_features``/``out_features``
    attributes are used; any other layer with integer ``in_features``/``out_features``
    attributes is read the same way. A layer already wrapped by an adapter (any module
    with a ``base_layer``) gives the sizes of the original layer underneath.

    :param layer: the layer, wrapped or not.
    :returns: ``(in_features, out_features)``.
    :raises TypeError: for any other kind of layer, naming its type.
    """
    base = innermost_base(layer)
    if type(base).__name__ == "Conv1D":  # transformers' GPT-2 layer: weight is (in, out)
        return int(base.weight.shape[0]), int(base.nf)
    # bitsandbytes' Linear4bit/Linear8bitLt subclass nn.Linear and keep the logical sizes in these attributes;
    # any other layer that declares them is Linear-like too (a plugin may teach a method such a layer type
    # through peftkit_layer_wrapper, and the built-in wrappers then size themselves from it).
    sizes = getattr(base, "in_features", None), getattr(base, "out_features", None)
    if all(isinstance(n, int) and not isinstance(n, bool) for n in sizes):
        return sizes[0], sizes[1]
    seen = f" (under the adapter wrapper {type(layer).__name__})" if base is not layer else ""
    raise TypeError(
        f"layer_features: {type(base).__module__}.{type(base).__name__}{seen} is not a Linear-like layer; it knows "
        "torch.nn.Linear, transformers' Conv1D, bitsandbytes' Linear4bit/Linear8bitLt and layers with integer "
        "in_features/out_features attributes. For another layer type, "
        "read its sizes from the layer itself (and teach your wrapper that type explicitly)"
    )


def layer_shape(module: nn.Module) -> list[int]:
    """The logical weight shape of a layer, ``[out, in]`` for Linear-like layers (see :func:`layer_features`).

    Any other layer gives ``[out, in]`` from ``out_features``/``in_features`` when it
    has them, else its ``weight.shape`` (``[]`` without a weight).
    """
    base = innermost_base(module)
    try:
        in_features, out_features = layer_features(base)
        return [out_features, in_features]
    except TypeError:
        pass
    if hasattr(base, "in_features") and hasattr(base, "out_features"):
        return [int(base.out_features), int(base.in_features)]
    weight = getattr(base, "weight", None)
    return list(weight.shape) if weight is not None else []


class InjectionContext:
    """Everything an injector needs to insert adapter ``adapter_name`` into ``model``.

    Attributes:
        model: the base model (modified in place).
        tuned_model: the :class:`peftkit.TunedModel` being built.
        adapter_name: name of the adapter being injected.
        method: the method name doing the injection.
        targets: module name -> logical shape, recorded for the adapter's
            base-model fingerprint (filled by :meth:`wrap` and :meth:`record_target`).
    """

    def __init__(self, tuned_model: "TunedModel", adapter_name: str, method: str, pm: "PluginManager"):
        self.tuned_model = tuned_model
        self.model: nn.Module = tuned_model.base_model
        self.adapter_name = adapter_name
        self.method = method
        self.targets: dict[str, list[int]] = {}
        self._pm = pm

    def find_targets(
        self,
        target_modules: TargetSpec,
        *,
        layers: int | Iterable[int] | None = None,
        linear_only: bool = True,
        option: str = "target_modules",
    ) -> list[tuple[str, nn.Module]]:
        """Resolve a target spec on the base model; see :func:`peftkit.targeting.find_targets`."""
        return find_targets(self.model, target_modules, layers=layers, linear_only=linear_only, option=option)

    def record_target(self, name: str, module: nn.Module) -> None:
        """Add a module to the adapter's base-model fingerprint."""
        self.targets[name] = layer_shape(module)

    def wrap(self, name: str, options: Any) -> nn.Module:
        """Add this adapter to the layer at ``name``, wrapping it if needed.

        If the layer is already a wrapper of this method (it has a
        ``peftkit_method`` attribute equal to :attr:`method`), the adapter is
        added to it with ``layer.add_adapter(adapter_name, options)``. Otherwise
        the ``peftkit_layer_wrapper`` hook picks a wrapper for the layer type.

        :returns: the wrapper module now at ``name``.
        :raises TargetError: if no plugin knows how to wrap this layer type.
        """
        module = self.model.get_submodule(name)
        self.record_target(name, module)
        if getattr(module, "peftkit_method", None) == self.method:
            module.add_adapter(self.adapter_name, options)
            return module
        wrapper = self._pm.call_hook("peftkit_layer_wrapper", method=self.method, layer=innermost_base(module), options=options)
        if wrapper is None:
            raise TargetError(
                f"method {self.method!r} cannot wrap {name} of type {type(innermost_base(module)).__name__}: "
                "no plugin provides a wrapper for it (peftkit_layer_wrapper hook); "
                "choose other target_modules or install a plugin that supports this layer type"
            )
        new = wrapper(module, self.adapter_name, options)
        replace_module(self.model, name, new)
        return new

    def replace(self, name: str, new: nn.Module) -> None:
        """Replace the base-model submodule at ``name`` (for methods that insert modules)."""
        replace_module(self.model, name, new)

    def attach(self, module: nn.Module) -> None:
        """Attach a standalone adapter module (prompt encoder, prefixes, ...) to the tuned model.

        The module must satisfy :class:`peftkit.registry.AdapterLayer`; it is
        stored under ``tuned_model.attached[adapter_name]`` and removed with the adapter.
        """
        if not is_adapter_layer(module):
            raise TypeError(f"{type(module).__name__} does not implement the AdapterLayer protocol")
        self.tuned_model.attached[self.adapter_name] = module
