"""Keep bitsandbytes 4-bit layers differentiable on CPUs with AVX512-BF16.

bitsandbytes (0.50) speeds up CPU inference on AVX512-BF16 machines by
converting a ``Linear4bit`` weight, in place and for good, into a repacked
layout the first time the layer runs in eval mode on an input that does not
require grad (any ``torch.no_grad()`` evaluation). The kernel for that layout
(``gemv_4bit``) has no backward: afterwards gradients silently stop at every
converted layer (bitsandbytes only emits a ``UserWarning``), so LoRA matrices
below it stop learning and ``enable_input_require_grads`` is defeated. (For
layers whose input size is not a multiple of the 64-value block, the conversion
fails outright with a reshape error, so tiny test models crash instead.)

:func:`keep_trainable_layout` switches the conversion off
(``support_avx512bf16_for_cpu = False``) and converts back any layer that was
already converted. peftkit calls it on every ``Linear4bit`` of a model whenever
an adapter is injected into it, and on every 4-bit layer it creates. The flag
is left off after ``unload()``: losing a CPU inference speed-up is harmless,
silently broken gradients are not.
"""

from __future__ import annotations

import sys
import warnings

from torch import nn

__all__ = ["keep_trainable_layout", "is_linear4bit"]


def is_linear4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` (without importing bitsandbytes if nobody did)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def _unpack(layer: nn.Module) -> None:
    from bitsandbytes import functional

    inverse = getattr(functional, "_convert_weight_packed_for_cpu_inverse", None)
    if inverse is None:  # a bitsandbytes without the CPU layout cannot have converted it
        return
    layer.weight.data, layer.weight.quant_state = inverse(layer.weight.data, layer.weight.quant_state)
    layer.quant_state = layer.weight.quant_state


def keep_trainable_layout(model: nn.Module) -> int:
    """Stop bitsandbytes' CPU inference repacking on every ``Linear4bit`` in ``model``.

    Layers already repacked (an eval forward ran before peftkit saw them) are
    converted back. That inverse re-quantizes the block scales, so it is close
    to, not bit-identical with, the original quantization; a warning says so.

    :param model: any module; non-4-bit layers are ignored.
    :returns: how many ``Linear4bit`` layers were found.
    """
    found, restored = 0, []
    for name, module in model.named_modules():
        if not is_linear4bit(module):
            continue
        found += 1
        module.support_avx512bf16_for_cpu = False
        if getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False):
            _unpack(module)
            restored.append(name or type(module).__name__)
    if restored:
        warnings.warn(
            f"{len(restored)} bitsandbytes 4-bit layer(s) ({', '.join(restored[:3])}{', ...' if len(restored) > 3 else ''}) "
            "had been converted to the CPU inference layout, whose kernel has no backward, by an eval-mode forward "
            "pass; peftkit converted them back (block scales re-quantized, outputs may differ slightly). "
            "Wrap the model before evaluating it to avoid this.",
            UserWarning,
            stacklevel=2,
        )
    return found
