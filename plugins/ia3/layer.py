"""``IA3Layer``: a Linear-like layer whose output or input is rescaled by learned vectors.

(IA)^3 (Liu et al., 2022, https://arxiv.org/abs/2205.05638) learns one vector
``l`` per adapted layer, initialised to ones. For a layer ``y = W x + b``::

    output scaling:  y = l ⊙ (W x + b)        # l has out entries (keys, values)
    input scaling:   y = W (l ⊙ x) + b        # l has in entries (FFN activations)

Both fold exactly into the weight: output scaling multiplies the rows of ``W``
(``W`` is out x in; transformers' ``Conv1D`` stores it in x out, so there it is
the columns) and ``b``; input scaling multiplies the columns of ``W`` and leaves
``b`` alone.

Vectors are stored in ``peft``'s shapes, ``(out, 1)`` for output scaling and
``(1, in)`` for input scaling, so an exporter only renames keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from peftkit.errors import MergeNotSupportedError
from peftkit.injection import layer_features
from peftkit.targeting import innermost_base
from peftkit_plugins.ia3.options import IA3Options

__all__ = ["IA3Layer"]


def _is_conv1d(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Conv1D"  # transformers' GPT-2 layer; weight is (in, out)


@dataclass
class _MergeRecord:
    """What unmerge needs: the vector as merged, and the slices it could not be divided back from."""

    scale: torch.Tensor  # (n,) float32, a copy: training the vector while merged must not break unmerge
    kept: torch.Tensor  # indices along the scaled axis whose weight slices were saved
    weight_slices: torch.Tensor | None
    bias_values: torch.Tensor | None


class IA3Layer(nn.Module):
    """Wraps ``nn.Linear`` or transformers' ``Conv1D`` and rescales its output or input.

    The base layer is kept as ``base_layer``; each adapter has a vector
    ``ia3_l[name]`` (named after the paper's ``l_k``, ``l_v``, ``l_ff``) and a
    flag ``feedforward[name]``: ``True`` scales the input, ``False`` the output.
    A new adapter scales the output until :meth:`set_feedforward` says otherwise.
    """

    peftkit_method = "ia3"

    def __init__(self, base_layer: nn.Module, adapter_name: str, options: IA3Options):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = layer_features(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.feedforward: dict[str, bool] = {}
        self._active: list[str] = []
        self._merged: dict[str, _MergeRecord] = {}
        self.add_adapter(adapter_name, options)

    def _base(self) -> nn.Module:
        return innermost_base(self.base_layer)

    def _new_vector(self, feedforward: bool) -> nn.Parameter:
        weight = self._base().weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        return nn.Parameter(torch.ones(shape, device=weight.device, dtype=dtype))

    # ----------------------------------------------------------- adapters
    def add_adapter(self, name: str, options: IA3Options) -> None:
        self.ia3_l[name] = self._new_vector(False)
        self.feedforward[name] = False

    def set_feedforward(self, name: str, feedforward: bool) -> None:
        """Make adapter ``name`` scale this layer's input (``True``) or output (``False``); resets it to ones."""
        if name in self._merged:
            raise RuntimeError(f"ia3 adapter {name!r} is merged; unmerge it before changing what it scales")
        requires_grad = self.ia3_l[name].requires_grad
        self.ia3_l[name] = self._new_vector(feedforward).requires_grad_(requires_grad)
        self.feedforward[name] = feedforward

    def adapter_names(self) -> list[str]:
        return list(self.ia3_l.keys())

    def set_active_adapters(self, names: Sequence[str]) -> None:
        self._active = [n for n in names if n in self.ia3_l]

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        yield self.ia3_l[name]

    def adapter_state_dict(self, name: str, *, training: bool = False) -> dict[str, torch.Tensor]:
        return {"ia3_l": self.ia3_l[name]}

    def load_adapter_state_dict(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        if set(state) != {"ia3_l"}:
            raise KeyError(f"expected exactly ['ia3_l'], got {sorted(state)}")
        param = self.ia3_l[name]
        if tuple(state["ia3_l"].shape) != tuple(param.shape):
            raise ValueError(f"ia3_l has shape {tuple(state['ia3_l'].shape)}, expected {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(state["ia3_l"])

    def delete_adapter(self, name: str) -> None:
        # Never touches the base weight: merge_and_unload relies on that.
        del self.ia3_l[name]
        self.feedforward.pop(name)
        self._merged.pop(name, None)
        self._active = [n for n in self._active if n != name]

    # -------------------------------------------------------------- merge
    def _scaled_axis(self, name: str) -> int:
        """The weight axis adapter ``name`` scales: Linear weight is (out, in), Conv1D (in, out)."""
        out_axis, in_axis = (1, 0) if _is_conv1d(self._base()) else (0, 1)
        return in_axis if self.feedforward[name] else out_axis

    def merge(self, name: str) -> None:
        """Multiply the base weight (and, for output scaling, the bias) by the vector.

        Entries too small to divide back by (zero, below the weight dtype's
        machine epsilon, or not finite) would lose the base weights they scale,
        so their weight slices (and bias entries) are copied first and restored
        by :meth:`unmerge`; every other slice is divided back.
        """
        if name in self._merged:
            return
        base = self._base()
        weight = base.weight
        if not weight.dtype.is_floating_point:
            raise MergeNotSupportedError(
                f"method 'ia3' (adapter {name!r}) cannot be merged into {type(base).__name__}: its weight is stored "
                f"as {weight.dtype} (quantized); merge into a full-precision copy of the base model instead"
            )
        axis = self._scaled_axis(name)
        scale = self.ia3_l[name].detach().flatten().to(torch.promote_types(weight.dtype, torch.float32))  # (n,)
        kept = torch.nonzero(~torch.isfinite(scale) | (scale.abs() < torch.finfo(weight.dtype).eps)).flatten()
        bias = base.bias if not self.feedforward[name] else None
        has_kept = kept.numel() > 0
        record = _MergeRecord(
            scale=scale.clone(),
            kept=kept,
            weight_slices=weight.detach().index_select(axis, kept).clone() if has_kept else None,
            bias_values=bias.detach()[kept].clone() if (has_kept and bias is not None) else None,
        )
        shape = [1, 1]
        shape[axis] = -1
        with torch.no_grad():
            weight.copy_((weight.to(scale.dtype) * scale.view(shape)).to(weight.dtype))
            if bias is not None:
                bias.copy_((bias.to(scale.dtype) * scale).to(bias.dtype))
        self._merged[name] = record

    def unmerge(self, name: str) -> None:
        record = self._merged.pop(name, None)
        if record is None:
            return
        base = self._base()
        weight = base.weight
        axis = self._scaled_axis(name)
        divisor = record.scale.clone()
        divisor[record.kept] = 1.0  # those slices are restored from the copies below
        shape = [1, 1]
        shape[axis] = -1
        bias = base.bias if not self.feedforward[name] else None
        with torch.no_grad():
            weight.copy_((weight.to(divisor.dtype) / divisor.view(shape)).to(weight.dtype))
            if record.weight_slices is not None:
                weight.index_copy_(axis, record.kept, record.weight_slices)
            if bias is not None:
                bias.copy_((bias.to(divisor.dtype) / divisor).to(bias.dtype))
                if record.bias_values is not None:
                    bias[record.kept] = record.bias_values

    # ------------------------------------------------------------ forward
    def _scale(self, feedforward: bool) -> torch.Tensor | None:
        scale = None
        for name in self._active:
            if name in self._merged or self.feedforward[name] != feedforward:
                continue
            vector = self.ia3_l[name].flatten()
            scale = vector if scale is None else scale * vector
        return scale

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        input_scale = self._scale(True)  # (in,)
        if input_scale is not None:
            x = (x.to(input_scale.dtype) * input_scale).to(x.dtype)  # (B, T, in)
        out = self.base_layer(x, *args, **kwargs)  # (B, T, out)
        output_scale = self._scale(False)  # (out,)
        if output_scale is not None:
            out = (out * output_scale).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={self.adapter_names()}"
