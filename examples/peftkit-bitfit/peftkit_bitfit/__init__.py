"""BitFit for peftkit: fine-tune only the bias terms (Ben Zaken et al., 2021, https://arxiv.org/abs/2106.10199).

For every target layer ``y = W x + b`` BitFit trains the bias alone. To keep
the base model bit-identical (and several adapters side by side), the trained
bias is stored as a zero-initialised offset ``delta``::

    y = W x + b + delta        # merge: b <- b + delta

Layers without a bias are not targets (BitFit has nothing to train there).
This package uses only peftkit's public plugin API: the ``peftkit`` entry
point in pyproject.toml, ``peftkit.hookimpl``, and the InjectionContext helpers.
The offset has the bias's shape, dtype and device, so the layer needs no sizes
(a method that does gets them from ``peftkit.injection.layer_features``, which
knows Linear, GPT-2's in x out ``Conv1D`` and quantized linears).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

import peftkit
from peftkit.errors import TargetError

__all__ = ["BitFitOptions", "BitFitLayer"]


@dataclass
class BitFitOptions:
    """BitFit options.

    Attributes:
        target_modules: suffix list, full-match regex, or ``"all-linear"``;
            only matches that have a bias are used.
        layers: restrict to these block indices.
    """

    target_modules: str | list[str] = "all-linear"
    layers: int | list[int] | None = None


class BitFitLayer(nn.Module):
    """Wraps a Linear-like layer that has a bias; adds a trainable offset per adapter."""

    peftkit_method = "bitfit"

    def __init__(self, base_layer: nn.Module, adapter_name: str, options: BitFitOptions):
        super().__init__()
        self.base_layer = base_layer
        self.delta = nn.ParameterDict()
        self._active: list[str] = []
        self._merged: set[str] = set()
        self.add_adapter(adapter_name, options)

    def add_adapter(self, name: str, options: BitFitOptions) -> None:
        self.delta[name] = nn.Parameter(torch.zeros_like(self.base_layer.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        for name in self._active:
            if name not in self._merged:
                out = out + self.delta[name]
        return out

    # AdapterLayer protocol
    def adapter_names(self) -> list[str]:
        return list(self.delta.keys())

    def set_active_adapters(self, names: Sequence[str]) -> None:
        self._active = [n for n in names if n in self.delta]

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        yield self.delta[name]

    def adapter_state_dict(self, name: str, *, training: bool = False) -> dict[str, torch.Tensor]:
        return {"delta": self.delta[name]}

    def load_adapter_state_dict(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        if set(state) != {"delta"}:
            raise KeyError(f"expected only 'delta', got {sorted(state)}")
        with torch.no_grad():
            self.delta[name].copy_(state["delta"])

    def delete_adapter(self, name: str) -> None:
        del self.delta[name]
        self._merged.discard(name)
        self._active = [n for n in self._active if n != name]

    def merge(self, name: str) -> None:
        if name not in self._merged:
            with torch.no_grad():
                self.base_layer.bias.add_(self.delta[name])
            self._merged.add(name)

    def unmerge(self, name: str) -> None:
        if name in self._merged:
            with torch.no_grad():
                self.base_layer.bias.sub_(self.delta[name])
            self._merged.discard(name)


class BitFitInjector:
    name = "bitfit"
    description = "BitFit: train only bias terms (Ben Zaken et al., 2021); exact merge"
    options = BitFitOptions
    supports_merge = True

    def inject(self, context: Any, options: BitFitOptions) -> None:
        targets = context.find_targets(options.target_modules, layers=options.layers)
        with_bias = [name for name, module in targets if _bias_of(module) is not None]
        if not with_bias:
            raise TargetError(
                f"bitfit: none of the {len(targets)} modules matched by target_modules={options.target_modules!r} "
                f"has a bias (e.g. {targets[0][0]}); BitFit needs a model with biases, such as GPT-2"
            )
        for name in with_bias:
            context.wrap(name, options)


def _bias_of(module: nn.Module) -> torch.Tensor | None:
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return getattr(module, "bias", None)


@peftkit.hookimpl
def peftkit_register_injectors(register: Callable[[Any], None]) -> None:
    register(BitFitInjector())


# trylast, as the hook spec asks of a method's own wrapper: another plugin that teaches BitFit a new layer
# type (answering for it before this one) then wins for that type, and this stays the fallback.
@peftkit.hookimpl(trylast=True)
def peftkit_layer_wrapper(method: str, layer: nn.Module, options: Any) -> Callable[..., nn.Module] | None:
    if method == "bitfit" and isinstance(getattr(layer, "bias", None), torch.Tensor):
        return BitFitLayer
    return None
