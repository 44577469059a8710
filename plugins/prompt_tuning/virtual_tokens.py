"""Virtual-token insertion: the machinery shared by the input-side methods (prompt tuning, P-tuning).

An input-side method learns ``P`` virtual-token embeddings ``E`` (P x H) and
runs the frozen decoder on ``[E; embed(x)]`` instead of ``embed(x)``. Everything
else here exists to keep that invisible to the code around the decoder:

* a forward **pre-hook** on the model's decoder (``model.base_model``: e.g.
  ``LlamaModel``, ``GPT2Model``) prepends ``E`` to the input embeddings, extends
  the 2-D attention mask with ones and places the virtual tokens at positions
  ``0..P-1`` and the real tokens at ``P + their padding-aware position``
  (``cumsum(mask) - 1``), so a left-padded and a right-padded row see the same
  positions for the same real tokens;
* a forward **hook** cuts the virtual positions off the decoder's output, so the
  head (LM head, classification or value head), the loss, ``logits`` and
  ``hidden_states`` are aligned with ``input_ids`` as in the base model. Labels
  therefore never need padding: the virtual positions have no output, which is
  the same as labelling them -100;
* during ``generate()`` (transformers 5.x: ``input_ids``/``inputs_embeds``,
  ``attention_mask``, ``position_ids`` and ``past_key_values``, no
  ``cache_position``), the first forward with an empty cache prepends; later
  forwards (non-empty cache, which then holds the virtual tokens) only extend
  the mask and shift the positions by ``P``. ``generate`` itself never learns of
  the virtual tokens and returns prompt + new tokens only.

Hooking the decoder rather than the top-level model keeps the head's inputs
(``input_ids`` for a classifier's last-token lookup, ``labels``) untouched.

Compared with Hugging Face ``peft`` (same virtual tokens, same logits on the
real positions): ``peft`` returns logits for the virtual positions too, scores
the first real token from the last virtual position in its loss (peftkit does
not: the base model never scores a first token either), and ignores
``position_ids``, so its left-padded rows are shifted by their padding where
peftkit's match the unpadded row.

Limits: 2-D attention masks only (no custom 4-D masks, so no static/compiled
caches, whose masks ``generate`` builds without the virtual tokens); a
non-empty cache passed in is assumed to come from this adapter; ``attentions``
outputs keep their virtual rows and columns.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import torch
from torch import nn

from peftkit.compat import find_cache
from peftkit.errors import MergeNotSupportedError, TargetError

__all__ = [
    "MERGE_REFUSAL",
    "PromptSource",
    "VirtualTokenAdapter",
    "VirtualTokenInserter",
    "find_decoder",
    "find_input_embeddings",
    "real_positions",
]

MERGE_REFUSAL = (
    "its virtual tokens are extra input embeddings prepended to every sequence, not a change of the base weights, "
    "so there is nothing to fold into the model; keep the adapter loaded (or export it) for inference"
)


# --------------------------------------------------------------------- model lookup
def find_decoder(model: nn.Module) -> nn.Module:
    """The module that turns ``input_ids``/``inputs_embeds`` into hidden states (``model.base_model``).

    :raises TargetError: for encoder-decoder models, or a decoder whose ``forward``
        takes no ``inputs_embeds``.
    """
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise TargetError(
            f"virtual tokens support decoder-only models; {type(model).__name__} is an encoder-decoder model"
        )
    decoder = getattr(model, "base_model", None)
    decoder = decoder if isinstance(decoder, nn.Module) else model
    params = inspect.signature(decoder.forward).parameters
    if "inputs_embeds" not in params:
        raise TargetError(
            f"cannot insert virtual tokens into {type(model).__name__}: its decoder {type(decoder).__name__}.forward "
            "takes no 'inputs_embeds' argument; use a transformers decoder-only model"
        )
    return decoder


def find_input_embeddings(model: nn.Module) -> tuple[str, nn.Module]:
    """``(name, module)`` of the model's input embedding (``get_input_embeddings()``)."""
    getter = getattr(model, "get_input_embeddings", None)
    embeddings = getter() if callable(getter) else None
    if not isinstance(embeddings, nn.Module) or getattr(embeddings, "weight", None) is None:
        raise TargetError(
            f"cannot find the input embedding of {type(model).__name__}: get_input_embeddings() returned "
            f"{type(embeddings).__name__}; use a transformers model with a token embedding"
        )
    for name, module in model.named_modules():
        if module is embeddings:
            return name, module
    raise TargetError(f"the input embedding of {type(model).__name__} is not one of its submodules")


