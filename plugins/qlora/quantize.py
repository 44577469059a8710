"""Turning full-precision Linear layers into bitsandbytes 4-bit ones, and back.

QLoRA (Dettmers et al., 2023, https://arxiv.org/abs/2305.14314) stores each
frozen base weight ``W`` (out x in) as 4-bit codes in blocks of 64 values, each
block with its own scale (absmax); with double quantization those scales are
themselves 8-bit with a second-level scale per 256 blocks. The matmul
dequantizes on the fly::

    W x  ~=  dequant(W_4bit, absmax) x          # in the compute dtype

``quantize_layer`` is irreversible (4-bit codes cannot give back ``W``);
``dequantize_to_linear`` builds a full-precision ``nn.Linear`` holding
``dequant(W_4bit)``, which is what merging an adapter needs.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from peftkit.errors import TargetError
from peftkit.injection import replace_module
from peftkit.targeting import TargetSpec, find_targets, innermost_base
from peftkit_plugins.qlora.cpu_layout import is_linear4bit, keep_trainable_layout

__all__ = ["quantize_layer", "quantize_model", "dequantize_to_linear", "check_quantizable", "is_linear4bit"]


def _is_conv1d(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Conv1D"  # transformers' GPT-2 layer: weight is (in, out)


def check_quantizable(name: str, module: nn.Module) -> str | None:
    """Why ``module`` at ``name`` cannot become a 4-bit layer (``None`` if it can or already is)."""
    inner = innermost_base(module)
    if is_linear4bit(inner):
        return None
    if inner is not module:
        return (
            f"{name} is already wrapped by another adapter around a {type(inner).__name__}, and qlora would have to "
            "quantize the layer under it; add the qlora adapter first, or load the base in 4-bit "
            "(peftkit_model_load_kwargs) and use 'lora' or 'qlora' on it"
        )
    if type(module) is nn.Linear or _is_conv1d(module):
        return None
    return (
        f"{name} is a {type(module).__name__}, which qlora cannot quantize to 4 bits (it quantizes torch.nn.Linear "
        "and transformers' Conv1D); leave it out of target_modules"
    )


def quantize_layer(
    layer: nn.Module,
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A ``bitsandbytes.nn.Linear4bit`` computing what ``layer`` computes, with a 4-bit weight.

    :param layer: an ``nn.Linear``, or a GPT-2 ``Conv1D`` (its ``(in, out)``
        weight is transposed to Linear's ``(out, in)``).
    :param quant_type: ``"nf4"`` or ``"fp4"``.
    :param double_quant: quantize the block scales too.
    :param compute_dtype: dtype of the on-the-fly dequantization and matmul.
    :returns: the new layer, on ``layer``'s device, frozen, its bias the same
        ``Parameter`` object as ``layer``'s.
    """
    import bitsandbytes as bnb

    weight = layer.weight.detach()
    if _is_conv1d(layer):
        weight = weight.t()  # (in, out) -> (out, in)
    out_features, in_features = weight.shape
    new = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=layer.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type=quant_type,
        device="meta",  # no throw-away full-precision weight
    )
    new.weight = bnb.nn.Params4bit(
        weight.contiguous(), requires_grad=False, compress_statistics=double_quant, quant_type=quant_type, module=new
    ).to(weight.device)  # Params4bit quantizes on its first move to a real device
    if layer.bias is not None:
        new.bias = layer.bias
    new.train(layer.training)
    keep_trainable_layout(new)
    return new


def quantize_model(
    model: nn.Module,
    target_modules: TargetSpec = "all-linear",
    *,
    layers: int | Iterable[int] | None = None,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Replace the targeted Linear/Conv1D layers of ``model`` by 4-bit ones, in place (irreversibly).

    Targets use the usual peftkit specification (``"all-linear"`` skips the
    output head). Layers that are already 4-bit are left alone. Every target is
    checked before any is replaced, so an error leaves the model untouched.

    :returns: ``model``.
    :raises TargetError: if a target cannot be quantized (the message says why).
    """
    targets = find_targets(model, target_modules, layers=layers)
    problems = [p for p in (check_quantizable(n, m) for n, m in targets) if p]
    if problems:
        raise TargetError("; ".join(problems))
    for name, module in targets:
        if not is_linear4bit(module):
            replace_module(
                model,
                name,
                quantize_layer(module, quant_type=quant_type, double_quant=double_quant, compute_dtype=compute_dtype),
            )
    keep_trainable_layout(model)
    return model


def dequantize_to_linear(layer: nn.Module) -> nn.Linear:
    """A frozen ``nn.Linear`` whose weight is ``dequant(layer.weight)``, in the dtype the weight had before quantization.

    The bias is shared with ``layer`` (the same ``Parameter`` object).
    """
    import bitsandbytes as bnb

    keep_trainable_layout(layer)  # the repacked CPU layout does not dequantize with the standard kernel
    weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)  # (out, in)
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    dense.weight = nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        dense.bias = layer.bias
    dense.train(layer.training)
    return dense
