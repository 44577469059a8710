"""``Lora4bitLayer``: LoRA on a bitsandbytes 4-bit Linear, with a merge that does not lose the update.

Forward is LoRA's (Hu et al., 2021, https://arxiv.org/abs/2106.09685) on a
4-bit base, as in QLoRA (Dettmers et al., 2023, https://arxiv.org/abs/2305.14314)::

    h = dequant(W_4bit) x + (alpha / r) * B A dropout(x)

DoRA (``use_dora``) works as on a full-precision base, with ``W = dequant(W_4bit)``:
its row norms are cached, and ``W A^T`` dequantizes the weight once per forward (as peft does).

``A`` and ``B`` stay in float32 whatever the compute dtype, as in the paper's
mixed-precision setup for adapters.

Merging cannot go into the packed 4-bit weight: re-quantizing ``W + scale B A``
adds a fresh 4-bit rounding error about as large as a typical update itself
(an update of 1.5% of ``||W||`` comes back with an error of ~100% of its own
size), so the update would be lost in the noise. So ``merge``
swaps the 4-bit layer for a full-precision ``nn.Linear`` holding
``dequant(W_4bit) + scale B A`` and keeps the 4-bit layer aside; ``unmerge``
puts the very same 4-bit layer back (bit-exact), and ``merge_and_unload``
returns a model whose adapted layers are those full-precision Linears.
While merged, the adapted layers cost full-precision memory again.
"""

from __future__ import annotations

import torch
from torch import nn

from peftkit_plugins.lora.layer import LoraLayer
from peftkit_plugins.lora.options import LoraOptions
from peftkit_plugins.qlora.cpu_layout import is_linear4bit
from peftkit_plugins.qlora.quantize import dequantize_to_linear

__all__ = ["Lora4bitLayer"]


class Lora4bitLayer(LoraLayer):
    """LoRA wrapper for ``bitsandbytes.nn.Linear4bit`` (possibly under other adapter wrappers).

    Everything but merging is :class:`~peftkit_plugins.lora.layer.LoraLayer`'s;
    ``peftkit_method`` is the method that created the wrapper (``"lora"`` or
    ``"qlora"``), so each method's adapters share a wrapper only with their own kind.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, options: LoraOptions, *, method: str = "lora"):
        super().__init__(base_layer, adapter_name, options)
        self.peftkit_method = method
        # A plain list, not a submodule: the 4-bit layer set aside while merged
        # must not appear in state_dict() or named_modules().
        # The CPU-layout guard (cpu_layout.py) runs on the whole model after
        # injection (peftkit_after_inject), so that it also covers the 4-bit
        # layers no adapter wraps.
        self._set_aside: list[nn.Module] = []

    def dense_base_weight(self) -> torch.Tensor:
        """``dequant(W_4bit)`` (out x in) for DoRA's norm (computed afresh, as peft does); the dense weight while merged."""
        inner = self._innermost()
        if not is_linear4bit(inner):
            return super().dense_base_weight()
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(inner.weight.data, inner.weight.quant_state)

    def _innermost_holder(self) -> nn.Module:
        """The wrapper whose ``base_layer`` is the innermost (4-bit or, while merged, dense) layer."""
        holder: nn.Module = self
        while isinstance(getattr(holder.base_layer, "base_layer", None), nn.Module):
            holder = holder.base_layer
        return holder

    def merge(self, name: str) -> None:
        if name in self._merged:
            return
        holder = self._innermost_holder()
        if is_linear4bit(holder.base_layer):
            self._set_aside.append(holder.base_layer)
            holder.base_layer = dequantize_to_linear(holder.base_layer)
        # else: another adapter's merge already made it full precision
        self.merge_into(holder.base_layer.weight, name)
        self._merged.add(name)

    def unmerge(self, name: str) -> None:
        if name not in self._merged:
            return
        holder = self._innermost_holder()
        self._merged.discard(name)
        if not self._merged and self._set_aside:
            holder.base_layer = self._set_aside.pop()  # the original 4-bit layer, untouched
            self._merge_norms.pop(name, None)
            return
        self.unmerge_from(holder.base_layer.weight, name)

    def delete_adapter(self, name: str) -> None:
        # merge_and_unload deletes merged adapters and keeps the merged
        # full-precision layer; the 4-bit original is then dropped.
        super().delete_adapter(name)
        if not self._merged:
            self._set_aside.clear()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, method={self.peftkit_method!r}"
