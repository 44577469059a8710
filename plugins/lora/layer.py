"""``LoraLayer``: a Linear-like layer plus low-rank updates, one per adapter name.

LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685) keeps the base weight
``W`` frozen and learns ``A`` (r x in) and ``B`` (out x r)::

    h = W x + (alpha / r) * B A dropout(x)

``B`` starts at zero, so the wrapped layer starts exactly at the base layer.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.injection import copy_adapter_tensors, layer_features
from peftkit_plugins.lora.dropout import dropout_linear
from peftkit_plugins.lora.options import LoraOptions

__all__ = ["LoraLayer", "lora_delta_weight"]


def _is_conv1d(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Conv1D"  # transformers' GPT-2 layer; weight is (in, out)


class LoraLayer(nn.Module):
    """Wraps ``nn.Linear`` or transformers' ``Conv1D`` (or anything with the same ``forward``).

    The base layer is kept as ``base_layer``; each adapter has ``lora_A[name]``
    and ``lora_B[name]``. Several adapters may live here; only the active ones
    take part in ``forward``.
    """

    peftkit_method = "lora"

    def __init__(self, base_layer: nn.Module, adapter_name: str, options: LoraOptions):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = layer_features(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self._active: list[str] = []
        self._merged: set[str] = set()
        self.add_adapter(adapter_name, options)

    def _base_weight(self) -> torch.Tensor:
        inner = self.base_layer
        while isinstance(getattr(inner, "base_layer", None), nn.Module):
            inner = inner.base_layer
        return inner.weight

    # ----------------------------------------------------------- adapters
    def add_adapter(self, name: str, options: LoraOptions) -> None:
        weight = self._base_weight()
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        a = torch.empty(options.r, self.in_features, device=weight.device, dtype=dtype)
        if options.init == "gaussian":
            nn.init.normal_(a, std=1.0 / options.r)
        else:  # the same as nn.Linear's default init
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        b = torch.zeros(self.out_features, options.r, device=weight.device, dtype=dtype)
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        self.scaling[name] = options.scaling
        self.dropout[name] = options.dropout

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def set_active_adapters(self, names: Sequence[str]) -> None:
        self._active = [n for n in names if n in self.lora_A]

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        yield self.lora_A[name]
        yield self.lora_B[name]

    def adapter_state_dict(self, name: str, *, training: bool = False) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A[name], "lora_B.weight": self.lora_B[name]}

    def load_adapter_state_dict(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        expected = {"lora_A.weight": self.lora_A[name], "lora_B.weight": self.lora_B[name]}
        copy_adapter_tensors(expected, state)

    def delete_adapter(self, name: str) -> None:
        # Never touches the base weight: merge_and_unload relies on that.
        del self.lora_A[name]
        del self.lora_B[name]
        self.scaling.pop(name)
        self.dropout.pop(name)
        self._merged.discard(name)
        self._active = [n for n in self._active if n != name]

    # -------------------------------------------------------------- merge
    def delta_weight(self, name: str) -> torch.Tensor:
        """``scale * B @ A`` in the base weight's layout."""
        delta = lora_delta_weight(self.lora_A[name], self.lora_B[name], self.scaling[name])
        return delta.T if _is_conv1d(self.base_layer) else delta

    def merge(self, name: str) -> None:
        if name in self._merged:
            return
        weight = self._base_weight()
        with torch.no_grad():
            weight.add_(self.delta_weight(name).to(weight.dtype))
        self._merged.add(name)

    def unmerge(self, name: str) -> None:
        if name not in self._merged:
            return
        weight = self._base_weight()
        with torch.no_grad():
            weight.sub_(self.delta_weight(name).to(weight.dtype))
        self._merged.discard(name)

    # ------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)  # (B, T, out)
        for name in self._active:
            if name in self._merged:
                continue
            a, b = self.lora_A[name], self.lora_B[name]
            xa = x.to(a.dtype)
            p = self.dropout[name]
            h = dropout_linear(xa, a, p) if (p > 0.0 and self.training) else F.linear(xa, a)  # (B, T, r)
            # Scaling B (out x r) is cheaper than scaling the (B, T, out) result.
            out = out + F.linear(h, b * self.scaling[name]).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={self.adapter_names()}"


def lora_delta_weight(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling * B @ A`` (out x in), computed in float32 at least for a precise merge."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    return (b.to(dtype) @ a.to(dtype)) * scaling
