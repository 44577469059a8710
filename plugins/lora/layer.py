"""``LoraLayer``: a Linear-like layer plus low-rank updates, one per adapter name.

LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685) keeps the base weight
``W`` frozen and learns ``A`` (r x in) and ``B`` (out x r)::

    h = W x + (alpha / r) * B A dropout(x)

``B`` starts at zero, so the wrapped layer starts exactly at the base layer.

With ``use_dora`` (DoRA, Liu et al., 2024, https://arxiv.org/abs/2402.09353)
the adapted weight is split into a trainable magnitude ``m`` (one per output
feature, started at the row norms of ``W``) and a direction::

    W' = m * (W + s B A) / ||W + s B A||_row          # s = alpha / r
    h  = W' x = W x + (m / n - 1) * W x + (m / n) * s * B A x,   n = ||W + s B A||_row

The norm ``n`` is treated as a constant in the backward pass (detached, as the
paper's section 4.3 and peft do). It is computed without building the
``out x in`` matrix ``W + s B A``: ``n^2 = ||W||^2 + 2 s <W, B A> + s^2 ||B A||^2``
row by row, where ``||W||^2`` is cached (the base is frozen) and
``<W, B A>_row = rowsum(B * (W A^T))`` costs one ``out x in x r`` product.
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

__all__ = ["LoraLayer", "lora_delta_weight", "MAGNITUDE_KEY"]

#: The DoRA magnitude's key in a saved adapter (peft's name, so the peft format only adds its prefix).
MAGNITUDE_KEY = "lora_magnitude_vector"


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
        self.lora_magnitude = nn.ParameterDict()  # DoRA adapters only: (out,)
        self._row_norms_sq: tuple[tuple[Any, ...], torch.Tensor] | None = None  # (key, ||W||^2 per row)
        self._merge_norms: dict[str, torch.Tensor] = {}  # DoRA: the norm n used by merge, for unmerge
        self._norms: dict[str, tuple[tuple[Any, ...], torch.Tensor]] = {}  # DoRA: n, until A, B or W change
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self._active: list[str] = []
        self._merged: set[str] = set()
        self.add_adapter(adapter_name, options)

    def _innermost(self) -> nn.Module:
        inner = self.base_layer
        while isinstance(getattr(inner, "base_layer", None), nn.Module):
            inner = inner.base_layer
        return inner

    def _base_weight(self) -> torch.Tensor:
        return self._innermost().weight

    def dense_base_weight(self) -> torch.Tensor:
        """The base weight as a dense ``(out, in)`` tensor (a view where possible; quantized layers override this)."""
        weight = self._base_weight()
        return weight.T if _is_conv1d(self.base_layer) else weight

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
        if options.use_dora:  # m starts at n, so the layer starts exactly at the base layer
            self.lora_magnitude[name] = nn.Parameter(self.dora_norm(name).to(dtype))

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def set_active_adapters(self, names: Sequence[str]) -> None:
        self._active = [n for n in names if n in self.lora_A]

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        yield self.lora_A[name]
        yield self.lora_B[name]
        if name in self.lora_magnitude:
            yield self.lora_magnitude[name]

    def adapter_state_dict(self, name: str, *, training: bool = False) -> dict[str, torch.Tensor]:
        state = {"lora_A.weight": self.lora_A[name], "lora_B.weight": self.lora_B[name]}
        if name in self.lora_magnitude:
            state[MAGNITUDE_KEY] = self.lora_magnitude[name]
        return state

    def load_adapter_state_dict(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        copy_adapter_tensors(self.adapter_state_dict(name), state)

    def delete_adapter(self, name: str) -> None:
        # Never touches the base weight: merge_and_unload relies on that.
        del self.lora_A[name]
        del self.lora_B[name]
        if name in self.lora_magnitude:
            del self.lora_magnitude[name]
        self._merge_norms.pop(name, None)
        self._norms.pop(name, None)
        self.scaling.pop(name)
        self.dropout.pop(name)
        self._merged.discard(name)
        self._active = [n for n in self._active if n != name]

    # -------------------------------------------------------------- merge
    def delta_weight(self, name: str) -> torch.Tensor:
        """``scale * B @ A`` in the base weight's layout."""
        delta = lora_delta_weight(self.lora_A[name], self.lora_B[name], self.scaling[name])
        return delta.T if _is_conv1d(self.base_layer) else delta

    def merge_into(self, weight: torch.Tensor, name: str) -> None:
        """Fold adapter ``name`` into ``weight`` (the base weight, in its own layout) in place.

        LoRA adds ``scale B A``; DoRA writes ``(m / n) * (W + scale B A)`` row by row,
        with ``n`` from the unmerged ``W`` (kept for :meth:`unmerge_from`).
        """
        with torch.no_grad():
            delta = self.delta_weight(name)
            if name not in self.lora_magnitude:
                weight.add_(delta.to(weight.dtype))
                return
            norm = self.dora_norm(name)
            self._merge_norms[name] = norm
            factor = self._dora_factor(name, norm)
            weight.copy_((factor * (weight.to(delta.dtype) + delta)).to(weight.dtype))

    def unmerge_from(self, weight: torch.Tensor, name: str) -> None:
        """Undo :meth:`merge_into` on ``weight`` (within floating-point rounding)."""
        with torch.no_grad():
            delta = self.delta_weight(name)
            if name not in self.lora_magnitude:
                weight.sub_(delta.to(weight.dtype))
                return
            factor = self._dora_factor(name, self._merge_norms.pop(name))
            weight.copy_((weight.to(delta.dtype) / factor - delta).to(weight.dtype))

    def _dora_factor(self, name: str, norm: torch.Tensor) -> torch.Tensor:
        """``m / n`` shaped to scale the rows of ``W`` (its columns for ``Conv1D``'s in x out weight)."""
        factor = self.lora_magnitude[name].detach().to(norm.dtype) / norm
        return factor.view(1, -1) if _is_conv1d(self.base_layer) else factor.view(-1, 1)

    def merge(self, name: str) -> None:
        if name in self._merged:
            return
        self.merge_into(self._base_weight(), name)
        self._merged.add(name)

    def unmerge(self, name: str) -> None:
        if name not in self._merged:
            return
        self.unmerge_from(self._base_weight(), name)
        self._merged.discard(name)

    # --------------------------------------------------------------- DoRA
    def _base_row_norms_sq(self) -> torch.Tensor:
        """``||W||^2`` of each output row, in float32, cached until the base weight changes (merge, ``.to()``)."""
        weight = self._base_weight()
        key = (id(weight), weight._version, weight.device, weight.dtype)
        if self._row_norms_sq is not None and self._row_norms_sq[0] == key:
            return self._row_norms_sq[1]
        norms_sq = self.dense_base_weight().detach().float().square().sum(dim=1)
        if type(norms_sq).__name__ != "FakeTensor":  # a shape rehearsal (adapter_io) must leave no fake tensor behind
            self._row_norms_sq = (key, norms_sq)
        return norms_sq

    def dora_norm(self, name: str) -> torch.Tensor:
        """``n = ||W + scale B A||`` per output row, float32, without grad and without an ``out x in`` temporary.

        Kept until ``A``, ``B`` or the base weight change (their in-place version counters): generation and
        activation checkpointing's second forward reuse it; each optimizer step computes it once.
        """
        a_param, b_param, weight = self.lora_A[name], self.lora_B[name], self._base_weight()
        key = tuple((id(t), t._version, t.device, t.dtype) for t in (a_param, b_param, weight)) + (self.scaling[name],)
        cached = self._norms.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        norm = self._compute_dora_norm(name)
        if type(norm).__name__ != "FakeTensor":
            self._norms[name] = (key, norm)
        return norm

    def _compute_dora_norm(self, name: str) -> torch.Tensor:
        with torch.no_grad():
            a = self.lora_A[name].detach().float()  # (r, in)
            b = self.lora_B[name].detach().float()  # (out, r)
            s = self.scaling[name]
            wa = self._base_times(a)  # (out, r) = W A^T
            cross = (b * wa).sum(dim=1)  # <W, B A> per row
            ba_sq = ((b @ (a @ a.T)) * b).sum(dim=1)  # ||B A||^2 per row
            return (self._base_row_norms_sq() + 2 * s * cross + s * s * ba_sq).clamp_min(0).sqrt()

    def _base_times(self, a: torch.Tensor) -> torch.Tensor:
        """``W A^T`` (out x r) in float32, from the dense base weight."""
        weight = self.dense_base_weight().detach()
        return (weight.float() @ a.T) if weight.dtype != torch.float32 else weight @ a.T

    # ------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)  # (B, T, out)
        for name in self._active:
            if name in self._merged:
                continue
            if name in self.lora_magnitude:
                out = self._dora_forward(name, x, out)
                continue
            a, b = self.lora_A[name], self.lora_B[name]
            xa = x.to(a.dtype)
            p = self.dropout[name]
            h = dropout_linear(xa, a, p) if (p > 0.0 and self.training) else F.linear(xa, a)  # (B, T, r)
            # Scaling B (out x r) is cheaper than scaling the (B, T, out) result.
            out = out + F.linear(h, b * self.scaling[name]).to(out.dtype)
        return out

    def _dora_forward(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out + (m / n - 1) * W x + (m / n) * scale * B A x``; ``W x`` is ``out`` less the bias unless dropout is on."""
        a, b = self.lora_A[name], self.lora_B[name]
        xa = x.to(a.dtype)
        p = self.dropout[name]
        bias = getattr(self._innermost(), "bias", None)
        if p > 0.0 and self.training:  # W must see the same dropped input as B A
            xa = F.dropout(xa, p, training=True)
            base = F.linear(xa, self.dense_base_weight().to(xa.dtype))  # (B, T, out)
        else:
            base = out.to(a.dtype) if bias is None else (out - bias).to(a.dtype)
        scale = self.lora_magnitude[name] / self.dora_norm(name).to(a.dtype)  # (out,); n is a constant for autograd
        update = F.linear(F.linear(xa, a), b * self.scaling[name])  # (B, T, out); scaling B, not the result
        return out + ((scale - 1) * base + scale * update).to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={self.adapter_names()}"


def lora_delta_weight(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling * B @ A`` (out x in), computed in float32 at least for a precise merge."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    return (b.to(dtype) @ a.to(dtype)) * scaling
