"""Options of the ``qlora`` method: the LoRA options plus how the base is quantized."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from peftkit_plugins.lora.options import LoraOptions

__all__ = ["QLoraOptions", "COMPUTE_DTYPES"]

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class QLoraOptions(LoraOptions):
    """QLoRA options: every :class:`~peftkit_plugins.lora.options.LoraOptions` field, plus:

    Attributes:
        bits: bits per quantized base weight; only ``4`` (bitsandbytes ``Linear4bit``).
        quant_type: ``"nf4"`` (NormalFloat4, the paper's data type for normally
            distributed weights) or ``"fp4"``.
        double_quant: also quantize the per-block scales (absmax) to 8 bits,
            saving ~0.37 bit per parameter (the paper's "double quantization").
        compute_dtype: dtype the 4-bit weights are dequantized to for the
            matmul. ``"float32"`` is the default because it is the fast and exact
            choice on CPU; on GPU, ``"bfloat16"`` is the paper's setting.
    """

    bits: int = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def validate(self) -> list[str]:
        problems = super().validate()
        if self.bits != 4:
            problems.append(
                f"option 'bits' = {self.bits!r} is not supported; qlora quantizes the base to 4 bits only "
                "(bits=4), use method 'lora' on a model loaded in 8-bit instead"
            )
        return problems
