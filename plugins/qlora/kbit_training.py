"""Preparing a model with a quantized base for training (QLoRA's "k-bit training" setup).

Two things, both done by the ``qlora`` method when it injects an adapter:

* norms and the output head are cast to float32: they stay full precision in
  QLoRA, and low-precision norms are the usual cause of unstable k-bit training
  (irreversible, like the quantization itself; a no-op on float32 models);
* the input embeddings' output is marked as requiring grad
  (``enable_input_require_grads``-style), so that activation checkpointing,
  which only recomputes segments whose inputs require grad, still sends
  gradients to the adapters inside a frozen base. That hook belongs to the
  adapter: :class:`InputGradients` is attached to it and removes the hook when
  the adapter is deleted or unloaded.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

__all__ = ["cast_norms_and_head_to_float32", "InputGradients"]


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.lower().endswith("norm")


def cast_norms_and_head_to_float32(model: nn.Module) -> int:
    """Cast the floating-point parameters of every norm layer and of the output head to float32, in place.

    :returns: how many parameters were cast (0 for a float32 model).
    """
    modules = [m for m in model.modules() if _is_norm(m)]
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if isinstance(head, nn.Module):
        modules.append(head)
    cast = 0
    for module in modules:
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != torch.float32:
                param.data = param.data.float()
                cast += 1
    return cast


def _require_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
    output.requires_grad_(True)  # (B, T, C) embeddings: a leaf, since the embedding table is frozen


class InputGradients(nn.Module):
    """Attached adapter module owning the input-embedding hook (see the module docstring).

    It satisfies :class:`peftkit.registry.AdapterLayer` with no parameters and
    no state: saving, loading and merging pass through it.
    """

    def __init__(self, model: nn.Module, adapter_name: str):
        super().__init__()
        self._name = adapter_name
        get_embeddings = getattr(model, "get_input_embeddings", None)
        embeddings = get_embeddings() if callable(get_embeddings) else None
        self._handle = embeddings.register_forward_hook(_require_grad) if isinstance(embeddings, nn.Module) else None

    @property
    def hooked(self) -> bool:
        """Whether an input-embedding hook is installed (``False`` for models without ``get_input_embeddings``)."""
        return self._handle is not None

    def adapter_names(self) -> list[str]:
        return [self._name] if self._name is not None else []

    def set_active_adapters(self, names: Sequence[str]) -> None:
        pass  # harmless when the adapter is inactive, so always on while it exists

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        return iter(())

    def adapter_state_dict(self, name: str, *, training: bool = False) -> dict[str, torch.Tensor]:
        return {}

    def load_adapter_state_dict(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise KeyError(f"unexpected {sorted(state)}")

    def delete_adapter(self, name: str) -> None:
        if name != self._name:
            return
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._name = None

    def merge(self, name: str) -> None:
        pass

    def unmerge(self, name: str) -> None:
        pass

    def extra_repr(self) -> str:
        return f"adapter={self._name!r}, hooked={self.hooked}"
