"""unload() after a method replaced a base parameter by an integer (quantized) one.

A method may convert base weights irreversibly (QLoRA quantizes them to packed
integers). ``unload()`` restores the user's ``requires_grad`` flags by name, and
an integer tensor cannot require grad: it must stay frozen instead of raising.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

import peftkit
from peftkit.testing import tiny_llama


@dataclass
class _Options:
    pass


class _Marker(nn.Module):
    """A parameter-free attached adapter module (the smallest AdapterLayer)."""

    def __init__(self, name: str):
        super().__init__()
        self.names = [name]

    def adapter_names(self) -> list[str]:
        return list(self.names)

    def set_active_adapters(self, names: Sequence[str]) -> None:
        pass

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        return iter(())

    def adapter_state_dict(self, name: str, *, training: bool = False) -> dict[str, torch.Tensor]:
        return {}

    def load_adapter_state_dict(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        pass

    def delete_adapter(self, name: str) -> None:
        self.names.remove(name)

    def merge(self, name: str) -> None:
        pass

    def unmerge(self, name: str) -> None:
        pass


class _IntegerWeights:
    name = "test_integer_weights"
    description = "replaces q_proj weights by int8 ones, like a quantizing method"
    options = _Options
    supports_merge = False

    def inject(self, context, options):
        for name, module in context.find_targets(["q_proj"]):
            module.weight = nn.Parameter(module.weight.detach().round().to(torch.int8), requires_grad=False)
        context.attach(_Marker(context.adapter_name))


class _Plugin:
    @peftkit.hookimpl
    def peftkit_register_injectors(self, register):
        register(_IntegerWeights())


def test_unload_keeps_integer_parameters_frozen_and_restores_the_others(register_plugin):
    register_plugin(_Plugin())
    model = tiny_llama()
    assert all(p.requires_grad for p in model.parameters())
    tuned = peftkit.wrap(model, "test_integer_weights")
    base = tuned.unload()
    integer = {n for n, p in base.named_parameters() if not p.is_floating_point()}
    assert integer == {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"}
    assert all(not p.requires_grad for n, p in base.named_parameters() if n in integer)
    assert all(p.requires_grad for n, p in base.named_parameters() if n not in integer)
