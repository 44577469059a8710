"""``ReferenceModel``: a TunedModel's base model (or one of its adapters) as a separate reference model, without a copy.

Preference and RL trainers compare the policy with a frozen reference. With a
``peft.PeftModel`` TRL gets it by disabling the adapter (trl/trainer/dpo_trainer.py:909
and :1328); for any other model it loads a second copy of the base from
``config.name_or_path`` (dpo_trainer.py:926-927, grpo_trainer.py:1003). ``ReferenceModel(tuned)``
is the peftkit equivalent to pass as ``ref_model=``: it runs the same modules as
``tuned`` inside :meth:`TunedModel.disable_adapters` (or with a frozen reference
adapter active), so it costs no memory.

It has the shape of a transformers causal LM (``config``, ``base_model`` = the
decoder, ``get_output_embeddings()``, ``forward``), which is what TRL's fused
LM head (``trl.trainer.add_fused_lm_head``) reads.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from torch import nn

from peftkit.tuned_model import TunedModel

__all__ = ["ReferenceModel"]


@contextlib.contextmanager
def _reference_state(tuned: TunedModel, adapter_name: str | None) -> Iterator[None]:
    """The base model (``adapter_name=None``) or adapter ``adapter_name`` active inside the block."""
    if adapter_name is None:
        with tuned.disable_adapters():
            yield
        return
    previous = tuned.active_adapter
    tuned.set_adapter(adapter_name)
    try:
        yield
    finally:
        if previous is not None:
            tuned.set_adapter(previous)


class _DecoderInReferenceState(nn.Module):
    """The base model's decoder, run in the reference state."""

    def __init__(self, reference: "ReferenceModel", decoder: nn.Module):
        super().__init__()
        self.decoder = decoder
        object.__setattr__(self, "_reference", reference)  # not a submodule: no cycle

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        reference = self._reference
        with _reference_state(reference.tuned, reference.adapter_name):
            return self.decoder(*args, **kwargs)


class ReferenceModel(nn.Module):
    """``tuned`` with its adapters disabled (or adapter ``adapter_name`` active), as a model of its own.

    Calls run ``tuned``'s modules (no copy of any weight), switched to the
    reference state for the call and back afterwards.

    :param tuned: the policy being trained.
    :param adapter_name: ``None`` (default): the reference is the bare base model,
        right for a fresh LoRA adapter (which starts at the base); the name of a
        frozen adapter (e.g. the SFT adapter loaded a second time with
        ``tuned.load_adapter(path, "reference")``): the reference is that adapter.
    """

    def __init__(self, tuned: TunedModel, adapter_name: str | None = None):
        super().__init__()
        if adapter_name is not None:
            tuned.adapter_info(adapter_name)  # raises for an unknown name
        object.__setattr__(self, "tuned", tuned)  # not a submodule: the policy owns its parameters
        self.adapter_name = adapter_name
        hf_model = tuned.base_model
        decoder = getattr(hf_model, "base_model", hf_model)
        self.base_model = _DecoderInReferenceState(self, decoder)
        self.config = tuned.config

    def get_output_embeddings(self) -> nn.Module:
        return self.tuned.get_output_embeddings()

    def get_input_embeddings(self) -> nn.Module:
        return self.tuned.get_input_embeddings()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with _reference_state(self.tuned, self.adapter_name):
            return self.tuned(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with _reference_state(self.tuned, self.adapter_name):
            return self.tuned.generate(*args, **kwargs)