def real_positions(attention_mask: torch.Tensor | None, length: int, device: torch.device) -> torch.Tensor:
    """Padding-aware positions of the last ``length`` real-token slots: ``cumsum(mask) - 1`` (pads at 0).

    Same formula as transformers' ``generate``, so a forward pass and the first
    generation step agree. Without a mask: ``0..length-1``.
    """
    if attention_mask is None:
        return torch.arange(length, device=device).unsqueeze(0)  # (1, T)
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 0)
    return positions[:, -length:]  # (B, T)


# ------------------------------------------------------------------ the hooks
class VirtualTokenInserter:
    """Installs the pre-hook and hook described in the module docstring on a model's decoder.

    :param model: the base transformers model (its decoder gets the hooks).
    :param prompt: returns the virtual-token embeddings, ``(P, H)``; called only
        on forwards that prepend them (not on cached generation steps).
    :param num_virtual_tokens: ``P``.
    :param is_active: whether to act on this forward (``False`` gives the exact base model).
    """

    def __init__(
        self,
        model: nn.Module,
        prompt: Callable[[], torch.Tensor],
        num_virtual_tokens: int,
        is_active: Callable[[], bool],
    ):
        self.decoder = find_decoder(model)
        _, self.embeddings = find_input_embeddings(model)
        self._prompt = prompt
        self.num_virtual_tokens = num_virtual_tokens
        self._is_active = is_active
        # Positional arguments differ between architectures (GPT2Model takes
        # past_key_values second), so they are mapped to names before editing.
        self._positional = [
            p.name
            for p in inspect.signature(self.decoder.forward).parameters.values()
            if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        ]
        self._real_length: int | None = None  # set by the pre-hook when the output must be cut
        self._handles = [
            self.decoder.register_forward_pre_hook(self._before, with_kwargs=True),
            self.decoder.register_forward_hook(self._after, with_kwargs=True),
        ]

    def remove(self) -> None:
        """Remove both hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -------------------------------------------------------------- pre-hook
    def _before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        self._real_length = None
        if not self._is_active():
            return None
        if len(args) > len(self._positional):
            raise TypeError(f"{type(module).__name__}.forward got {len(args)} positional arguments")
        kw = {**dict(zip(self._positional, args)), **kwargs}
        input_ids, inputs_embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        if input_ids is None and inputs_embeds is None:
            return None  # let the decoder raise its own error
        batch, length = (inputs_embeds if inputs_embeds is not None else input_ids).shape[:2]
        device = (inputs_embeds if inputs_embeds is not None else input_ids).device
        cache = find_cache(kw)
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        mask = kw.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            raise ValueError(
                "virtual-token adapters need a 2-D attention_mask (batch, sequence) or none; got "
                f"{type(mask).__name__}{'' if not isinstance(mask, torch.Tensor) else f' of shape {tuple(mask.shape)}'}"
                "; pass the tokenizer's 2-D mask and use the default dynamic cache (no static cache)"
            )

        num_virtual = self.num_virtual_tokens
        if past == 0:
            prompt = self._prompt()  # (P, H)
            if inputs_embeds is None:
                inputs_embeds = self.embeddings(input_ids)  # (B, T, H)
            virtual = prompt.to(inputs_embeds.dtype).unsqueeze(0).expand(batch, -1, -1)  # (B, P, H)
            kw["input_ids"] = None
            kw["inputs_embeds"] = torch.cat([virtual, inputs_embeds], dim=1)  # (B, P+T, H)
            self._real_length = length
        if mask is not None:
            real_past = past - num_virtual if past else 0
            if mask.shape[1] != real_past + length:
                raise ValueError(
                    f"attention_mask has {mask.shape[1]} columns, expected {real_past + length}: the cache holds {past} "
                    f"positions ({num_virtual} of them virtual tokens) and {length} new tokens arrive; pass the mask of "
                    "the real tokens only, and a cache filled with this adapter active (or none)"
                )
            ones = torch.ones(mask.shape[0], num_virtual, dtype=mask.dtype, device=mask.device)
            kw["attention_mask"] = torch.cat([ones, mask], dim=1)  # (B, P + real_past + T)

        positions = kw.get("position_ids")
        if positions is None and (past == 0 or mask is not None):
            positions = real_positions(mask, length, device)
        if positions is not None:
            positions = positions + num_virtual
            if past == 0:
                virtual_positions = torch.arange(num_virtual, device=positions.device, dtype=positions.dtype)
                virtual_positions = virtual_positions.expand(*positions.shape[:-1], num_virtual)
                positions = torch.cat([virtual_positions, positions], dim=-1)  # (..., P+T)
            kw["position_ids"] = positions
        # Without mask or positions on a later step the decoder counts from the
        # cache length, which already includes the virtual tokens.

        token_types = kw.get("token_type_ids")
        if token_types is not None and past == 0:
            kw["token_type_ids"] = torch.cat([token_types.new_zeros(*token_types.shape[:-1], num_virtual), token_types], dim=-1)
        return (), kw

    # ------------------------------------------------------------------ hook
    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        length, self._real_length = self._real_length, None
        if length is None:
            return None
        if isinstance(output, tuple):
            return (output[0][:, -length:], *output[1:])
        output.last_hidden_state = output.last_hidden_state[:, -length:]  # (B, T, H)
        hidden_states = getattr(output, "hidden_states", None)
        if hidden_states is not None:
            output.hidden_states = tuple(h[:, -length:] for h in hidden_states)
        return output


# ------------------------------------------------------------ the adapter module
class PromptSource(Protocol):
    """What produces one adapter's virtual tokens (prompt embeddings, a prompt encoder, ...)."""

    num_virtual_tokens: int

    def forward(self) -> torch.Tensor:
        """The virtual-token embeddings, ``(P, H)``."""
        ...

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def prompt_state_dict(self, *, training: bool) -> dict[str, torch.Tensor]:
        """Tensors to save (``training=True``: also training-only state)."""
        ...

    def load_prompt_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load tensors from :meth:`prompt_state_dict` (either form)."""
        ...


class VirtualTokenAdapter(nn.Module):
    """One input-side adapter: a prompt source plus the decoder hooks; satisfies ``AdapterLayer``.

    :param model: the base transformers model.
    :param adapter_name: the adapter's name.
    :param prompt: a module satisfying :class:`PromptSource`, stored as ``self.prompt``.
    """

    def __init__(self, model: nn.Module, adapter_name: str, prompt: nn.Module):
        super().__init__()
        self.prompt = prompt
        self._name: str | None = adapter_name
        self._active = False
        self._inserter = VirtualTokenInserter(
            model, prompt=self.prompt, num_virtual_tokens=prompt.num_virtual_tokens, is_active=self.is_active
        )

    def is_active(self) -> bool:
        # A bound method, not a lambda, so copy.deepcopy of the model rebinds it to the copy.
        return self._active

    def adapter_names(self) -> list[str]:
        return [self._name] if self._name is not None else []

    def set_active_adapters(self, names: Sequence[str]) -> None:
        self._active = self._name is not None and self._name in names

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        self._check(name)
        yield from self.prompt.parameters()

    def adapter_state_dict(self, name: str, *, training: bool = False) -> dict[str, torch.Tensor]:
        self._check(name)
        return self.prompt.prompt_state_dict(training=training)

    def load_adapter_state_dict(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        self._check(name)
        self.prompt.load_prompt_state_dict(state)

    def delete_adapter(self, name: str) -> None:
        self._check(name)
        self._inserter.remove()
        self._name = None
        self._active = False

    def merge(self, name: str) -> None:
        raise MergeNotSupportedError(f"adapter {name!r} cannot be merged: {MERGE_REFUSAL}")

    def unmerge(self, name: str) -> None:
        """Nothing is ever merged, so there is nothing to undo."""

    def _check(self, name: str) -> None:
        if name != self._name:
            raise KeyError(f"this virtual-token module holds adapter {self._name!r}, not {name!r}")

    def extra_repr(self) -> str:
        return f"adapter={self._name!r}, active={self._active}"
