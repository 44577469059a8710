"""``BottleneckAdapterLayer``: a layer followed by bottleneck adapters, one per adapter name.

Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP"
(https://arxiv.org/abs/1902.00751). For the output ``h`` (d features) of the
wrapped layer, with ``W_down`` (m x d), ``W_up`` (d x m), ``m << d``::

    y = h + W_up f(W_down h + b_down) + b_up

``W_up`` and ``b_up`` start at zero, so the wrapped layer starts exactly at the
base layer. Because ``f`` is nonlinear the adapter cannot be folded into the
base weight: there is no merge.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.errors import MergeNotSupportedError
from peftkit.injection import copy_adapter_tensors, layer_features
from peftkit.targeting import innermost_base
from peftkit_plugins.adapter.options import AdapterOptions

__all__ = ["BottleneckAdapterLayer", "NONLINEARITIES", "MERGE_REFUSAL"]

NONLINEARITIES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
}

MERGE_REFUSAL = (
    "a bottleneck adapter applies a nonlinearity between its down- and up-projection "
    "(h + W_up f(W_down h)), which no single linear weight can represent; "
    "keep the adapter unmerged (it adds two small matmuls per adapted layer)"
)


class BottleneckAdapterLayer(nn.Module):
    """Wraps a Linear-like layer (``nn.Linear``, ``Conv1D``, quantized linears: see ``layer_features``) and adapts its output.

    The base layer is kept as ``base_layer``; each adapter has
    ``adapter_down[name]`` (d -> m) and ``adapter_up[name]`` (m -> d). Only the
    active adapters take part in ``forward``, applied one after another.
    """

    peftkit_method = "adapter"

    def __init__(self, base_layer: nn.Module, adapter_name: str, options: AdapterOptions):
        super().__init__()
        self.base_layer = base_layer
        self.features = layer_features(base_layer)[1]  # the adapter acts on the layer's output
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.nonlinearity: dict[str, str] = {}
        self._active: list[str] = []
        self.add_adapter(adapter_name, options)

    # ----------------------------------------------------------- adapters
    def add_adapter(self, name: str, options: AdapterOptions) -> None:
        weight = getattr(innermost_base(self.base_layer), "weight", None)
        device = weight.device if weight is not None else None
        dtype = weight.dtype if weight is not None and weight.dtype.is_floating_point else torch.float32
        m = options.bottleneck_for(self.features)
        # W_down keeps nn.Linear's Kaiming-uniform init so f(W_down h) is of the
        # order of h; b_down starts at zero because nn.Linear's uniform bias can
        # outweigh a small h and leave a ReLU dead for every token.
        down = nn.Linear(self.features, m, device=device, dtype=dtype)
        up = nn.Linear(m, self.features, device=device, dtype=dtype)
        nn.init.zeros_(down.bias)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        self.adapter_down[name] = down
        self.adapter_up[name] = up
        self.nonlinearity[name] = options.nonlinearity

    def adapter_names(self) -> list[str]:
        return list(self.adapter_down.keys())

    def set_active_adapters(self, names: Sequence[str]) -> None:
        self._active = [n for n in names if n in self.adapter_down]

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        yield from self.adapter_down[name].parameters()
        yield from self.adapter_up[name].parameters()

    def _tensors(self, name: str) -> dict[str, torch.Tensor]:
        down, up = self.adapter_down[name], self.adapter_up[name]
        return {
            "adapter_down.weight": down.weight,
            "adapter_down.bias": down.bias,
            "adapter_up.weight": up.weight,
            "adapter_up.bias": up.bias,
        }

    def adapter_state_dict(self, name: str, *, training: bool = False) -> dict[str, torch.Tensor]:
        return self._tensors(name)

    def load_adapter_state_dict(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        expected = self._tensors(name)
        copy_adapter_tensors(expected, state)

    def delete_adapter(self, name: str) -> None:
        del self.adapter_down[name]
        del self.adapter_up[name]
        self.nonlinearity.pop(name)
        self._active = [n for n in self._active if n != name]

    # -------------------------------------------------------------- merge
    def merge(self, name: str) -> None:
        raise MergeNotSupportedError(f"method 'adapter' (adapter {name!r}) cannot be merged: {MERGE_REFUSAL}")

    def unmerge(self, name: str) -> None:
        """Nothing is ever merged."""

    # ------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)  # (B, T, d)
        for name in self._active:
            down, up = self.adapter_down[name], self.adapter_up[name]
            h = NONLINEARITIES[self.nonlinearity[name]](down(out.to(down.weight.dtype)))  # (B, T, m)
            out = out + up(h).to(out.dtype)  # (B, T, d)
        return out

    def extra_repr(self) -> str:
        return f"features={self.features}, adapters={self.adapter_names()}"
