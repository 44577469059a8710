"""Loading a base model straight into 4-bit: the ``from_pretrained`` arguments built from qlora options."""

from __future__ import annotations

from typing import Any

import torch

from peftkit_plugins.qlora.options import QLoraOptions

__all__ = ["bnb_config", "model_load_kwargs"]


def bnb_config(options: QLoraOptions) -> Any:
    """A ``transformers.BitsAndBytesConfig`` that quantizes like ``options`` (the head stays full precision)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=options.quant_type,
        bnb_4bit_use_double_quant=options.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, options.compute_dtype),
    )


def model_load_kwargs(options: QLoraOptions) -> dict[str, Any]:
    """``{"quantization_config": ...}`` for ``AutoModel*.from_pretrained(path, **kwargs)``."""
    return {"quantization_config": bnb_config(options)}
